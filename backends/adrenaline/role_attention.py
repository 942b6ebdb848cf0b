"""The attention executor (on the prefill GPU, beside prefill under MPS), supervised.

The executor serves the decode instance over shared memory (adrenaline_py/transport.py), not
through Triton requests. It runs in a worker process (worker.py) that owns its KV pool and offload
buffers; this stub only starts it, restarts it when it dies (a new generation: fresh pool, every
block free; decode recomputes the requests it had) and reports on it (supervisor.py says why).

Its one Triton input is a health/stats probe:
  probe      INT32 [1]   any value
  ->  stats  BYTES [1]   JSON: steps served, blocks free/total, sequences, generation, restarts
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import triton_python_backend_utils as pb_utils
from common import engine_config, engine_config_path, error_response, setup_process
from metrics import Sampler, WorkerMetrics, family
from supervisor import WorkerGone, WorkerSupervisor

from adrenaline_py.engine.executor import clear_executor_state
from adrenaline_py.loader import load_checkpoint
from adrenaline_py.profile import resolve_sm_shares


class Role:
    def initialize(self, args, config):
        self.engine = engine_config(config)
        # The MPS share must be set before CUDA is touched; the worker inherits it.
        if self.engine.device == "cuda":
            os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(resolve_sm_shares(self.engine, None)[1])
        setup_process("attention", self.engine)
        run_dir = self.engine.run_dir
        # The model's shape, read once here: a restarted worker starts without reading the checkpoint.
        model_config = load_checkpoint(self.engine.model, with_weights=False).config
        # A dead worker's state goes before anything else runs: admission stops offloading at once.
        self.worker = WorkerSupervisor("attention", engine_config_path(config), init=model_config,
                                       on_exit=lambda pid: clear_executor_state(run_dir, pid),
                                       stall_timeout_s=self.engine.heartbeat_timeout_s)
        self.worker.start()
        self._steps_before = 0         # steps served by earlier generations
        self._host_s_before = 0.0      # and their host seconds
        self._last: dict = {}          # the latest stats of the current generation
        self._lock = threading.Lock()  # the probe and the metrics sampler both ask
        steps = family("adrenaline_executor_steps_total", "decode steps served by the attention executor", "COUNTER")
        self._steps, self._seen_steps = steps.Metric(), 0
        host = family("adrenaline_executor_host_seconds_total",
                      "host seconds of the executor per step, from the step's schedule to its layers launched "
                      "(decode's GPU waits for it at the step's first layer)", "COUNTER")
        self._host_s, self._seen_host_s = host.Metric(), 0.0
        self._worker_metrics = WorkerMetrics("attention", self.worker)
        self._sampler = Sampler(self._update_metrics)

    def _stats(self) -> dict:
        with self._lock:
            generation, stats = self.worker.call(("stats",))
            if self._last.get("generation") not in (None, generation):  # a restart: keep the old count
                self._steps_before += self._last.get("steps", 0)
                self._host_s_before += self._last.get("host_seconds", 0.0)
            self._last = {**stats, "generation": generation}
            return {**stats, "steps": self._steps_before + stats["steps"],
                    "host_seconds": self._host_s_before + stats.get("host_seconds", 0.0),
                    "restarts": self.worker.restarts}

    def _update_metrics(self) -> None:
        self._worker_metrics.update()
        try:
            stats = self._stats()
        except WorkerGone:
            return
        n, host_s = stats["steps"], stats["host_seconds"]
        if n > self._seen_steps:
            self._steps.increment(n - self._seen_steps)
            self._seen_steps = n
        if host_s > self._seen_host_s:
            self._host_s.increment(host_s - self._seen_host_s)
            self._seen_host_s = host_s

    def execute(self, requests):
        try:
            stats = json.dumps(self._stats())
        except WorkerGone as e:
            return [error_response(f"attention executor unavailable: {e}") for _ in requests]
        out = pb_utils.Tensor("stats", np.array([stats.encode()], dtype=np.object_))  # dims [1], no batch dim
        return [pb_utils.InferenceResponse(output_tensors=[out]) for _ in requests]

    def finalize(self):
        self._sampler.stop()
        self.worker.stop()
