"""The client entry (model `ensemble`) and continuous-batching decode, in one decoupled model.

Per request, on an admission thread: `preprocessing` (BLS) validates and tokenizes, `scheduler`
(BLS) picks the KV pool, reserves blocks and runs prefill; the request then joins the decode
loop (adrenaline_py/engine/decode.py) in this process, and output threads detokenize and send
its responses on its own sender — no Triton hop per token. Being the model the client calls
(not a step of Triton's ensemble platform, which in 2.51 does not pass a client's cancellation
on to a step already running) lets a closed stream or a gRPC cancel stop the request here.

Inputs: the client contract (docs/configuration.md), forwarded to preprocessing; a request with a
batch > 1 (TensorRT-LLM's --batch-inputs) is one sequence per row. The vllm_model entry
(role_vllm.py) calls this model with a `client_key`, and with a `cancel_key` when its client goes.
Outputs (per response): text_output BYTES 1-D [1] (a delta when streaming), and [1, 1]:
  num_output_tokens INT32, num_input_tokens INT32, finish_reason BYTES ("" until the last response,
  then "stop" | "length"; failures arrive as errors), batch_index INT32 (the row, when batched)
"""

from __future__ import annotations

import itertools
import json
import os
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
    dtype_for,
    engine_config,
    error_response,
    internal_token_tensor,
    log,
    setup_process,
    tensor,
    text_of,
)
from executor_pool import ExecutorBlocks, ExecutorPoolView
from metrics import BATCH_BUCKETS, Sampler, family

from adrenaline_py.engine.decode import Sequence, StepTimes
from adrenaline_py.engine.executor import parse_pool_label, tag_blocks
from adrenaline_py.engine.output import ResponseChunk
from adrenaline_py.engine.service import DecodeService
from adrenaline_py.kv_cache import POOL_NAMES, KVPool
from adrenaline_py.loader import build_model, load_checkpoint
from adrenaline_py.placement import bind_role
from adrenaline_py.request import GenerationParams
from adrenaline_py.serving.health import DrainWatch, write_drain_ack

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def internal_error_response(message: str):
    """An error for vllm_model, after our empty first response: a response with `finish_reason`
    "error" and the message as `text_output`. A Triton error response after an empty first one left
    the calling request unreleased in tritonserver 2.51 (its client's stream never closed)."""
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([client_message(message).encode("utf-8")], dtype=np.object_)),
        bytes_tensor("finish_reason", "error")])


class RequestRejected(Exception):
    """A step before decode refused the request; its message goes to the client."""


# Inputs that this model reads itself: never forwarded to preprocessing.
_DECODE_INPUTS = ("client_key", "cancel_key", "internal_token")
_CANCELLED_KEY_TTL_S = 600.0  # a cancel that arrives after its request ended is forgotten after this


class ClientRequest:
    """One Triton request and its sender, shared by its rows' sequences.

    A request with a batch > 1 is answered as TensorRT-LLM's backend answers it: each row is its own
    sequence, every response carries the row's batch_index, and only the response that ends the
    last row carries the final flag. The rows' responses come from different output threads, so
    every send and every cancellation poll holds the lock: two threads using one sender at once,
    or asking is_cancelled() after the final response, crash tritonserver 2.51.
    """

    def __init__(self, request, sender, batch_size: int, key: str | None, cancelled_keys: dict[str, float]) -> None:
        self.request, self.sender = request, sender
        self.batch_size = batch_size
        self.remaining = batch_size       # rows whose final response is not out yet
        self.key = key                    # vllm_model's key of this request
        self.cancelled_keys = cancelled_keys
        self.seq_ids: list[int] = []
        self.closed = False               # the final response (or the error) was sent
        self.lock = threading.Lock()
        # A client that names no outputs asks for all of them (TensorRT-LLM's sends batch_index then too).
        self.want_batch_index = batch_size > 1 or "batch_index" in request.requested_output_names()

    def is_cancelled(self) -> bool:
        with self.lock:
            if self.closed:  # a failed sibling row ended the request: stop the others
                return True
            return self.request.is_cancelled() or (self.key is not None and self.key in self.cancelled_keys)


