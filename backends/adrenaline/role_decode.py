"""Continuous-batching decode (decoupled): the ensemble's streaming step.

`execute` only enqueues: the engine loop (adrenaline_py/engine/decode.py) runs steps in the
background and output threads detokenize and send each request's responses on its own sender.

Inputs (from the scheduler): input_ids INT32 [-1], generation_params BYTES [1],
  first_token INT32 [1], block_table INT32 [-1], kv_pool BYTES [1]
Outputs (per response): text_output BYTES [1] (a delta when streaming),
  num_output_tokens INT32 [1], num_input_tokens INT32 [1], finish_reason BYTES [1]
  ("" until the last response, then "stop" | "length"; failures arrive as errors)
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from common import (
    bytes_tensor,
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
from metrics import BATCH_BUCKETS, Sampler, family

from adrenaline_py.engine.decode import Sequence
from adrenaline_py.engine.output import ResponseChunk
from adrenaline_py.engine.service import DecodeService
from adrenaline_py.kv_cache import POOL_NAMES, KVPool
from adrenaline_py.loader import build_model, load_checkpoint
from adrenaline_py.request import GenerationParams

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Role:
    def initialize(self, args, config):
        self.engine = e = engine_config(config)
        setup_process("decode", e)
        ckpt = load_checkpoint(e.model)
        self.dtype = dtype_for(e)
        self.config = ckpt.config
        model = build_model(ckpt, self.dtype, device_for(e, e.decode_gpu), e.max_model_len, e.seed)
        ckpt.state_dict = None
        self.pools = {"decode": KVPool.create("decode", ckpt.config, e, self.dtype)}
        self.service = DecodeService(model, ckpt.tokenizer, e, self.dtype, self._pool, self._send)
        self._ids = itertools.count()
        self._metrics = DecodeMetrics(self.service, self._pool)
        self._samplers = [Sampler(self._metrics.update), Sampler(self._sweep_cancelled, period_s=0.2)]
        log.info("decode ready (pid %d)", os.getpid())

    def _sweep_cancelled(self) -> None:
        """Clients that went away (stream closed, gRPC cancel) free their KV within one sweep."""
        for seq in self.service.scheduler.snapshot():
            sender, _ = seq.handle
            if sender.is_cancelled():
                self.service.cancel(seq.seq_id)

    def _pool(self, name: str) -> KVPool:
        if name not in self.pools:  # the executor pool, attached when its first request arrives
            self.pools[name] = KVPool.attach(name, self.config, self.engine, self.dtype)
        return self.pools[name]

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                x = inputs_of(request)
                pool = text_of(x["kv_pool"])
                if pool not in POOL_NAMES:
                    raise ValueError(f"kv_pool must be one of {POOL_NAMES}, got {pool!r}")
                seq = Sequence(
                    seq_id=next(self._ids),
                    prompt_ids=x["input_ids"].reshape(-1).tolist(),
                    output_ids=[int(x["first_token"].reshape(-1)[0])],
                    block_table=x["block_table"].reshape(-1).tolist(),
                    pool=pool,
                    params=GenerationParams.from_json(text_of(x["generation_params"])),
                )
                seq.handle = (sender, seq.params.output)
                self._pool(pool)  # attach the executor's pool now: decode frees the request's blocks
            except Exception as e:
                sender.send(error_response(f"decode: bad request: {e}"), flags=FINAL)
                continue
            self.service.add(seq)
        return None

    def _send(self, handle, chunk: ResponseChunk) -> None:
        sender, options = handle
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
            except Exception:  # the executor's pool not created yet
                continue
            used.set(allocator.num_blocks - allocator.num_free)
            total.set(allocator.num_blocks)
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
