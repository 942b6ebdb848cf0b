"""Continuous-batching decode with attention offloading.

NOTE on the loop: one step is three calls, ``plan = scheduler.schedule()``,
``tokens = runner.run(plan)``, ``events = scheduler.update(plan, tokens)``. A request arrives
with its prompt already in a KV pool (written by prefill) and its first token sampled; its blocks
were allocated by the admission scheduler for prompt + max_tokens, so decode never allocates and
never preempts. Local rows come first in the batch, offloaded rows last. Text, stop strings and
client sends happen on output threads (adrenaline_py/engine/output.py), off this loop; a stop
string found there comes back as `abort`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from adrenaline_py.attention import AttentionBackend, DecodeMetadata, build_decode_metadata
from adrenaline_py.attention.offload import OffloadAttentionBackend, OffloadDecodeMetadata
from adrenaline_py.attention.triton_decode import TritonAttentionBackend
from adrenaline_py.engine.cuda_graphs import DecodeGraphs
from adrenaline_py.engine.prefill import PrefillItem, PrefillRunner
from adrenaline_py.kv_cache import KVPool, blocks_needed
from adrenaline_py.models.llama import LlamaForCausalLM
from adrenaline_py.placement import bind
from adrenaline_py.request import GenerationParams
from adrenaline_py.sampler import SamplingRow, sample
from adrenaline_py.transport import ExecutorGone, OffloadTransport

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity, not field-by-field comparison of token lists
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    output_ids: list[int]     # the first one was sampled by prefill
    block_table: list[int]
    pool: str                 # "decode" (local) or "executor" (offloaded)
    params: GenerationParams
    handle: Any = None        # the client's response channel, opaque to the engine
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.sampling.max_tokens

    @property
    def is_offloaded(self) -> bool:
        return self.pool == "executor"


@dataclass
class TokenEvent:
    """New tokens of one request, and how it ended if it did."""

    seq: Sequence
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None


@dataclass
class DecodePlan:
    local: list[Sequence] = field(default_factory=list)
    offloaded: list[Sequence] = field(default_factory=list)

    @property
    def seqs(self) -> list[Sequence]:
        return self.local + self.offloaded

    def __bool__(self) -> bool:
        return bool(self.local or self.offloaded)


def check_finished(seq: Sequence) -> str | None:
    s = seq.params.sampling
    # The sampler bans end ids until min_tokens are out, so any end id here ends the request.
    if seq.output_ids[-1] in s.end_ids:
        return "stop"
    if len(seq.output_ids) >= s.max_tokens:
        return "length"
    return None


class DecodeScheduler:
    def __init__(self, pools: Callable[[str], KVPool], max_batch: int) -> None:
        self._pools = pools
        self.max_batch = max_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._aborts: dict[int, tuple[str, str | None]] = {}
        self.finished: Counter[str] = Counter()  # finish reason → requests, for metrics
        self._lock = threading.Lock()
        self.has_work = threading.Condition(self._lock)

    def add(self, seq: Sequence) -> TokenEvent:
        """Admit a prefilled request; returns the event for its first token."""
        reason = check_finished(seq)
        if reason:
            seq.finish_reason = reason
            self.finished[reason] += 1
            self._free(seq)
            return TokenEvent(seq, list(seq.output_ids), reason)
        with self._lock:
            self.waiting.append(seq)
            self.has_work.notify()
        return TokenEvent(seq, list(seq.output_ids))

    def abort(self, seq_id: int, reason: str = "abort", error: str | None = None) -> None:
        with self._lock:
            self._aborts[seq_id] = (reason, error)
            self.has_work.notify()

    def snapshot(self) -> list[Sequence]:
        """The requests decode holds now (running first, then waiting)."""
        with self._lock:
            return [*self.running, *self.waiting]

    def num_unfinished(self) -> int:
        with self._lock:
            return len(self.waiting) + len(self.running)

    def wait_for_work(self, timeout: float) -> None:
        with self._lock:
            if not self.waiting and not self.running and not self._aborts:
                self.has_work.wait(timeout)

    def schedule(self) -> tuple[DecodePlan, list[TokenEvent]]:
        """This step's batch (local first, offloaded last) and the events of aborted requests."""
        events = []
        with self._lock:
            aborts, self._aborts = self._aborts, {}
            if aborts:
                kept = []
                for seq in [*self.running, *self.waiting]:
                    if seq.seq_id in aborts:
                        reason, error = aborts[seq.seq_id]
                        seq.finish_reason = reason
                        self.finished[reason] += 1
                        events.append(TokenEvent(seq, [], reason, error))
                    else:
                        kept.append(seq)
                running_ids = {s.seq_id for s in self.running}
                self.running = [s for s in kept if s.seq_id in running_ids]
                self.waiting = deque(s for s in kept if s.seq_id not in running_ids)
            while self.waiting and len(self.running) < self.max_batch:
                self.running.append(self.waiting.popleft())
            plan = DecodePlan(
                local=[s for s in self.running if not s.is_offloaded],
                offloaded=[s for s in self.running if s.is_offloaded],
            )
        for ev in events:
            self._free(ev.seq)
        return plan, events

    def update(self, plan: DecodePlan, tokens: list[int]) -> list[TokenEvent]:
        events = []
        finished = set()
        for seq, token in zip(plan.seqs, tokens):
            seq.output_ids.append(token)
            reason = check_finished(seq)
            events.append(TokenEvent(seq, [token], reason))
            if reason:
                seq.finish_reason = reason
                self.finished[reason] += 1
                finished.add(seq.seq_id)
                self._free(seq)
        if finished:
            with self._lock:
                self.running = [s for s in self.running if s.seq_id not in finished]
        return events

    def fail(self, seqs: list[Sequence], error: str) -> list[TokenEvent]:
        ids = {s.seq_id for s in seqs}
        with self._lock:
            self.running = [s for s in self.running if s.seq_id not in ids]
        for seq in seqs:
            seq.finish_reason = "error"
            self.finished["error"] += 1
            self._free(seq)
        return [TokenEvent(s, [], "error", error) for s in seqs]

    def migrate_to_local(self, seq: Sequence, block_table: list[int]) -> None:
        """Point an offloaded request at its recomputed KV in decode's pool."""
        try:
            self._free(seq)
        except RuntimeError as e:  # the executor came back with a fresh pool: nothing to return
            log.warning("could not return executor blocks of request %d: %s", seq.seq_id, e)
        seq.pool, seq.block_table = "decode", block_table

    def _free(self, seq: Sequence) -> None:
        self._pools(seq.pool).allocator.free(seq.block_table, seq.reserved_tokens)


