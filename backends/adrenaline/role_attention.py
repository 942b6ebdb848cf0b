"""The attention executor (on the prefill GPU, beside prefill under MPS).

It serves the decode instance over shared memory (adrenaline_py/transport.py), not through
Triton requests. Its one Triton input is a health/stats probe:
  probe      INT32 [1]   any value
  ->  stats  BYTES [1]   JSON: steps served, blocks free/total, sequences
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from common import device_for, dtype_for, engine_config, setup_process
from metrics import Sampler, family

from adrenaline_py.engine.executor import AttentionExecutor
from adrenaline_py.loader import load_checkpoint


class Role:
    def initialize(self, args, config):
        self.engine = engine_config(config)
        # The MPS share must be set before CUDA is touched in this process.
        if self.engine.device == "cuda":
            os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(self.engine.executor_sm_share)
        setup_process("attention", self.engine)
        ckpt = load_checkpoint(self.engine.model, with_weights=False)
        self.executor = AttentionExecutor(
            ckpt.config, self.engine, dtype_for(self.engine), device_for(self.engine, self.engine.prefill_gpu)
        )
        self.executor.start()
        steps = family("adrenaline_executor_steps_total", "decode steps served by the attention executor", "COUNTER")
        self._steps, self._seen_steps = steps.Metric(), 0
        self._sampler = Sampler(self._update_metrics)

    def _update_metrics(self) -> None:
        n = self.executor.num_steps
        if n > self._seen_steps:
            self._steps.increment(n - self._seen_steps)
            self._seen_steps = n

    def execute(self, requests):
        a = self.executor.pool.allocator
        stats = json.dumps({"steps": self.executor.num_steps, "num_free_blocks": a.num_free,
                            "num_blocks": a.num_blocks, "num_seqs": a.num_seqs})
        out = pb_utils.Tensor("stats", np.array([stats.encode()], dtype=np.object_))  # dims [1], no batch dim
        return [pb_utils.InferenceResponse(output_tensors=[out]) for _ in requests]

    def finalize(self):
        self._sampler.stop()
        self.executor.stop()
