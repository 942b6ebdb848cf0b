"""Paged KV cache: block accounting (`BlockAllocator`) kept apart from the KV tensors (`KVPool`).

There are two pools per server: ``decode`` (on the decode GPU, for local requests) and
``executor`` (on the prefill GPU, owned by the attention executor, for offloaded requests).
Each pool's tensor and its allocator state live in shared memory so that the roles in other
processes can use them: the scheduler allocates a request's blocks before prefill, prefill writes
the prompt's K/V into them, decode (or the executor) appends to them, decode frees them.
"""

from __future__ import annotations

import fcntl
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from adrenaline_py.config import EngineConfig, ModelConfig
from adrenaline_py.placement import Placement
from adrenaline_py.shm import attach_shared_tensor, create_shared_tensor

POOL_NAMES = ("decode", "executor")

# Allocator state (int64): header, then a stack of free block ids.
_NUM_BLOCKS, _NUM_FREE, _NUM_SEQS, _RESERVED_TOKENS = range(4)
_HEADER = 8


class BlockAllocator:
    """Free-list of KV blocks shared by processes; a file lock serialises updates.

    Also counts the sequences holding blocks and the tokens they reserved (prompt + max_tokens),
    which the offload policy reads.
    """

    def __init__(self, state: torch.Tensor, lock_path: Path) -> None:
        self._state = state
        self._lock_path = lock_path

    @classmethod
    def create(cls, run_dir: str | Path, pool: str, num_blocks: int) -> BlockAllocator:
        state = create_shared_tensor(run_dir, f"{pool}.alloc", (_HEADER + num_blocks,), torch.int64)
        state[_NUM_BLOCKS] = num_blocks
        state[_NUM_FREE] = num_blocks
        # Pop from the end: hand out low block ids first (deterministic, easy to read in logs).
        state[_HEADER:] = torch.arange(num_blocks - 1, -1, -1, dtype=torch.int64)
        lock = Path(run_dir) / f"{pool}.alloc.lock"
        lock.touch()
        return cls(state, lock)

    @classmethod
    def attach(cls, run_dir: str | Path, pool: str, num_blocks: int) -> BlockAllocator:
        state = attach_shared_tensor(run_dir, f"{pool}.alloc", (_HEADER + num_blocks,), torch.int64)
        return cls(state, Path(run_dir) / f"{pool}.alloc.lock")

    @contextmanager
    def _locked(self):
        with open(self._lock_path, "rb+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @property
    def num_blocks(self) -> int:
        return int(self._state[_NUM_BLOCKS])

    @property
    def num_free(self) -> int:
        return int(self._state[_NUM_FREE])

    @property
    def num_seqs(self) -> int:
        return int(self._state[_NUM_SEQS])

    @property
    def reserved_tokens(self) -> int:
        return int(self._state[_RESERVED_TOKENS])

    def allocate(self, num_blocks: int, reserved_tokens: int) -> list[int] | None:
        """Blocks for one sequence, or None when the pool cannot hold it now."""
        with self._locked():
            free = int(self._state[_NUM_FREE])
            if num_blocks > free:
                return None
            blocks = self._state[_HEADER + free - num_blocks : _HEADER + free].flip(0).tolist()
            self._state[_NUM_FREE] = free - num_blocks
            self._state[_NUM_SEQS] += 1
            self._state[_RESERVED_TOKENS] += reserved_tokens
            return blocks

    def free(self, blocks: list[int], reserved_tokens: int) -> None:
        with self._locked():
            free = int(self._state[_NUM_FREE])
            returned = torch.tensor(blocks, dtype=torch.int64)
            # A block already on the free stack (or twice in `blocks`) would later be handed out
            # to two sequences; the count alone misses this while other sequences hold blocks.
            if (
                free + len(blocks) > self.num_blocks
                or len(set(blocks)) != len(blocks)
                or bool(torch.isin(returned, self._state[_HEADER : _HEADER + free]).any())
            ):
                raise RuntimeError("double free of KV blocks")
            if bool(((returned < 0) | (returned >= self.num_blocks)).any()):
                raise RuntimeError(f"freeing KV block ids outside the pool: {blocks}")
            self._state[_HEADER + free : _HEADER + free + len(blocks)] = returned.flip(0)
            self._state[_NUM_FREE] = free + len(blocks)
            self._state[_NUM_SEQS] -= 1
            self._state[_RESERVED_TOKENS] -= reserved_tokens


@dataclass
class KVPool:
    """KV tensors of one pool plus its allocator.

    ``kv``: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]; a token's slot is
    ``block_id * block_size + offset``.
    """

    name: str
    kv: torch.Tensor
    allocator: BlockAllocator
    block_size: int

    @staticmethod
    def shape(model: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (model.num_hidden_layers, 2, num_blocks, block_size, model.num_key_value_heads, model.head_dim)

    @classmethod
    def create(cls, name: str, model: ModelConfig, engine: EngineConfig, dtype: torch.dtype) -> KVPool:
        """Owner side (decode for ``decode``, the attention executor for ``executor``)."""
        num_blocks = _pool_blocks(name, engine)
        kv = create_shared_tensor(engine.run_dir, f"{name}.kv", cls.shape(model, num_blocks, engine.block_size), dtype,
                                  Placement.of(engine).pool_device(name))
        allocator = BlockAllocator.create(engine.run_dir, name, num_blocks)
        return cls(name, kv, allocator, engine.block_size)

    @classmethod
    def attach(cls, name: str, model: ModelConfig, engine: EngineConfig, dtype: torch.dtype) -> KVPool:
        """Another role's pool, as a tensor of this thread's device (through NVLink if it lives on the other GPU)."""
        num_blocks = _pool_blocks(name, engine)
        kv = attach_shared_tensor(engine.run_dir, f"{name}.kv", cls.shape(model, num_blocks, engine.block_size), dtype)
        allocator = BlockAllocator.attach(engine.run_dir, name, num_blocks)
        return cls(name, kv, allocator, engine.block_size)

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot ids of token positions [start, end) of a sequence."""
        pos = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size


def _pool_blocks(name: str, engine: EngineConfig) -> int:
    if name == "decode":
        return engine.num_decode_blocks
    if name == "executor":
        return engine.num_executor_blocks
    raise ValueError(f"unknown KV pool {name!r}")


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)
