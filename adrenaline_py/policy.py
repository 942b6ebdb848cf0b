"""Offload admission policy: which new requests have their decode attention offloaded.

``auto`` is a first version of the paper's load-aware rule (§3 of design.md): offload a request
only if (C1) counted at its maximum length the offloaded load stays within the bound OB of the
local load, and (C2) the offloaded batch stays within OB of the local batch, so that remote
attention can hide behind local attention; and only while the executor's pool has room.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class PoolLoad:
    num_seqs: int          # requests holding blocks
    reserved_tokens: int   # sum of their prompt + max_tokens
    num_free_blocks: int


class OffloadPolicy:
    def __init__(self, mode: str, bound: float = 1.0) -> None:
        self.mode = mode
        self.bound = bound
        self.ratio = float(mode.split(":", 1)[1]) if mode.startswith("ratio:") else None
        self._admitted = 0
        self._lock = threading.Lock()

    def should_offload(self, num_tokens: int, num_blocks: int, local: PoolLoad, remote: PoolLoad) -> bool:
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
        load_ok = remote.reserved_tokens + num_tokens <= self.bound * local.reserved_tokens  # C1
        batch_ok = remote.num_seqs + 1 <= self.bound * local.num_seqs                        # C2
        return load_ok and batch_ok

    @property
    def is_strict(self) -> bool:
        """Whether the decision must be kept when its pool is full (else fall back to the other)."""
        return self.mode in ("never", "always")
