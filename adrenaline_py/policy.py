"""Offload admission policy: which new requests have their decode attention offloaded.

Modes: ``never``, ``always``, ``ratio:R`` (a deterministic share R of requests) and ``auto``, the
paper's load-aware offloading (Adrenaline, arXiv 2503.20552; design.md §1, technique 3). With the
bound OB in force (`adrenaline_py/profile.py`: OB = min(OB_mem, OB_comp)), a new request is
offloaded only if

- the executor's pool has room for its blocks now;
- (C1) counted at its *maximum* length (prompt + max_tokens), the offloaded load stays within OB
  of the local load: offloaded reserved tokens + the request's ≤ OB × local reserved tokens
  (the offloaded side never grows past what C1 counted, however long its requests decode);
- (C2) the *current* ratios stay within OB: offloaded current tokens + its prompt ≤ OB × local
  current tokens (attention time is proportional to the tokens it reads), and offloaded requests
  + 1 ≤ OB × local requests (the per-row work of the exchange).

The aim: the executor's attention, at its bandwidth, finishes no later than the local attention
it overlaps with. Without local load nothing is offloaded (OB × 0 = 0).

``spill`` applies the same rule only to what decode cannot hold: a new request stays local while
decode's pool has room for it, and goes to the executor (within OB: room, C1, C2) only when it has
not; a request that fits neither waits. Offloaded rows are not free: each costs decode the
exchange and its share of the 2-D graph buckets' padding, which short contexts do not repay
(ShareGPT on two H200s, docs/performance.md: `auto` offloaded 45 % of the rows below decode's KV
limit and its time per output token rose from 26 to 40 ms). ``spill`` equals ``never`` until
decode's memory binds, and adds the executor's memory after.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class PoolLoad:
    """What one KV pool holds now (read from its allocator: `engine/admission.py`)."""

    num_seqs: int            # requests holding blocks
    reserved_tokens: int     # sum of their prompt + max_tokens (maximum lengths)
    num_free_blocks: int
    current_tokens: int = 0  # sum of their current lengths (prompt + tokens generated so far)


class OffloadPolicy:
    def __init__(self, mode: str, bound: float = 1.0) -> None:
        self.mode = mode
        self.bound = bound
        self.ratio = float(mode.split(":", 1)[1]) if mode.startswith("ratio:") else None
        self._admitted = 0
        self._lock = threading.Lock()

    def should_offload(self, num_tokens: int, num_blocks: int, local: PoolLoad, remote: PoolLoad,
                       prompt_tokens: int | None = None) -> bool:
        """Whether a new request goes to the executor.

        ``num_tokens``: its maximum length (prompt + max_tokens); ``num_blocks``: the blocks it
        reserves; ``prompt_tokens``: its current length when it joins (its maximum when not given).
        """
        if self.mode == "never":
            return False
        if self.mode == "always":
            return True
        if self.ratio is not None:
            # Deterministic share: request i is offloaded when floor((i+1)R) > floor(iR).
            with self._lock:
                i = self._admitted
                self._admitted += 1
            return math.floor((i + 1) * self.ratio + 1e-9) > math.floor(i * self.ratio + 1e-9)
        if num_blocks > remote.num_free_blocks:
            return False
        if self.mode == "spill" and num_blocks <= local.num_free_blocks:
            return False  # decode holds it: local first
        current = num_tokens if prompt_tokens is None else prompt_tokens
        ob = self.bound
        c1 = remote.reserved_tokens + num_tokens <= ob * local.reserved_tokens
        c2 = (remote.current_tokens + current <= ob * local.current_tokens
              and remote.num_seqs + 1 <= ob * local.num_seqs)
        return c1 and c2

    @property
    def is_strict(self) -> bool:
        """Whether the decision must be kept when its pool is full (else fall back to the other).
        ``spill`` falls back from the executor to decode, never from decode to the executor past OB."""
        return self.mode in ("never", "always")

    @property
    def reconsiders(self) -> bool:
        """Whether a waiting request's pool is decided again at each try (the loads change meanwhile)."""
        return self.mode == "spill"
