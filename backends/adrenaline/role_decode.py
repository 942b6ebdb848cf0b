"""The client entry (model `ensemble`) and continuous-batching decode, in one decoupled model.

Per request, on an admission thread: `preprocessing` (BLS) validates and tokenizes, `scheduler`
(BLS) picks the KV pool, reserves blocks and runs prefill; the request then joins the decode
loop (adrenaline_py/engine/decode.py) in this process, and output threads detokenize and send
its responses on its own sender — no Triton hop per token. Being the model the client calls
(not a step of Triton's ensemble platform, which in 2.51 does not pass a client's cancellation
on to a step already running) lets a closed stream or a gRPC cancel stop the request here.

Inputs: the client contract (docs/configuration.md), forwarded to preprocessing.
Outputs (per response): text_output BYTES [1] (a delta when streaming),
  num_output_tokens INT32 [1], num_input_tokens INT32 [1], finish_reason BYTES [1]
  ("" until the last response, then "stop" | "length"; failures arrive as errors)
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils
from common import (
    bytes_tensor,
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

from adrenaline_py.engine.decode import Sequence
from adrenaline_py.engine.executor import parse_pool_label, tag_blocks
from adrenaline_py.engine.output import ResponseChunk
from adrenaline_py.engine.service import DecodeService
from adrenaline_py.kv_cache import POOL_NAMES, KVPool
from adrenaline_py.loader import build_model, load_checkpoint
from adrenaline_py.placement import bind_role
from adrenaline_py.request import GenerationParams

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class RequestRejected(Exception):
    """A step before decode refused the request; its message goes to the client."""


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
        self._metrics = DecodeMetrics(self.service, self._pool)
        self._samplers = [Sampler(self._update_metrics), Sampler(self._sweep_cancelled, period_s=0.2)]
        # Admission threads wait in preprocessing, for KV room and for prefill.
        self._admission = ThreadPoolExecutor(max_workers=e.max_queued_requests + 2 * e.max_decode_batch,
                                             thread_name_prefix="admit")
        log.info("decode ready (pid %d)", os.getpid())

    def _sweep_cancelled(self) -> None:
        """Clients that went away (stream closed, gRPC cancel) free their KV within one sweep."""
        self.service.check_cancelled(lambda handle: handle[2].is_cancelled())

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
        handed_on = None
        try:
            pre = self._call("preprocessing", request.inputs(), ["input_ids", "generation_params"])
            sched = self._call("scheduler", [*pre.output_tensors(), internal_token_tensor(self.engine)],
                               ["input_ids", "generation_params", "first_token", "block_table", "kv_pool"],
                               decoupled=True)
            x = {t.name(): t.as_numpy() for t in sched.output_tensors()}
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
                handle=(sender, params.output, request),
            )
            handed_on = seq
            if pool == "executor":
                self.executor_blocks.refresh()  # a new generation: free this request's blocks there
            if request.is_cancelled():
                raise RequestRejected("request cancelled")
        except Exception as e:
            if handed_on is not None:  # blocks were reserved for it: give them back
                try:
                    self._pool(handed_on.pool).allocator.free(handed_on.block_table, handed_on.reserved_tokens)
                except Exception:
                    log.exception("could not free the blocks of a request that failed admission")
            if isinstance(e, RequestRejected):
                self._send_error(sender, str(e))
            else:
                log.exception("admission failed")
                self._send_error(sender, f"decode: {type(e).__name__}: {e}")
            return
        self.service.add(seq)

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

    @staticmethod
    def _send_error(sender, message: str) -> None:
        try:
            sender.send(error_response(message), flags=FINAL)
        except Exception:  # the client may be gone already
            log.warning("could not deliver error %r", message)

    def _send(self, handle, chunk: ResponseChunk) -> None:
        sender, options, _ = handle
        if chunk.error is not None:
            sender.send(error_response(chunk.error), flags=FINAL)
            return
        outputs = [bytes_tensor("text_output", chunk.text), bytes_tensor("finish_reason", chunk.finish_reason or "")]
        if options.return_num_output_tokens:
            outputs.append(tensor("num_output_tokens", [chunk.num_output_tokens], np.int32))
        if options.return_num_input_tokens:
            outputs.append(tensor("num_input_tokens", [chunk.num_input_tokens], np.int32))
        sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if chunk.is_final else 0)

    def finalize(self):
        for sampler in self._samplers:
            sampler.stop()
        self._admission.shutdown(wait=False, cancel_futures=True)
        self.service.stop()


class DecodeMetrics:
    """KV blocks per pool, requests by state, offloaded requests, batch sizes, finish reasons."""

    def __init__(self, service: DecodeService, pools) -> None:
        self.service, self.pools = service, pools
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
        self._finished_family = family("adrenaline_requests_finished_total", "requests ended by decode, by reason",
                                       "COUNTER")
        self.finished: dict[str, object] = {}
        self.recovered = family("adrenaline_offload_recovered_total",
                                "offloaded requests moved to decode after an executor failure", "COUNTER").Metric()
        self._seen = {"steps": 0, "recovered": 0, "finished": {}}

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
        self._add(self.recovered, loop.num_recovered, "recovered")
        for reason, count in list(scheduler.finished.items()):
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
