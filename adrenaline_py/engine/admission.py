"""Admission: choose a request's KV pool (the offload decision) and reserve its blocks.

Blocks for prompt + max_tokens are taken before prefill runs, so prefill can write the prompt's
K/V straight into its final place and decode never runs out of blocks mid-request.

With a TPOT SLO (``--tpot-slo``) admission also waits while decode's steps are already close to it
(`STEP_GATE` of the SLO, as decode publishes its time between steps): every request admitted joins
decode's batch and lengthens every step, so past that point a new request would cost the running
ones their SLO. It waits as it waits for KV room (first come, first served, within the admission
timeout); decode's memory alone would let the batch grow until the steps miss the SLO (docs/
performance.md, sixth run).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from adrenaline_py.kv_cache import BlockAllocator, blocks_needed
from adrenaline_py.policy import OffloadPolicy, PoolLoad
from adrenaline_py.request import InvalidRequest


class AdmissionTimeout(RuntimeError):
    """No pool could hold the request within the admission timeout."""


class Overloaded(RuntimeError):
    """Too many requests already wait for KV room: rejected at once (bounded queue)."""


class RequestCancelled(RuntimeError):
    """The client cancelled the request before it was admitted."""


@dataclass(frozen=True)
class Ticket:
    pool: str               # "decode" or "executor"
    block_table: list[int]
    reserved_tokens: int
    # The allocator the blocks came from: the executor's pool may be re-created (a restarted
    # worker) while the request is in prefill, and its blocks must go back to their own pool.
    allocator: BlockAllocator | None = field(default=None, compare=False, repr=False)


CANCEL_CHECK_S = 0.1  # how often a request waiting for KV room asks whether its client left
STEP_GATE = 0.9       # admission waits while decode's time between steps is at least this share of the TPOT SLO


def _load(a: BlockAllocator) -> PoolLoad:
    return PoolLoad(a.num_seqs, a.reserved_tokens, a.num_free, a.current_tokens)


class Admission:
    def __init__(
        self,
        allocators: Callable[[str], BlockAllocator],
        policy: OffloadPolicy,
        block_size: int,
        timeout_s: float,
        poll_s: float = 0.005,
        max_waiting: int | None = None,
        executor_alive: Callable[[], bool] = lambda: True,
        tpot_slo_s: float | None = None,
    ) -> None:
        self._allocators = allocators
        self.policy = policy
        self.block_size = block_size
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.max_waiting = max_waiting
        self.executor_alive = executor_alive
        self.tpot_slo_s = tpot_slo_s
        self.num_held_for_tpot = 0  # requests that waited because decode's steps were near the TPOT SLO
        self._lock = threading.Lock()
        self._queue: deque[threading.Event] = deque()  # requests waiting for KV room, first come first served
        self.num_waiting = 0  # requests waiting for KV room now
        self.rejected: Counter[str] = Counter()  # reason → requests turned away

    def admit(self, num_prompt_tokens: int, max_tokens: int, cancelled: Callable[[], bool] = lambda: False) -> Ticket:
        """Reserve blocks for prompt + max_tokens in the pool the policy picks, waiting for room.

        Raises InvalidRequest (can never fit), Overloaded (too many waiting), AdmissionTimeout,
        RequestCancelled (the client went away while waiting).
        """
        reserved = num_prompt_tokens + max_tokens
        n = blocks_needed(reserved, self.block_size)
        order = self._order(reserved, n, num_prompt_tokens)
        capacity = {name: self._allocators(name).num_blocks for name in order}
        if self.policy.reconsiders and "executor" not in order and self._executor_up():
            capacity["executor"] = self._allocators("executor").num_blocks  # it may be chosen later
        if all(n > c for c in capacity.values()):
            self.rejected["too_large"] += 1
            raise InvalidRequest(
                f"request needs {n} KV blocks (prompt + max_tokens = {reserved} tokens), more than a pool holds "
                f"({max(capacity.values())} blocks)"
            )
        saturated = self.decode_saturated()
        if not self._queue and not saturated:  # nobody waits: no one to overtake
            ticket = self._try(order, capacity, n, reserved, num_prompt_tokens)
            if ticket is not None:
                return ticket
        self.num_held_for_tpot += saturated
        me = threading.Event()  # set when this request becomes the oldest waiting one
        with self._lock:
            if self.max_waiting is not None and self.num_waiting >= self.max_waiting:
                self.rejected["queue_full"] += 1
                raise Overloaded(f"server overloaded: {self.num_waiting} requests already wait for KV cache room "
                                 f"(limit {self.max_waiting}); retry later")
            self.num_waiting += 1
            self._queue.append(me)
            if self._queue[0] is me:
                me.set()
        try:
            deadline = time.monotonic() + self.timeout_s
            next_cancel_check = 0.0
            while True:
                # First come, first served: only the oldest waiting request polls the pools. When
                # every waiting request polled, the ones that saw room all took the pools' file lock
                # at once, and decode's frees waited behind them (26 ms per step at 1,000 waiting).
                first = me.wait(CANCEL_CHECK_S)  # woken once, by the request ahead leaving the queue
                if first:
                    time.sleep(self.poll_s)
                    if self.policy.reconsiders:  # decode's room and OB's margin change while we wait
                        order = self._order(reserved, n, num_prompt_tokens)
                    saturated = self.decode_saturated()
                    if not saturated and any(n <= self._allocators(name).num_free for name in order):  # no lock
                        ticket = self._try(order, capacity, n, reserved, num_prompt_tokens)
                        if ticket is not None:
                            return ticket
                now = time.monotonic()
                if now >= next_cancel_check:  # asking the client is an IPC round trip: not every poll
                    next_cancel_check = now + CANCEL_CHECK_S
                    if cancelled():
                        self.rejected["cancelled"] += 1
                        raise RequestCancelled("request cancelled while waiting for KV cache room")
                if now > deadline:
                    self.rejected["timeout"] += 1
                    if saturated:
                        raise AdmissionTimeout(
                            f"decode at its TPOT SLO ({self.tpot_slo_s * 1e3:.0f} ms per token) for "
                            f"{self.timeout_s:.0f}s: the request was not admitted; retry later")
                    raise AdmissionTimeout(
                        f"KV cache full: no room for {n} blocks within {self.timeout_s:.0f}s; retry later"
                    )
        finally:
            with self._lock:
                self.num_waiting -= 1
                self._queue.remove(me)
                if self._queue:
                    self._queue[0].set()

    def decode_saturated(self) -> bool:
        """Whether decode's steps are already near the TPOT SLO (never without one)."""
        if self.tpot_slo_s is None:
            return False
        return self._allocators("decode").step_time_s >= STEP_GATE * self.tpot_slo_s

    def _executor_up(self) -> bool:
        return self._uses_executor and self.executor_alive()

    def _order(self, reserved: int, n: int, prompt: int) -> list[str]:
        """The pools to try, in order, for a request of ``n`` blocks (``reserved`` tokens at most)."""
        local, remote = self._allocators("decode"), self._allocators("executor") if self._executor_up() else None
        if remote is None:
            return ["decode"]  # no executor (never, or it is down): everything runs locally
        offload = self.policy.should_offload(reserved, n, _load(local), _load(remote), prompt)
        if self.policy.is_strict:
            return ["executor"] if offload else ["decode"]
        if self.policy.reconsiders:  # spill: the executor only as the policy allows, decode as fallback
            return ["executor", "decode"] if offload else ["decode"]
        return ["executor", "decode"] if offload else ["decode", "executor"]

    def _try(self, order: list[str], capacity: dict[str, int], n: int, reserved: int, prompt: int) -> Ticket | None:
        for name in order:
            allocator = self._allocators(name)
            if n <= capacity.get(name, 0) and (blocks := allocator.allocate(n, reserved, prompt)) is not None:
                return Ticket(name, blocks, reserved, allocator)
        return None

    @property
    def _uses_executor(self) -> bool:
        return self.policy.mode != "never"

    def loads(self) -> dict[str, PoolLoad]:
        """What each pool holds now (the executor's only while it is up), as the policy sees it."""
        out = {"decode": _load(self._allocators("decode"))}
        if self._uses_executor and self.executor_alive():
            out["executor"] = _load(self._allocators("executor"))
        return out

    def release(self, ticket: Ticket) -> None:
        (ticket.allocator or self._allocators(ticket.pool)).free(ticket.block_table, ticket.reserved_tokens)
