"""Batched prefill, called by the scheduler (BLS). Writes each prompt's K/V into the pool named
by the scheduler and returns the first sampled token. Dynamic batching gathers concurrent
prompts into one execute() call, run as one packed batch.

The model runs in a worker process (worker.py) that this stub supervises and restarts when it
dies (supervisor.py says why): execute() validates the requests and hands the batch to the worker
over a socket pair. A batch whose worker dies is run again, once, by the restarted worker (the
prompt's blocks are still reserved, so rewriting them is harmless); requests arriving meanwhile
wait for it.

Inputs (batch dim 1 per request):
  input_ids          INT32 [-1]  prompt tokens
  block_table        INT32 [-1]  KV blocks reserved for the request
  kv_pool            BYTES [1]   "decode" (local) or "executor@<generation>" (offloaded)
  generation_params  BYTES [1]   JSON from preprocessing
Outputs:
  first_token        INT32 [1]
"""

from __future__ import annotations

import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils
from common import (
    check_internal,
    engine_config,
    engine_config_path,
    error_response,
    inputs_of,
    log,
    setup_process,
    tensor,
    text_of,
)
from metrics import PREFILL_COUNTERS, PendingCounters, Sampler, WorkerMetrics
from supervisor import WorkerGone, WorkerSupervisor

from adrenaline_py.engine.executor import parse_pool_label
from adrenaline_py.kv_cache import POOL_NAMES
from adrenaline_py.profile import resolve_sm_shares
from adrenaline_py.request import GenerationParams

#: how long a batch waits for a restarted worker (it loads the model again)
RESTART_WAIT_S = 300.0


class Role:
    def initialize(self, args, config):
        self.engine = e = engine_config(config)
        # The MPS share must be set before CUDA is touched; the worker inherits it.
        if e.device == "cuda":
            os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(resolve_sm_shares(e, None)[0])
        setup_process("prefill", e)
        self.worker = WorkerSupervisor("prefill", engine_config_path(config), stall_timeout_s=e.heartbeat_timeout_s)
        self.worker.start()
        worker_metrics, self.metrics = WorkerMetrics("prefill", self.worker), PendingCounters(PREFILL_COUNTERS)

        def update_metrics() -> None:
            worker_metrics.update()
            self.metrics.update()

        self._sampler = Sampler(update_metrics)

    def execute(self, requests):
        responses = [None] * len(requests)
        items, index = [], []
        for i, request in enumerate(requests):
            try:
                x = inputs_of(request)
                check_internal(x, self.engine, "prefill")
                label = text_of(x["kv_pool"])
                if parse_pool_label(label)[0] not in POOL_NAMES:
                    raise ValueError(f"kv_pool must be one of {POOL_NAMES}, got {label!r}")
                params = GenerationParams.from_json(text_of(x["generation_params"]))
                items.append((x["input_ids"].reshape(-1).tolist(), label, x["block_table"].reshape(-1).tolist(),
                              params.sampling))
                index.append(i)
            except PermissionError as e:
                responses[i] = error_response(str(e))
            except Exception as e:
                responses[i] = error_response(f"prefill: bad request: {e}")
        if items:
            try:
                kind, results = self._run(items)
                if kind != "ok":
                    raise RuntimeError(results)
                for i, result in zip(index, results):  # a token, or why this request was refused
                    if isinstance(result, str):
                        responses[i] = error_response(result)
                    else:
                        first = tensor("first_token", [result], np.int32)
                        responses[i] = pb_utils.InferenceResponse(output_tensors=[first])
            except Exception as e:
                log.error("prefill failed: %s", e)
                for i in index:
                    responses[i] = error_response(f"prefill failed: {type(e).__name__}: {e}")
        return responses

    def _run(self, items: list[tuple]) -> tuple[str, list | str]:
        """The worker's answer for one batch; a batch whose worker died runs once more on the next one."""
        generation = self.worker.generation
        for attempt in (1, 2):
            try:
                started = time.perf_counter()
                _, (kind, results, worker_s) = self.worker.call(("prefill", items), wait_s=RESTART_WAIT_S)
                hop_s = time.perf_counter() - started - worker_s  # what the worker process costs per batch
                log.debug("prefill of %d prompts: %.2f ms in the worker, %.3f ms hop", len(items), worker_s * 1e3,
                          hop_s * 1e3)
                self.metrics.add(passes=1, prompts=len(items), tokens=sum(len(item[0]) for item in items),
                                 busy_s=worker_s)
                return kind, results
            except WorkerGone as e:
                if attempt == 2:
                    raise
                log.warning("%s; running the batch again on the restarted worker", e)
                if not self.worker.wait_ready(RESTART_WAIT_S, after_generation=generation):
                    raise
        raise AssertionError("unreachable")

    def finalize(self):
        self._sampler.stop()
        self.worker.stop()
