"""Batched prefill, called by the scheduler (BLS). Writes each prompt's K/V into the pool named
by the scheduler and returns the first sampled token. Dynamic batching gathers concurrent
prompts into one execute() call, run as one packed batch.

Inputs (batch dim 1 per request):
  input_ids          INT32 [-1]  prompt tokens
  block_table        INT32 [-1]  KV blocks reserved for the request
  kv_pool            BYTES [1]   "decode" (local) or "executor" (offloaded)
  generation_params  BYTES [1]   JSON from preprocessing
Outputs:
  first_token        INT32 [1]
"""

from __future__ import annotations

import os

import numpy as np
import triton_python_backend_utils as pb_utils
from common import (
    check_internal,
    device_for,
    dtype_for,
    engine_config,
    error_response,
    inputs_of,
    log,
    setup_process,
    tensor,
    text_of,
)

from adrenaline_py.attention import TorchAttentionBackend
from adrenaline_py.engine.prefill import PrefillItem, PrefillRunner
from adrenaline_py.kv_cache import POOL_NAMES, KVPool
from adrenaline_py.loader import build_model, load_checkpoint
from adrenaline_py.request import GenerationParams


class Role:
    def initialize(self, args, config):
        self.engine = e = engine_config(config)
        if e.device == "cuda":
            os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(e.prefill_sm_share)
        setup_process("prefill", e)
        self.ckpt = load_checkpoint(e.model)
        self.dtype = dtype_for(e)
        model = build_model(self.ckpt, self.dtype, device_for(e, e.prefill_gpu), e.max_model_len, e.seed)
        self.ckpt.state_dict = None  # the model holds the weights now
        self.model = model
        self.runner: PrefillRunner | None = None

    def _runner(self) -> PrefillRunner:
        # Pools are created by decode and the executor (maybe still loading): attach on first use.
        if self.runner is None:
            pools = {name: KVPool.attach(name, self.ckpt.config, self.engine, self.dtype) for name in POOL_NAMES}
            self.runner = PrefillRunner(self.model, TorchAttentionBackend(), pools, self.engine.max_prefill_tokens)
        return self.runner

    def execute(self, requests):
        responses = [None] * len(requests)
        items, index = [], []
        for i, request in enumerate(requests):
            try:
                x = inputs_of(request)
                check_internal(x, self.engine, "prefill")
                pool = text_of(x["kv_pool"])
                if pool not in POOL_NAMES:
                    raise ValueError(f"kv_pool must be one of {POOL_NAMES}, got {pool!r}")
                params = GenerationParams.from_json(text_of(x["generation_params"]))
                items.append(PrefillItem(x["input_ids"].reshape(-1).tolist(), pool,
                                         x["block_table"].reshape(-1).tolist(), params.sampling))
                index.append(i)
            except PermissionError as e:
                responses[i] = error_response(str(e))
            except Exception as e:
                responses[i] = error_response(f"prefill: bad request: {e}")
        if items:
            try:
                first = self._runner().run(items)
                for i, token in zip(index, first):
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[tensor("first_token", [token], np.int32)])
            except Exception as e:
                log.exception("prefill failed")
                for i in index:
                    responses[i] = error_response(f"prefill failed: {type(e).__name__}: {e}")
        return responses

    def finalize(self):
        pass