class Role:
    def initialize(self, args, config):
        self.engine = e = engine_config(config)
        setup_process("decode", e)
        device = bind_role("decode", e)  # before any CUDA work
        ckpt = load_checkpoint(e.model)
        self.dtype = dtype_for(e)
        model = build_model(ckpt, self.dtype, device, e.max_model_len, e.seed)
        ckpt.state_dict = None
        # Decode only frees in the executor's pool: its allocator, of the live generation.
        self.executor_blocks = ExecutorBlocks(e)
        self.pools = {"decode": KVPool.create("decode", ckpt.config, e, self.dtype),
                      "executor": ExecutorPoolView(self.executor_blocks)}
        self.service = DecodeService(model, ckpt.tokenizer, e, self.dtype, self._pool, self._send)
        self._ids = itertools.count()
        self._cancelled_keys: dict[str, float] = {}  # vllm_model keys → when the cancel arrived
        # Requests that end before decode holds them (rejected, failed or cancelled in admission).
        self._ended: Counter[str] = Counter()
        self.model_name = args["model_name"]
        self._ended_lock = threading.Lock()
        self._drain = DrainWatch(e.run_dir)
        self._drain_acked = False
        self._metrics = DecodeMetrics(self.service, self._pool, self._ended)
        self._samplers = [Sampler(self._update_metrics), Sampler(self._sweep_cancelled, period_s=0.2)]
        # Admission threads wait in preprocessing, for KV room and for prefill.
        self._admission = ThreadPoolExecutor(max_workers=e.max_queued_requests + 2 * e.max_decode_batch,
                                             thread_name_prefix="admit")
        log.info("decode ready (pid %d)", os.getpid())

    def _sweep_cancelled(self) -> None:
        """Clients that went away (stream closed, gRPC cancel) free their KV within one sweep."""
        self.service.check_cancelled(lambda handle: handle[0].is_cancelled())
        if (cut := self._drain.cut_due()) is not None:
            # tritonserver would close these connections at its exit timeout without a final event.
            held = self.service.scheduler.snapshot()
            for seq in held:
                self.service.scheduler.abort(seq.seq_id, "error", cut.message)
            if cut.forced and not held and not self._drain_acked and self.service.outputs.queued() == 0:
                # a second stop signal: the launcher kills tritonserver once every error is out
                write_drain_ack(self.engine.run_dir)
                self._drain_acked = True
        now = time.monotonic()
        for key, at in list(self._cancelled_keys.items()):
            if now - at > _CANCELLED_KEY_TTL_S:
                self._cancelled_keys.pop(key, None)

    def _update_metrics(self) -> None:
        self.executor_blocks.refresh()  # after an executor restart, count (and free into) the new pool
        self._metrics.update()

    def _pool(self, name: str) -> KVPool | ExecutorPoolView:
        return self.pools[name]

    def execute(self, requests):
        for request in requests:
            self._admission.submit(self._admit, request, request.get_response_sender())
        return None

    def _admit(self, request, sender) -> None:
        key = None
        try:
            inputs = {t.name(): t for t in request.inputs()}
            own = {name: inputs.pop(name).as_numpy() for name in _DECODE_INPUTS if name in inputs}
            self._check_parameters(request)
            if "client_key" in own or "cancel_key" in own:
                check_internal(own, self.engine, "ensemble")
                key = text_of(own["client_key"]) if "client_key" in own else None
            if key is not None:
                # vllm_model's BLS call holds one of its stub's python-backend threads until our first
                # response, and its responses to its client need those threads: answer at once (as
                # the scheduler does for us). From here on its errors go as `finish_reason` "error".
                sender.send(pb_utils.InferenceResponse(output_tensors=[]))
            if "cancel_key" in own:
                self._cancelled_keys[text_of(own["cancel_key"])] = time.monotonic()
                sender.send(flags=FINAL)
                return
            first = inputs["text_input"] if "text_input" in inputs else next(iter(inputs.values()), None)
            shape = first.as_numpy().shape if first is not None else ()
            batch = shape[0] if len(shape) > 1 else 1
        except (PermissionError, RequestRejected) as e:
            self._send_error(sender, str(e), internal=key is not None)
            return
        except Exception as e:
            log.exception("admission failed")
            self._send_error(sender, f"decode: {type(e).__name__}: {e}", internal=key is not None)
            return
        group = ClientRequest(request, sender, batch, key, self._cancelled_keys)
        rows = [list(inputs.values())] if batch == 1 else [
            [pb_utils.Tensor(t.name(), t.as_numpy()[i:i + 1]) for t in inputs.values()] for i in range(batch)
        ]
        seqs: list[Sequence] = []
        for index, row in enumerate(rows):
            seq = self._admit_row(row, group, index)
            if seq is None:  # its error was sent: give back what the rows before it reserved
                for s in seqs:
                    self._free_reserved(s)
                return
            seqs.append(seq)
        group.seq_ids = [s.seq_id for s in seqs]
        for seq in seqs:
            self.service.add(seq)

    def _free_reserved(self, seq: Sequence) -> None:
        try:
            self._pool(seq.pool).allocator.free(seq.block_table, seq.reserved_tokens)
        except Exception:
            log.exception("could not free the blocks of a request that failed admission")

    def _admit_row(self, inputs, group: ClientRequest, index: int) -> Sequence | None:
        """Preprocessing and scheduler for one row; None when the request failed (error sent)."""
        request, sender = group.request, group.sender
        where = f"batch_index {index}: " if group.batch_size > 1 else ""
        handed_on = None
        try:
            pre = self._call("preprocessing", inputs, ["input_ids", "generation_params"])
            sched = self._call("scheduler", [*pre.output_tensors(), internal_token_tensor(self.engine)],
                               ["input_ids", "generation_params", "first_token", "block_table", "kv_pool",
                                "admission_error"], decoupled=True)
            x = {t.name(): t.as_numpy() for t in sched.output_tensors()}
            if "admission_error" in x:  # not admitted (overloaded, timed out, cancelled, invalid)
                raise RequestRejected(text_of(x["admission_error"]))
            label = text_of(x["kv_pool"])
            pool, generation = parse_pool_label(label)
            if pool not in POOL_NAMES:
                raise ValueError(f"kv_pool must be one of {POOL_NAMES}, got {label!r}")
            params = GenerationParams.from_json(text_of(x["generation_params"]))
            block_table = x["block_table"].reshape(-1).tolist()
            if pool == "executor":
                # Decode holds executor blocks with their pool's generation: freed into that pool
                # only, and the executor refuses them if it is a later one (decode then recomputes).
                block_table = tag_blocks(block_table, generation)
            seq = Sequence(
                seq_id=next(self._ids),
                prompt_ids=x["input_ids"].reshape(-1).tolist(),
                output_ids=[int(x["first_token"].reshape(-1)[0])],
                block_table=block_table,
                pool=pool,
                params=params,
                handle=(group, index, params.output),
            )
            handed_on = seq
            if pool == "executor":
                self.executor_blocks.refresh()  # a new generation: free this request's blocks there
            if request.is_cancelled():
                raise RequestRejected("request cancelled")
            if (cut := self._drain.cut_due()) is not None:
                raise RequestRejected(cut.message)
        except Exception as e:
            if handed_on is not None:  # blocks were reserved for it: give them back
                self._free_reserved(handed_on)
            internal = group.key is not None
            if isinstance(e, RequestRejected):
                self._send_error(sender, where + str(e), internal)
            else:
                log.exception("admission failed")
                self._send_error(sender, f"{where}decode: {type(e).__name__}: {e}", internal)
            return None
        return seq

    def _call(self, model: str, inputs, outputs: list[str], decoupled: bool = False):
        """One BLS request; its error becomes this request's error."""
        request = pb_utils.InferenceRequest(model_name=model, inputs=list(inputs), requested_output_names=outputs)
        if decoupled:  # the scheduler sends exactly one response, with the final flag
            response = next(r for r in request.exec(decoupled=True) if r.has_error() or r.output_tensors())
        else:
            response = request.exec()
        if response.has_error():
            raise RequestRejected(response.error().message())
        return response

    #: Request parameters this model reads. /generate turns every JSON key that names no input into a
    #: request parameter ("id" is its request id), where gRPC and /infer refuse an unknown input:
    #: refusing unknown parameters here with Triton's own message makes every path agree.
    ACCEPTED_PARAMETERS: frozenset[str] = frozenset({"id"})

    def _check_parameters(self, request) -> None:
        try:
            names = json.loads(request.parameters() or "{}")
        except ValueError:
            names = {}
        unknown = sorted(set(names) - self.ACCEPTED_PARAMETERS)
        if unknown:
            raise RequestRejected(f"unexpected inference input '{unknown[0]}' for model '{self.model_name}'")

    def _send_error(self, sender, message: str, internal: bool = False) -> None:
        # Every request end is counted (adrenaline_requests_finished_total), rejections included.
        with self._ended_lock:
            self._ended["cancelled" if "request cancelled" in message else "error"] += 1
        try:
            sender.send(internal_error_response(message) if internal else error_response(message), flags=FINAL)
        except Exception:  # the client may be gone already
            log.warning("could not deliver error %r", message)

    def _send(self, handle, chunk: ResponseChunk) -> None:
        group, index, options = handle
        siblings: list[int] = []
        with group.lock:
            if group.closed:  # another row failed: its error ended the request
                return
            if chunk.error is not None:
                group.closed = True
                self._cancelled_keys.pop(group.key, None)
                error = internal_error_response if group.key is not None else error_response
                group.sender.send(error(chunk.error), flags=FINAL)
                siblings = list(group.seq_ids)
            else:
                if chunk.is_final:
                    group.remaining -= 1
                last = group.remaining == 0
                # 1-D text_output, as TensorRT-LLM's postprocessing sends it.
                data = chunk.text.encode("utf-8")
                outputs = [pb_utils.Tensor("text_output", np.array([data], dtype=np.object_)),
                           bytes_tensor("finish_reason", chunk.finish_reason or "")]
                if options.return_num_output_tokens:
                    outputs.append(tensor("num_output_tokens", [chunk.num_output_tokens], np.int32))
                if options.return_num_input_tokens:
                    outputs.append(tensor("num_input_tokens", [chunk.num_input_tokens], np.int32))
                if group.want_batch_index:
                    outputs.append(tensor("batch_index", [index], np.int32))
                if last:
                    group.closed = True
                    self._cancelled_keys.pop(group.key, None)
                group.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if last else 0)
        for seq_id in siblings:  # the other rows of a failed request stop too (unknown ids are ignored)
            self.service.cancel(seq_id)

    def finalize(self):
        for sampler in self._samplers:
            sampler.stop()
        self._admission.shutdown(wait=False, cancel_futures=True)
        self.service.stop()


