"""Admission: choose a request's KV pool (the offload decision) and reserve its blocks.

Blocks for prompt + max_tokens are taken before prefill runs, so prefill can write the prompt's
K/V straight into its final place and decode never runs out of blocks mid-request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from adrenaline_py.kv_cache import BlockAllocator, blocks_needed
from adrenaline_py.policy import OffloadPolicy, PoolLoad
from adrenaline_py.request import InvalidRequest


class AdmissionTimeout(RuntimeError):
    """No pool could hold the request within the admission timeout."""


@dataclass(frozen=True)
class Ticket:
    pool: str               # "decode" or "executor"
    block_table: list[int]
    reserved_tokens: int


def _load(a: BlockAllocator) -> PoolLoad:
    return PoolLoad(a.num_seqs, a.reserved_tokens, a.num_free)


class Admission:
    def __init__(
        self,
        allocators: Callable[[str], BlockAllocator],
        policy: OffloadPolicy,
        block_size: int,
        timeout_s: float,
        poll_s: float = 0.005,
    ) -> None:
        self._allocators = allocators
        self.policy = policy
        self.block_size = block_size
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    def admit(self, num_prompt_tokens: int, max_tokens: int) -> Ticket:
        reserved = num_prompt_tokens + max_tokens
        n = blocks_needed(reserved, self.block_size)
        local, remote = self._allocators("decode"), self._allocators("executor") if self._uses_executor else None
        offload = self.policy.should_offload(
            reserved, n, _load(local), _load(remote) if remote else PoolLoad(0, 0, 0)
        )
        order = ["executor", "decode"] if offload else ["decode", "executor"]
        if self.policy.is_strict or remote is None:
            order = order[:1]
        capacity = {name: self._allocators(name).num_blocks for name in order}
        if all(n > c for c in capacity.values()):
            raise InvalidRequest(
                f"request needs {n} KV blocks (prompt + max_tokens = {reserved} tokens), more than a pool holds "
                f"({max(capacity.values())} blocks)"
            )
        deadline = time.monotonic() + self.timeout_s
        while True:
            for name in order:
                if n > capacity[name]:
                    continue
                blocks = self._allocators(name).allocate(n, reserved)
                if blocks is not None:
                    return Ticket(name, blocks, reserved)
            if time.monotonic() > deadline:
                raise AdmissionTimeout(
                    f"KV cache full: no room for {n} blocks within {self.timeout_s:.0f}s; retry later"
                )
            time.sleep(self.poll_s)

    @property
    def _uses_executor(self) -> bool:
        return self.policy.mode != "never"

    def release(self, ticket: Ticket) -> None:
        self._allocators(ticket.pool).free(ticket.block_table, ticket.reserved_tokens)
