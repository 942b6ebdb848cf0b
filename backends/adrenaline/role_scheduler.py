"""Admission, the offload decision, and the prefill → decode hand-off (BLS, decoupled).

Per request, on a worker thread: pick the KV pool with the offload policy and reserve the
request's blocks, call ``prefill`` (which writes the prompt's K/V into those blocks), and hand
the request on to ``decode`` as this model's one response. Decoupled, so requests waiting for
KV room or for prefill do not hold up the others.

Inputs:  input_ids INT32 [-1], generation_params BYTES [1]  (from preprocessing)
Outputs: input_ids INT32 [-1], generation_params BYTES [1], first_token INT32 [1],
         block_table INT32 [-1], kv_pool BYTES [1]          (to decode)
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils
from common import (
    bytes_tensor,
    check_internal,
    engine_config,
    error_response,
    inputs_of,
    internal_token_tensor,
    log,
    setup_process,
    tensor,
    text_of,
)
from metrics import Sampler, family

from adrenaline_py.engine.admission import Admission, AdmissionTimeout, Overloaded, RequestCancelled
from adrenaline_py.engine.executor import executor_alive
from adrenaline_py.kv_cache import POOL_NAMES, BlockAllocator
from adrenaline_py.policy import OffloadPolicy
from adrenaline_py.request import GenerationParams, InvalidRequest

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Role:
    def initialize(self, args, config):
        self.engine = e = engine_config(config)
        setup_process("scheduler", e)
        self._allocators: dict[str, BlockAllocator] = {}
        self.admission = Admission(self._allocator, OffloadPolicy(e.offload, e.offload_bound), e.block_size,
                                   e.admission_timeout_s, max_waiting=e.max_queued_requests,
                                   executor_alive=self._executor_alive)
        workers = e.max_queued_requests + 2 * e.max_decode_batch  # waiting ones + those in prefill
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="admit")
        self._last_probe = 0.0
        self.metrics = SchedulerMetrics(self.admission)
        self._sampler = Sampler(self.metrics.update)

    def _allocator(self, name: str) -> BlockAllocator:
        if name not in self._allocators:
            blocks = self.engine.num_decode_blocks if name == "decode" else self.engine.num_executor_blocks
            self._allocators[name] = BlockAllocator.attach(self.engine.run_dir, name, blocks)
        return self._allocators[name]

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._handle, request, request.get_response_sender())
        return None

    def _executor_alive(self) -> bool:
        if executor_alive(self.engine.run_dir):
            return True
        # A Triton request to a model whose stub died makes the python backend restart it.
        now = time.monotonic()
        if now - self._last_probe > 5.0:
            self._last_probe = now
            threading.Thread(target=self._probe_executor, daemon=True).start()
        return False

    def _probe_executor(self) -> None:
        probe = pb_utils.InferenceRequest(model_name="attention", requested_output_names=["stats"],
                                          inputs=[pb_utils.Tensor("probe", np.zeros(1, dtype=np.int32))])
        response = probe.exec()
        log.warning("attention executor was down; probe answered %s",
                    response.error().message() if response.has_error() else "ok")

    def _handle(self, request, sender):
        ticket = None
        try:
            x = inputs_of(request)
            check_internal(x, self.engine, "scheduler")
            input_ids = x["input_ids"].reshape(-1).astype(np.int32)
            params_json = text_of(x["generation_params"])
            params = GenerationParams.from_json(params_json)
            ticket = self.admission.admit(len(input_ids), params.sampling.max_tokens, request.is_cancelled)
            self.metrics.admitted[ticket.pool] += 1
            first = self._prefill(input_ids, ticket, params_json)
            if request.is_cancelled():
                raise RequestCancelled("request cancelled during prefill")
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                tensor("input_ids", input_ids, np.int32),
                bytes_tensor("generation_params", params_json),
                tensor("first_token", [first], np.int32),
                tensor("block_table", ticket.block_table, np.int32),
                bytes_tensor("kv_pool", ticket.pool),
            ]), flags=FINAL)
            ticket = None  # decode owns the blocks now
        except (InvalidRequest, AdmissionTimeout, Overloaded, RequestCancelled, PermissionError) as e:
            sender.send(error_response(str(e)), flags=FINAL)
        except Exception as e:
            log.exception("scheduling failed")
            sender.send(error_response(f"scheduler: {type(e).__name__}: {e}"), flags=FINAL)
        finally:
            if ticket is not None:
                self.admission.release(ticket)

    def _prefill(self, input_ids: np.ndarray, ticket, params_json: str) -> int:
        """First token from prefill; one retry covers a prefill stub that died and was restarted."""
        try:
            return self._prefill_once(input_ids, ticket, params_json)
        except RuntimeError as e:
            log.warning("prefill failed (%s); retrying once", e)
            time.sleep(1.0)
            return self._prefill_once(input_ids, ticket, params_json)

    def _prefill_once(self, input_ids: np.ndarray, ticket, params_json: str) -> int:
        assert ticket.pool in POOL_NAMES
        response = pb_utils.InferenceRequest(
            model_name="prefill",
            requested_output_names=["first_token"],
            inputs=[
                pb_utils.Tensor("input_ids", input_ids[None, :]),
                pb_utils.Tensor("block_table", np.asarray(ticket.block_table, dtype=np.int32)[None, :]),
                pb_utils.Tensor("kv_pool", np.array([[ticket.pool.encode()]], dtype=np.object_)),
                pb_utils.Tensor("generation_params", np.array([[params_json.encode()]], dtype=np.object_)),
                internal_token_tensor(self.engine),
            ],
        ).exec()
        if response.has_error():
            raise RuntimeError(response.error().message())
        return int(pb_utils.get_output_tensor_by_name(response, "first_token").as_numpy().reshape(-1)[0])

    def finalize(self):
        self._sampler.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)


class SchedulerMetrics:
    """Requests waiting for KV room, rejections by reason, admissions by pool."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.admitted: Counter[str] = Counter()
        self.waiting = family("adrenaline_admission_waiting", "requests waiting for KV cache room", "GAUGE").Metric()
        self._rejected = family("adrenaline_admission_rejected_total",
                                "requests rejected at admission, by reason", "COUNTER")
        self._admitted = family("adrenaline_admitted_total", "requests admitted, by KV pool (executor = offloaded)",
                                "COUNTER")
        self._metrics: dict[tuple[str, str], object] = {}
        self._seen: Counter[tuple[str, str]] = Counter()

    def update(self) -> None:
        self.waiting.set(self.admission.num_waiting)
        for kind, counts, fam, label in (("rejected", self.admission.rejected, self._rejected, "reason"),
                                         ("admitted", self.admitted, self._admitted, "pool")):
            for key, count in list(counts.items()):
                k = (kind, key)
                if k not in self._metrics:
                    self._metrics[k] = fam.Metric(labels={label: key})
                if count > self._seen[k]:
                    self._metrics[k].increment(count - self._seen[k])
                    self._seen[k] = count