class DecodeMetrics:
    """KV blocks per pool, requests by state, offloaded requests, batch sizes, finish reasons."""

    def __init__(self, service: DecodeService, pools, ended: Counter[str] | None = None) -> None:
        self.service, self.pools = service, pools
        self.ended = ended if ended is not None else Counter()  # ends before decode held the request
        used = family("adrenaline_kv_blocks_used", "KV cache blocks in use, per pool", "GAUGE")
        total = family("adrenaline_kv_blocks_total", "KV cache blocks, per pool", "GAUGE")
        self.kv = {p: (used.Metric(labels={"pool": p}), total.Metric(labels={"pool": p})) for p in POOL_NAMES}
        requests = family("adrenaline_decode_requests", "requests held by decode, by state", "GAUGE")
        self.requests = {s: requests.Metric(labels={"state": s}) for s in ("running", "waiting")}
        self.offloaded = family("adrenaline_requests_offloaded",
                                "requests held by decode whose attention runs on the executor", "GAUGE").Metric()
        batch = family("adrenaline_decode_batch_size", "requests per decode step", "HISTOGRAM")
        self.batch = {r: batch.Metric(labels={"rows": r}, buckets=BATCH_BUCKETS) for r in ("all", "offloaded")}
        self.steps = family("adrenaline_decode_steps_total", "decode steps run", "COUNTER").Metric()
        kv_read = family("adrenaline_attention_kv_tokens_read_total",
                         "context tokens whose K/V decode attention read, summed over steps, per pool "
                         "(x adrenaline_kv_bytes_per_token = bytes read from that pool's GPU)", "COUNTER")
        self.kv_read = {p: kv_read.Metric(labels={"pool": p}) for p in POOL_NAMES}
        self.kv_bytes_per_token = family("adrenaline_kv_bytes_per_token",
                                         "bytes of K and V per token over all layers", "GAUGE").Metric()
        self._finished_family = family("adrenaline_requests_finished_total",
                                       "requests ended, by reason (refused or failed before decoding: error)",
                                       "COUNTER")
        self.finished: dict[str, object] = {}
        self.two_batch = family("adrenaline_decode_two_batch_steps_total",
                                "decode steps run as two interleaved batches (two-batch overlap: an all-offloaded "
                                "step cut in two, or a step's local rows and its offloaded rows)", "COUNTER").Metric()
        self.recovered = family("adrenaline_offload_recovered_total",
                                "offloaded requests moved to decode after an executor failure", "COUNTER").Metric()
        phases = family("adrenaline_decode_step_seconds_total",
                        "decode loop time by phase, summed over steps (device: the GPU's span of the steps)",
                        "COUNTER")
        self.phases = {p: phases.Metric(labels={"phase": p}) for p in StepTimes.PHASES}
        self.output = {
            "events": family("adrenaline_output_events_total", "token events the output threads have handled (sent)",
                             "COUNTER").Metric(),
            "responses": family("adrenaline_output_responses_total",
                                "streamed or final responses sent (fewer than events when senders merged "
                                "a request's tokens to catch up)", "COUNTER").Metric(),
            "send_s": family("adrenaline_output_send_seconds_total", "seconds spent sending responses",
                             "COUNTER").Metric(),
            "lag_s": family("adrenaline_output_lag_seconds_total",
                            "summed over responses: seconds from the decode step's event to the sent response",
                            "COUNTER").Metric(),
        }
        self.queued = family("adrenaline_output_queued_events",
                             "token events handed to the output threads whose responses are not out yet",
                             "GAUGE").Metric()
        self._seen = {"steps": 0, "recovered": 0, "two_batch": 0, "finished": {},
                      **{f"kv_read_{p}": 0 for p in POOL_NAMES},
                      **{f"phase_{p}": 0.0 for p in StepTimes.PHASES}, **{f"out_{k}": 0 for k in self.output}}

    def update(self) -> None:
        for name, (used, total) in self.kv.items():
            try:
                allocator = self.pools(name).allocator
                num_blocks, num_free = allocator.num_blocks, allocator.num_free
            except LookupError:  # the executor's pool not created yet
                continue
            used.set(num_blocks - num_free)
            total.set(num_blocks)
        scheduler, loop = self.service.scheduler, self.service.loop
        held = scheduler.snapshot()
        num_running = len(scheduler.running)
        self.requests["running"].set(num_running)
        self.requests["waiting"].set(len(held) - num_running)
        self.offloaded.set(sum(s.is_offloaded for s in held))
        sizes, loop.batch_sizes = loop.batch_sizes, []
        for local, offloaded in sizes:
            self.batch["all"].observe(local + offloaded)
            self.batch["offloaded"].observe(offloaded)
        self._add(self.steps, loop.num_steps, "steps")
        for p, metric in self.kv_read.items():
            self._add(metric, loop.kv_tokens_read[p], f"kv_read_{p}")
        kv = self.service.runner.pool.kv  # [L, 2, blocks, block_size, Hkv, D]
        self.kv_bytes_per_token.set(kv.shape[0] * 2 * kv.shape[4] * kv.shape[5] * kv.element_size())
        for p, metric in self.phases.items():
            self._add(metric, getattr(loop.times, p), f"phase_{p}")
        out = self.service.outputs.stats()
        for k, metric in self.output.items():
            self._add(metric, getattr(out, k), f"out_{k}")
        self.queued.set(self.service.outputs.queued())
        self._add(self.recovered, loop.num_recovered, "recovered")
        self._add(self.two_batch, self.service.runner.two_batch_steps, "two_batch")
        totals = Counter(scheduler.finished)
        totals.update(self.ended)
        for reason, count in totals.items():
            if reason not in self.finished:
                self.finished[reason] = self._finished_family.Metric(labels={"reason": reason})
            seen = self._seen["finished"].get(reason, 0)
            if count > seen:
                self.finished[reason].increment(count - seen)
                self._seen["finished"][reason] = count

    def _add(self, counter, value: int, key: str) -> None:
        if value > self._seen[key]:
            counter.increment(value - self._seen[key])
            self._seen[key] = value
