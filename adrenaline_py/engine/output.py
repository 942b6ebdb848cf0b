"""Turn decode's token events into client responses, on threads off the decode loop.

Each request is pinned to one worker thread (by id), so its detokenizer state is touched by one
thread and its response sender is never used by two threads at once (that crashes tritonserver
2.51). Workers detokenize incrementally, apply stop strings (asking the engine to stop the
request), and call ``send(handle, chunk)`` for each response.

A worker that falls behind catches up by merging: it takes every event queued for it and sends one
response per request for all of that request's new tokens: new requests' first tokens first, then
the requests that end, then the running streams. A first token or an end that arrives while such a
round runs goes out before the rest of the round. A response through the Python backend costs
0.1-1 ms of a stub thread (docs/performance.md), so at a few hundred rows and tens of steps per
second one response per token can outrun the senders; merging bounds the sends to what they can
carry, and the decode loop never waits for a client.
Streams then arrive in chunks of a few tokens (``num_output_tokens`` says how many), as with vLLM's
``stream_interval``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adrenaline_py.engine.decode import TokenEvent
from adrenaline_py.tokenizer import OutputText, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class ResponseChunk:
    text: str
    num_output_tokens: int             # tokens this chunk covers (all of them when not streaming)
    num_input_tokens: int
    finish_reason: str | None = None   # set on the last chunk of a request
    error: str | None = None           # the request failed; text is empty

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _CancelCheck:
    is_cancelled: Callable[[Any], bool]
    on_cancel: Callable[[int], None]


class RequestOutput:
    """Per-request output state: text so far, what was sent, streaming or one final response."""

    def __init__(self, tokenizer: Tokenizer, event: TokenEvent) -> None:
        seq = event.seq
        self.handle = seq.handle
        self.stream = seq.params.output.stream
        self.text = OutputText(tokenizer, seq.prompt_ids, seq.params.sampling.stop)
        self.num_input_tokens = len(seq.prompt_ids)
        self.num_tokens = 0        # tokens accepted into the output (up to a stop string)
        self.num_unsent_tokens = 0
        self.prefix = "" if seq.params.output.exclude_input_in_output else tokenizer.decode(seq.prompt_ids)
        self.done = False

    def on_event(self, ev: TokenEvent) -> tuple[ResponseChunk | None, bool]:
        """The chunk to send now (if any), and whether a stop string just ended the request."""
        if self.done:
            return None, False
        if ev.error is not None or ev.finish_reason == "cancelled":
            self.done = True
            error = ev.error or "request cancelled"
            return ResponseChunk("", 0, self.num_input_tokens, "error", error), False
        final = ev.finish_reason is not None
        delta = ""
        if ev.token_ids:
            self.num_tokens += len(ev.token_ids)
            self.num_unsent_tokens += len(ev.token_ids)
            delta = self.text.add(ev.token_ids, final=final)
        elif final:
            delta = self.text.add([], final=True)
        stopped_here = self.text.stopped
        reason = "stop" if stopped_here else ev.finish_reason
        if reason is not None:
            self.done = True
        if self.stream:
            # One response per decode step even when the text is held back (a partial UTF-8
            # character, a possible stop string, a dummy model's bytes): clients and benchmarks
            # time tokens by responses, as with vLLM's per-step outputs (TTFT is the first one).
            if not delta and reason is None and not ev.token_ids:
                return None, False
            chunk = ResponseChunk(delta, self.num_unsent_tokens, self.num_input_tokens, reason)
            self.num_unsent_tokens = 0
            return chunk, stopped_here and not final
        if reason is None:
            return None, False
        return ResponseChunk(self.prefix + self.text.text, self.num_tokens, self.num_input_tokens, reason), (
            stopped_here and not final
        )


class HostGate:
    """Gives the decode loop's host work the GIL to itself.

    Output threads run Python (detokenizing, building responses) that competes with the decode
    loop for the GIL; every time the loop wants it back it waits behind them, so a step's host
    phases stretched 3-5x with a few hundred streams (docs/performance.md). The loop closes the
    gate for its host work and opens it while it waits for the GPU, which is most of a step; output
    threads pass the gate before each response and before each client they ask whether it left
    (an IPC to tritonserver). They wait at most ``max_wait_s`` (a loop that stays on the host, e.g.
    on CPU, never starves them).
    """

    def __init__(self, max_wait_s: float = 0.05) -> None:
        self._open = threading.Event()
        self._open.set()
        self.max_wait_s = max_wait_s

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    def wait(self) -> None:
        self._open.wait(self.max_wait_s)


def merge_events(events: list[TokenEvent]) -> list[TokenEvent]:
    """One event per request, in order of first appearance: its tokens joined, its end (if any) last."""
    merged: dict[int, TokenEvent] = {}
    for ev in events:
        seen = merged.get(ev.seq.seq_id)
        if seen is None:
            merged[ev.seq.seq_id] = TokenEvent(ev.seq, list(ev.token_ids), ev.finish_reason, ev.error)
        elif seen.finish_reason is None:  # nothing follows a request's end
            seen.token_ids += ev.token_ids
            seen.finish_reason, seen.error = ev.finish_reason, ev.error
    return list(merged.values())


@dataclass
class OutputStats:
    """What the output workers did, summed (one instance per worker; read by metrics)."""

    events: int = 0          # token events taken from decode
    responses: int = 0       # responses sent (fewer than events when a worker caught up by merging)
    send_s: float = 0.0      # time inside ``send``
    lag_s: float = 0.0       # per response: from decode's event (its first merged one) to the send's end

    def add(self, other: OutputStats) -> None:
        self.events += other.events
        self.responses += other.responses
        self.send_s += other.send_s
        self.lag_s += other.lag_s


class OutputWorkers:
    def __init__(
        self,
        tokenizer: Tokenizer,
        send: Callable[[Any, ResponseChunk], None],
        on_stop: Callable[[int], None],
        num_threads: int = 4,
        gate: HostGate | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._gate = gate
        self._send = send
        self._on_stop = on_stop
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(max(1, num_threads))]
        self._stats = [OutputStats() for _ in self._queues]  # one per worker: no lock on the hot path
        self._submitted = 0  # token events handed over (submit may run on several threads)
        self._submit_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, args=(q, stats), name=f"output-{i}", daemon=True)
            for i, (q, stats) in enumerate(zip(self._queues, self._stats))
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join(timeout=5)

    def check_cancelled(self, is_cancelled: Callable[[Any], bool], on_cancel: Callable[[int], None]) -> None:
        """Ask each worker to poll its unfinished requests' clients.

        Polling happens on the thread that sends the request's responses, so a client handle is
        never asked after its last response was sent (asking then crashes tritonserver 2.51).
        """
        for q in self._queues:
            q.put(_CancelCheck(is_cancelled, on_cancel))

    def submit(self, events: list[TokenEvent]) -> None:
        n, now = len(self._queues), time.perf_counter()
        with self._submit_lock:
            self._submitted += len(events)
        for ev in events:
            self._queues[ev.seq.seq_id % n].put((now, ev))

    def stats(self) -> OutputStats:
        total = OutputStats()
        for s in self._stats:
            total.add(s)
        return total

    def queued(self) -> int:
        """Token events handed over whose responses are not out yet (queued or being sent)."""
        return self._submitted - sum(s.events for s in self._stats)

    def _work(self, q: queue.SimpleQueue, stats: OutputStats) -> None:
        states: dict[int, RequestOutput] = {}
        carried: list = []   # items taken from the queue during a round, for the next round
        stopping = False
        while not stopping:
            items, carried = carried or [q.get()], []
            while True:  # whatever else is queued joins this round (a worker that fell behind)
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            events, first_seen = [], {}
            for item in items:
                if item is None:  # stop, after the events queued before it
                    stopping = True
                    break
                if isinstance(item, _CancelCheck):
                    self._check_cancelled(states, item)
                    continue
                at, ev = item
                events.append(ev)
                first_seen.setdefault(ev.seq.seq_id, at)
            batch = merge_events(events) if len(events) > 1 else events
            # New requests first (their first response is their time to first token), then requests
            # that end (their last response is their end-to-end latency and, with the first, their
            # TPOT), then running streams, where a later response only closes an inter-token gap.
            # The sort is stable: each kind keeps its order. vLLM's stream_interval also sends a
            # request's first and last outputs at once.
            batch.sort(key=lambda ev: (ev.seq.seq_id in states, ev.finish_reason is None))
            pending = deque(batch)
            while pending:
                if not stopping and pending[0].seq.seq_id in states:
                    # A round of running streams takes rows x a send (about 0.1 s at 700 rows): a
                    # request that arrived or ended meanwhile gets its response out now
                    carried = self._send_urgent(q, states, stats, pending, first_seen, carried)
                    if not pending:  # the round's last event went out with its request's end
                        break
                ev = pending.popleft()
                if self._gate is not None:
                    self._gate.wait()
                self._handle(states, ev, first_seen[ev.seq.seq_id], stats)
            stats.events += len(events)  # handled: their responses are out

    def _send_urgent(self, q: queue.SimpleQueue, states: dict[int, RequestOutput], stats: OutputStats,
                     pending: deque, first_seen: dict[int, float], carried: list) -> list:
        """Send what arrived since the round began and should not wait for the rest of it: new
        requests' first events, and the ends of running streams (joined with that stream's events
        still waiting in this round or taken earlier, so its order holds). Return ``carried`` with
        every other item taken, in order, for the next round."""
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                return carried
            if (carried and carried[-1] is None) or not isinstance(item, tuple):
                carried.append(item)  # a cancel check, the stop and all after it
                continue
            at, ev = item
            seq_id = ev.seq.seq_id
            if seq_id in states and ev.finish_reason is None:
                carried.append(item)  # a stream under way: its next response can wait for the round
                continue
            parts, taken = [], 0
            if seq_id in states:  # an end: gather the stream's unsent events, oldest first
                for queued in [e for e in pending if e.seq.seq_id == seq_id]:
                    pending.remove(queued)  # counted with its round's events
                    parts.append(queued)
                    at = min(at, first_seen[seq_id])
                for earlier in [c for c in carried if isinstance(c, tuple) and c[1].seq.seq_id == seq_id]:
                    carried.remove(earlier)
                    parts.append(earlier[1])
                    at = min(at, earlier[0])
                    taken += 1
            if parts:
                ev = merge_events([*parts, ev])[0]
            if self._gate is not None:
                self._gate.wait()
            self._handle(states, ev, at, stats)
            stats.events += 1 + taken

    def _check_cancelled(self, states: dict[int, RequestOutput], check: _CancelCheck) -> None:
        for seq_id, state in list(states.items()):
            if self._gate is not None:
                self._gate.wait()
            try:
                if not state.done and check.is_cancelled(state.handle):
                    check.on_cancel(seq_id)
            except Exception:
                log.exception("cancellation check of request %d failed", seq_id)

    def _handle(self, states: dict[int, RequestOutput], ev: TokenEvent, submitted_at: float,
                stats: OutputStats) -> None:
        seq_id = ev.seq.seq_id
        try:
            state = states.get(seq_id)
            if state is None:
                state = states[seq_id] = RequestOutput(self._tokenizer, ev)
            chunk, stopped = state.on_event(ev)
            if stopped:
                self._on_stop(seq_id)
            if chunk is not None:
                t = time.perf_counter()
                self._send(ev.seq.handle, chunk)
                done = time.perf_counter()
                stats.responses += 1
                stats.send_s += done - t
                stats.lag_s += done - submitted_at
        except Exception:  # a failed send must not take the worker down
            log.exception("sending output of request %d failed", seq_id)
        if ev.finish_reason is not None:
            states.pop(seq_id, None)
