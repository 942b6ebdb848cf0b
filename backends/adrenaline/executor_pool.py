"""Decode's handle on the executor pool's allocator, across restarts of the executor's worker.

A restarted executor owns a new pool with every block free (a new generation, see supervisor.py),
so blocks of an earlier generation must never be freed into it: that would hand one block to two
requests. Decode holds executor block tables tagged with their generation
(adrenaline_py.engine.executor.tag_blocks); ``free`` returns blocks to their own generation's
pool while it is the live one and drops them otherwise (that pool died with its worker).
No Triton import: tested without tritonserver.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from adrenaline_py.config import EngineConfig
from adrenaline_py.engine.executor import executor_state, split_blocks
from adrenaline_py.kv_cache import BlockAllocator

log = logging.getLogger("adrenaline.executor_pool")


class ExecutorBlocks:
    """The allocator part of decode's executor pool: attach, free, and counts for metrics."""

    def __init__(self, engine: EngineConfig) -> None:
        self.engine = engine
        self.generation = -1  # none attached yet
        self.dropped = 0      # blocks not returned because their pool was gone
        self._allocator: BlockAllocator | None = None
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Attach the live generation's allocator if it is newer than the attached one."""
        state = executor_state(self.engine.run_dir)
        if state is None or state.generation <= self.generation:
            return
        allocator = BlockAllocator.attach(self.engine.run_dir, "executor", self.engine.num_executor_blocks)
        if executor_state(self.engine.run_dir) != state:  # restarted again while attaching
            return
        with self._lock:
            if state.generation > self.generation:
                self._allocator, self.generation = allocator, state.generation
        log.info("executor pool generation %d attached", state.generation)

    def free(self, blocks: list[int], reserved_tokens: int) -> None:
        generation, ids = split_blocks(blocks)
        with self._lock:
            allocator = self._allocator if generation == self.generation else None
            if allocator is None:
                self.dropped += len(ids)
        if allocator is None:
            log.info("not returning %d blocks of executor generation %d: that pool died with its worker",
                     len(ids), generation)
            return
        allocator.free(ids, reserved_tokens)

    def publish_generated(self, num_tokens: int) -> None:
        """Decode's generated-token count of its offloaded requests, into the live generation's pool
        (requests of a dead generation count there until decode moves them, at its next step)."""
        self._attached().publish_generated(num_tokens)

    def _attached(self) -> BlockAllocator:
        if self._allocator is None:
            raise LookupError("no executor pool attached yet")
        return self._allocator

    @property
    def num_blocks(self) -> int:
        return self._attached().num_blocks

    @property
    def num_free(self) -> int:
        return self._attached().num_free


@dataclass
class ExecutorPoolView:
    """What decode's ``pools("executor")`` returns: decode only frees there (and counts)."""

    allocator: ExecutorBlocks
