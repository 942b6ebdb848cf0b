"""Admission, the offload decision, and the prefill → decode hand-off (BLS, decoupled).

Per request, on a worker thread: pick the KV pool with the offload policy and reserve the
request's blocks, call ``prefill`` (which writes the prompt's K/V into those blocks), and hand
the request on to ``decode`` as this model's one response. Decoupled, so requests waiting for
KV room or for prefill do not hold up the others.

Inputs:  input_ids INT32 [-1], generation_params BYTES [1]  (from preprocessing)
Outputs: input_ids INT32 [-1], generation_params BYTES [1], first_token INT32 [1],
         block_table INT32 [-1], kv_pool BYTES [1]          (to decode)

The executor's pool is re-created when its worker restarts (a new generation, see
backends/adrenaline/supervisor.py): admission allocates from the live generation, and ``kv_pool``
names it (``executor@<generation>``) so that prefill and decode never use those blocks in another
generation's pool. A request whose generation died before prefill is admitted again.
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
    client_message,
    engine_config,
    error_response,
    inputs_of,
    internal_token_tensor,
    log,
    setup_process,
    tensor,
    text_of,
)
from metrics import PendingCounters, Sampler, family

from adrenaline_py.engine.admission import Admission, AdmissionTimeout, Overloaded, RequestCancelled
from adrenaline_py.engine.executor import STALE_POOL_ERROR, executor_state, pool_label
from adrenaline_py.kv_cache import POOL_NAMES, BlockAllocator
from adrenaline_py.policy import OffloadPolicy
from adrenaline_py.profile import offload_bound_in_force
from adrenaline_py.request import GenerationParams, InvalidRequest
from adrenaline_py.serving.health import DrainWatch

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
ADMISSION_ATTEMPTS = 3  # admissions per request when the executor restarts between admission and prefill
STATE_CHECK_S = 0.05    # how often admission looks for a new executor generation (waiting requests poll at 5 ms)


class GenerationAllocator(BlockAllocator):
    """An allocator of one generation of a pool (always 0 for decode's pool)."""

    generation = 0


class StalePool(RuntimeError):
    """The executor pool the request's blocks came from died with its worker before prefill."""


class ServerStopping(RuntimeError):
    """The launcher's drain deadline passed (adrenaline_py/serving/health.py): stop waiting."""


class Role:
    def initialize(self, args, config):
        self.engine = e = engine_config(config)
        setup_process("scheduler", e)
        self._decode: BlockAllocator | None = None
        self._executor: GenerationAllocator | None = None
        self._attach_lock = threading.Lock()
        self._checked = -STATE_CHECK_S
        for note in e.extra.get("resolution", []):  # how the launcher derived shares, pools and OB
            log.info("launcher: %s", note)
        bound, why = offload_bound_in_force(e)
        log.info("offload %s; %s", e.offload, why)
        self.admission = Admission(self._allocator, OffloadPolicy(e.offload, bound), e.block_size,
                                   e.admission_timeout_s, max_waiting=e.max_queued_requests,
                                   executor_alive=lambda: executor_state(e.run_dir) is not None,
                                   tpot_slo_s=e.tpot_slo_ms / 1e3 if e.tpot_slo_ms else None)
        workers = e.max_queued_requests + 2 * e.max_decode_batch  # waiting ones + those in prefill
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="admit")
        self.metrics = SchedulerMetrics(self.admission)
        self._drain = DrainWatch(e.run_dir)
        self._sampler = Sampler(self.metrics.update)

    def _allocator(self, name: str) -> BlockAllocator:
        if name == "decode":
            with self._attach_lock:
                if self._decode is None:
                    self._decode = BlockAllocator.attach(self.engine.run_dir, "decode", self.engine.num_decode_blocks)
                return self._decode
        # The executor's: that of the live generation, attached again after each restart. Blocks
        # taken from a generation that just died are caught by prefill (StalePool).
        if time.monotonic() - self._checked >= STATE_CHECK_S:
            with self._attach_lock:
                self._checked = time.monotonic()
                state = executor_state(self.engine.run_dir)
                if state is not None and (self._executor is None or self._executor.generation != state.generation):
                    allocator = GenerationAllocator.attach(self.engine.run_dir, "executor",
                                                           self.engine.num_executor_blocks)
                    if executor_state(self.engine.run_dir) == state:  # not restarted again while attaching
                        allocator.generation = state.generation
                        self._executor = allocator
        if self._executor is None:
            raise StalePool("the attention executor has not started")
        return self._executor

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                x = inputs_of(request)
                check_internal(x, self.engine, "scheduler")
            except Exception as e:  # a direct client (PermissionError), or inputs that cannot be read
                sender.send(error_response(str(e) if isinstance(e, PermissionError)
                                           else f"scheduler: {type(e).__name__}: {e}"), flags=FINAL)
                continue
            # An empty response at once: the caller's BLS call returns at the first response, and
            # until it does it holds one of the calling stub's 32 python-backend threads, which that
            # stub's response sends also need (decode streams every token through them). Waiting
            # for KV room and prefill takes seconds under load; the result follows with FINAL.
            sender.send(pb_utils.InferenceResponse(output_tensors=[]))
            self.pool.submit(self._handle, request, sender, x)
        return None

    def _handle(self, request, sender, x):
        ticket = None
        try:
            input_ids = x["input_ids"].reshape(-1).astype(np.int32)
            params_json = text_of(x["generation_params"])
            params = GenerationParams.from_json(params_json)
            started = time.perf_counter()  # admission counts any retry after a stale executor pool
            for attempt in range(1, ADMISSION_ATTEMPTS + 1):
                ticket = self.admission.admit(len(input_ids), params.sampling.max_tokens,
                                              lambda: self._give_up(request))
                admitted = time.perf_counter()
                self.metrics.admitted[ticket.pool] += 1
                label = pool_label(ticket.pool, getattr(ticket.allocator, "generation", 0))
                try:
                    first = self._prefill(input_ids, ticket, label, params_json)
                    self.metrics.times.add(admission=admitted - started, prefill=time.perf_counter() - admitted,
                                           requests=1)
                    break
                except StalePool as e:
                    self.admission.release(ticket)  # into the dead generation's pool: harmless
                    ticket = None
                    if attempt == ADMISSION_ATTEMPTS:
                        raise
                    log.warning("%s; admitting the request again", e)
            if request.is_cancelled():
                raise RequestCancelled("request cancelled during prefill")
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                tensor("input_ids", input_ids, np.int32),
                bytes_tensor("generation_params", params_json),
                tensor("first_token", [first], np.int32),
                tensor("block_table", ticket.block_table, np.int32),
                bytes_tensor("kv_pool", label),
            ]), flags=FINAL)
            ticket = None  # decode owns the blocks now
        except (InvalidRequest, AdmissionTimeout, Overloaded, RequestCancelled, PermissionError, ServerStopping) as e:
            self._refuse(sender, str(e))
        except Exception as e:
            log.exception("scheduling failed")
            self._refuse(sender, f"scheduler: {type(e).__name__}: {e}")
        finally:
            if ticket is not None:
                self.admission.release(ticket)

    @staticmethod
    def _refuse(sender, message: str) -> None:
        """The request's end when it is not admitted: a final response whose `admission_error` says why.
        Not a Triton error: after the empty first response, an error response in tritonserver 2.51 left
        the calling request unreleased (its client's stream never closed)."""
        error = bytes_tensor("admission_error", client_message(message))
        sender.send(pb_utils.InferenceResponse(output_tensors=[error]), flags=FINAL)

    def _give_up(self, request) -> bool:
        """Whether a request waiting for KV room stops waiting: its client left (True), or the
        server is stopping and the drain deadline passed (ServerStopping)."""
        if (cut := self._drain.cut_due()) is not None:
            raise ServerStopping(cut.message)
        return request.is_cancelled()

    def _prefill(self, input_ids: np.ndarray, ticket, label: str, params_json: str) -> int:
        """First token from prefill (whose stub runs a batch again itself if its worker dies)."""
        assert ticket.pool in POOL_NAMES
        response = pb_utils.InferenceRequest(
            model_name="prefill",
            requested_output_names=["first_token"],
            inputs=[
                pb_utils.Tensor("input_ids", input_ids[None, :]),
                pb_utils.Tensor("block_table", np.asarray(ticket.block_table, dtype=np.int32)[None, :]),
                pb_utils.Tensor("kv_pool", np.array([[label.encode()]], dtype=np.object_)),
                pb_utils.Tensor("generation_params", np.array([[params_json.encode()]], dtype=np.object_)),
                internal_token_tensor(self.engine),
            ],
        ).exec()
        if response.has_error():
            message = response.error().message()
            raise (StalePool if message.startswith(STALE_POOL_ERROR) else RuntimeError)(message)
        return int(pb_utils.get_output_tensor_by_name(response, "first_token").as_numpy().reshape(-1)[0])

    def finalize(self):
        self._sampler.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)