class DecodeRunner:
    """Runs one decode step of the model over M local + N offloaded rows."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        local_backend: AttentionBackend,
        decode_pool: KVPool,
        transport: OffloadTransport,
        cuda_graphs: bool = False,
        max_model_len: int = 0,
        max_batch: int = 0,
    ) -> None:
        self.model = model
        self.pool = decode_pool
        self.transport = transport
        self.backend = OffloadAttentionBackend(local_backend, transport)
        self.device = model.lm_head.weight.device
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.device.type == "cuda" and isinstance(local_backend, TritonAttentionBackend):
            self.graphs = DecodeGraphs(model, self.backend, decode_pool.kv, max_batch, max_model_len,
                                       offload=transport.capturable)

    def run(self, plan: DecodePlan) -> list[int]:
        seqs = plan.seqs
        m, n = len(plan.local), len(plan.offloaded)
        key = self.graphs.buckets_for(m, n) if self.graphs is not None else None
        if n:  # the schedule goes first: the executor prepares its step while we prepare ours
            self.transport.begin_step([s.seq_id for s in plan.offloaded],
                                      {s.seq_id: s.block_table for s in plan.offloaded},
                                      [s.num_tokens for s in plan.offloaded])
        hidden = None
        if key is not None:
            hidden = self.graphs.run([s.seq_id for s in seqs], [s.output_ids[-1] for s in seqs],
                                     [s.num_tokens - 1 for s in seqs], [s.block_table for s in seqs],
                                     [s.num_tokens for s in seqs], num_local=m)
        if hidden is None:
            dev = self.device
            input_ids = torch.tensor([s.output_ids[-1] for s in seqs], dtype=torch.long, device=dev)
            positions = torch.tensor([s.num_tokens - 1 for s in seqs], dtype=torch.long, device=dev)
            local_meta = self._local_metadata(plan.local) if plan.local else None
            hidden = self.model(input_ids, positions, self.backend, OffloadDecodeMetadata(local_meta, m, n))
        logits = self.model.compute_logits(hidden)
        if n:
            self.transport.finish_step()  # raises ExecutorGone if the offloaded rows must be redone
        return sample(logits, [SamplingRow(s.params.sampling, s.output_ids) for s in seqs])

    def recompute_locally(self, seqs: list[Sequence]) -> tuple[list[tuple[Sequence, list[int]]], list[Sequence]]:
        """Rebuild offloaded requests' KV in decode's pool from prompt + generated tokens.

        Returns (request, new block table) for those that fit and the requests that did not.
        """
        moved, failed, items = [], [], []
        for seq in seqs:
            blocks = self.pool.allocator.allocate(blocks_needed(seq.reserved_tokens, self.pool.block_size),
                                                  seq.reserved_tokens)
            if blocks is None:
                failed.append(seq)
                continue
            moved.append((seq, blocks))
            # Every token before the one this step feeds already has K/V: recompute those.
            items.append(PrefillItem(seq.prompt_ids + seq.output_ids[:-1], "decode", blocks, seq.params.sampling))
        if items:
            runner = PrefillRunner(self.model, self.backend.local, {"decode": self.pool}, max_batch_tokens=8192)
            runner.run(items)
        return moved, failed

    def _local_metadata(self, seqs: list[Sequence]) -> DecodeMetadata:
        return build_decode_metadata(
            self.pool.kv, [s.block_table for s in seqs], [s.num_tokens for s in seqs], self.device
        )


class DecodeEngine:
    """The background loop; ``emit`` receives every `TokenEvent` (from the loop thread)."""

    def __init__(self, scheduler: DecodeScheduler, runner: DecodeRunner,
                 emit: Callable[[list[TokenEvent]], None]) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.emit = emit
        self.num_steps = 0
        self.num_recovered = 0     # offloaded requests moved to decode after an executor failure
        self.batch_sizes: list[tuple[int, int]] = []  # (local, offloaded) per step, drained by metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self.scheduler.has_work:
            self.scheduler.has_work.notify_all()
        self._thread.join(timeout)

    def add(self, seq: Sequence) -> None:
        self.emit([self.scheduler.add(seq)])

    def step(self) -> bool:
        plan, events = self.scheduler.schedule()
        if events:
            self.emit(events)
        if not plan:
            return False
        try:
            tokens = self.runner.run(plan)
        except ExecutorGone as e:
            # The executor is gone: recompute its requests' KV here and go on locally (those that
            # do not fit end with an error), then rerun the step; rewriting the same K/V into the
            # same slots is harmless for the local rows.
            log.error("attention executor lost (%s): moving %d requests to decode", e, len(plan.offloaded))
            moved, failed = self.runner.recompute_locally(plan.offloaded)
            for seq, blocks in moved:
                self.scheduler.migrate_to_local(seq, blocks)
            self.num_recovered += len(moved)
            if failed:
                self.emit(self.scheduler.fail(failed, f"attention executor failed ({e}) and decode has no KV room "
                                                      "to take over the request"))
            plan = DecodePlan(local=plan.local + [seq for seq, _ in moved])
            if not plan:
                return True
            tokens = self.runner.run(plan)
        self.num_steps += 1
        if len(self.batch_sizes) < 100_000:  # bounded if nobody drains it
            self.batch_sizes.append((len(plan.local), len(plan.offloaded)))
        self.emit(self.scheduler.update(plan, tokens))
        return True

    def _loop(self) -> None:
        bind(self.runner.device)
        while not self._stop.is_set():
            try:
                if not self.step():
                    self.scheduler.wait_for_work(timeout=0.5)
            except Exception as e:  # never let one bad step kill the loop silently
                log.exception("decode step failed")
                self.runner.transport.close()  # the executor lets go of a step we will not finish
                with self.scheduler.has_work:
                    running = list(self.scheduler.running) + list(self.scheduler.waiting)
                self.emit(self.scheduler.fail(running, f"decode step failed: {type(e).__name__}: {e}"))
                with self.scheduler.has_work:
                    self.scheduler.waiting.clear()