class SchedulerMetrics:
    """Requests waiting for KV room, rejections by reason, admissions by pool; the offload bound in
    force and the loads the policy compares with it (executor KV blocks: decode's
    adrenaline_kv_blocks_used{pool="executor"})."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.admitted: Counter[str] = Counter()
        self.waiting = family("adrenaline_admission_waiting", "requests waiting for KV cache room", "GAUGE").Metric()
        self.bound = family("adrenaline_offload_bound",
                            "offload bound OB of --offload auto: offloaded load / local load allowed", "GAUGE").Metric()
        self.ratio = family("adrenaline_offload_ratio",
                            "share of the requests holding KV blocks whose attention is offloaded", "GAUGE").Metric()
        loads = family("adrenaline_offload_load_ratio",
                       "offloaded / local load, as auto compares it with OB: max_tokens (C1), current_tokens and "
                       "requests (C2); 0 without local load", "GAUGE")
        self.loads = {m: loads.Metric(labels={"measure": m}) for m in ("max_tokens", "current_tokens", "requests")}
        self._rejected = family("adrenaline_admission_rejected_total",
                                "requests rejected at admission, by reason", "COUNTER")
        self._admitted = family("adrenaline_admitted_total", "requests admitted, by KV pool (executor = offloaded)",
                                "COUNTER")
        self.held_for_tpot = family("adrenaline_admission_held_for_tpot_total",
                                    "requests that waited because decode's steps were near --tpot-slo",
                                    "COUNTER").Metric()
        self._held_seen = 0
        self._metrics: dict[tuple[str, str], object] = {}
        self._seen: Counter[tuple[str, str]] = Counter()
        # Where a request's time to first token goes before decode
        self.times = PendingCounters({
            "admission": ("adrenaline_admission_wait_seconds_total",
                          "seconds requests waited for admission (KV room, the TPOT gate), summed over the "
                          "requests that reached prefill"),
            "prefill": ("adrenaline_scheduler_prefill_seconds_total",
                        "seconds of the scheduler's prefill calls (prefill's queue, its pass, the BLS hops), "
                        "summed over requests"),
            "requests": ("adrenaline_scheduler_prefilled_total",
                         "requests the scheduler had prefilled (the count of both sums)"),
        })

    def update(self) -> None:
        self.times.update()
        self.waiting.set(self.admission.num_waiting)
        held = self.admission.num_held_for_tpot
        if held > self._held_seen:
            self.held_for_tpot.increment(held - self._held_seen)
            self._held_seen = held
        self.bound.set(self.admission.policy.bound)
        try:
            loads = self.admission.loads()
        except (StalePool, TimeoutError):  # a pool not there yet: keep the last values
            loads = None
        if loads is not None:
            local, remote = loads["decode"], loads.get("executor")
            offloaded = remote.num_seqs if remote is not None else 0
            held = local.num_seqs + offloaded
            self.ratio.set(offloaded / held if held else 0.0)
            for measure, mine, theirs in (
                ("max_tokens", local.reserved_tokens, remote.reserved_tokens if remote else 0),
                ("current_tokens", local.current_tokens, remote.current_tokens if remote else 0),
                ("requests", local.num_seqs, offloaded),
            ):
                self.loads[measure].set(theirs / mine if mine else 0.0)
        for kind, counts, fam, label in (("rejected", self.admission.rejected, self._rejected, "reason"),
                                         ("admitted", self.admitted, self._admitted, "pool")):
            for key, count in list(counts.items()):
                k = (kind, key)
                if k not in self._metrics:
                    self._metrics[k] = fam.Metric(labels={label: key})
                if count > self._seen[k]:
                    self._metrics[k].increment(count - self._seen[k])
                    self._seen[k] = count
