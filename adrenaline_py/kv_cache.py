"""Paged KV cache: block accounting (`BlockAllocator`) kept apart from the KV tensors (`KVPool`).

There are two pools per server: ``decode`` (on the decode GPU, for local requests) and
``executor`` (on the prefill GPU, owned by the attention executor, for offloaded requests).
Each pool's tensor and its allocator state live in shared memory so that the roles in other
processes can use them: the scheduler allocates a request's blocks before prefill, prefill writes
the prompt's K/V into them, decode (or the executor) appends to them, decode frees them.

On cuda the pools' sizes come from the GPUs' memory (`plan_pool_blocks`, called once by the
launcher before any role starts, so that every process attaches the same sizes and a restarted
executor re-creates the same pool); docs/configuration.md has the budget formula.
"""

from __future__ import annotations

import fcntl
import math
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from adrenaline_py.config import EngineConfig, ModelConfig
from adrenaline_py.placement import Placement
from adrenaline_py.shm import attach_shared_tensor, create_shared_tensor

POOL_NAMES = ("decode", "executor")

# Allocator state (int64): header, a stack of free block ids, then per block the prompt length of
# the sequence whose table starts with that block (so that `free` needs no more than the table).
_NUM_BLOCKS, _NUM_FREE, _NUM_SEQS, _RESERVED_TOKENS, _PROMPT_TOKENS, _GENERATED_TOKENS, _STEP_US = range(7)
_HEADER = 8


class BlockAllocator:
    """Free-list of KV blocks shared by processes; a file lock serialises updates.

    Also counts what the offload policy reads: the sequences holding blocks, the tokens they
    reserved (prompt + max_tokens) and their current length (`current_tokens`: the prompts, kept here
    under the lock, plus the tokens decode generated so far, which decode publishes once per step
    with `publish_generated` — one store, no lock, off the per-layer path).
    """

    def __init__(self, state: torch.Tensor, lock_path: Path) -> None:
        self._state = state
        self._lock_path = lock_path
        self._view = state.numpy()  # the same shared memory, for lock-free single-slot stores

    @staticmethod
    def _state_shape(num_blocks: int) -> tuple[int]:
        return (_HEADER + 2 * num_blocks,)

    @classmethod
    def create(cls, run_dir: str | Path, pool: str, num_blocks: int) -> BlockAllocator:
        state = create_shared_tensor(run_dir, f"{pool}.alloc", cls._state_shape(num_blocks), torch.int64)
        state[_NUM_BLOCKS] = num_blocks
        state[_NUM_FREE] = num_blocks
        # Pop from the end: hand out low block ids first (deterministic, easy to read in logs).
        state[_HEADER : _HEADER + num_blocks] = torch.arange(num_blocks - 1, -1, -1, dtype=torch.int64)
        lock = Path(run_dir) / f"{pool}.alloc.lock"
        lock.touch()
        return cls(state, lock)

    @classmethod
    def attach(cls, run_dir: str | Path, pool: str, num_blocks: int) -> BlockAllocator:
        state = attach_shared_tensor(run_dir, f"{pool}.alloc", cls._state_shape(num_blocks), torch.int64)
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

    @property
    def current_tokens(self) -> int:
        """Current length of the sequences holding blocks: prompts + tokens generated so far."""
        return int(self._view[_PROMPT_TOKENS]) + int(self._view[_GENERATED_TOKENS])

    def publish_generated(self, num_tokens: int) -> None:
        """Set the tokens generated so far by the sequences in this pool (decode's loop is the one writer)."""
        self._view[_GENERATED_TOKENS] = num_tokens

    def publish_step_time(self, seconds: float) -> None:
        """Set decode's recent time between steps (0 while it is idle); decode's loop is the one writer."""
        self._view[_STEP_US] = round(seconds * 1e6)

    @property
    def step_time_s(self) -> float:
        """Decode's recent time between steps, as it published it (admission's TPOT gate reads it)."""
        return int(self._view[_STEP_US]) / 1e6

    def allocate(self, num_blocks: int, reserved_tokens: int, prompt_tokens: int = 0) -> list[int] | None:
        """Blocks for one sequence, or None when the pool cannot hold it now.

        ``prompt_tokens`` (the sequence's length when it joins decode) counts in `current_tokens`
        until the sequence's blocks are freed.
        """
        with self._locked():
            free = int(self._state[_NUM_FREE])
            if num_blocks > free:
                return None
            blocks = self._state[_HEADER + free - num_blocks : _HEADER + free].flip(0).tolist()
            self._state[_NUM_FREE] = free - num_blocks
            self._state[_NUM_SEQS] += 1
            self._state[_RESERVED_TOKENS] += reserved_tokens
            if blocks and prompt_tokens:
                self._state[self._prompt_slot(blocks[0])] = prompt_tokens
                self._state[_PROMPT_TOKENS] += prompt_tokens
            return blocks

    def _prompt_slot(self, first_block: int) -> int:
        return _HEADER + self.num_blocks + first_block

    def free(self, blocks: list[int], reserved_tokens: int) -> None:
        """Give back one sequence's blocks (its whole table, first block first, as allocated)."""
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
            if blocks:
                slot = self._prompt_slot(blocks[0])
                self._state[_PROMPT_TOKENS] -= self._state[slot]
                self._state[slot] = 0


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
        shape = cls.shape(model, num_blocks, engine.block_size)
        device = Placement.of(engine).pool_device(name)
        if device.type == "cuda":
            _check_fits(name, math.prod(shape) * torch.empty((), dtype=dtype).element_size(), device)
        kv = create_shared_tensor(engine.run_dir, f"{name}.kv", shape, dtype, device)
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
    if name not in POOL_NAMES:
        raise ValueError(f"unknown KV pool {name!r}")
    blocks = engine.num_decode_blocks if name == "decode" else engine.num_executor_blocks
    if blocks is None:
        raise ValueError(f"the {name} pool's size was not resolved: the launcher sizes it from GPU memory "
                         "(adrenaline_py/profile.py: resolve_engine), or pass --num-decode-blocks / "
                         "--num-executor-blocks")
    return blocks


def _check_fits(name: str, nbytes: int, device: torch.device) -> None:
    """A clear error instead of an out-of-memory error deep in the driver (the size was planned from
    the memory free when the launcher started; something else may have taken it since)."""
    torch.cuda.empty_cache()  # the pool is a plain cuMemAlloc: memory torch keeps cached is not free for it
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > free:
        raise RuntimeError(f"the {name} KV pool needs {nbytes / GIB:.2f} GiB but {free / GIB:.2f} GiB are free on "
                           f"{device}: lower --gpu-memory-utilization or --num-{name}-blocks")


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)


# --- Pool sizes from GPU memory ------------------------------------------------------------------
#
# On cuda each pool gets what is left of its GPU's budget (gpu_memory_utilization x total memory,
# or the memory free at start if less) after the fixed costs of the roles on that GPU. Weights
# and the pools are exact; the rest are estimates, kept on the safe side:

MIB = 1 << 20
GIB = 1 << 30
#: per process with a CUDA context on a GPU: the context, loaded kernels (torch, Triton), cuBLAS workspace
CONTEXT_RESERVE_BYTES = 1 * GIB
#: CUDA graphs of the executor, or at least of decode (one memory pool shared by every bucket), beyond activations
GRAPH_RESERVE_BYTES = 512 * MIB
#: per decode graph and layer, beyond activations: 676 graphs of llama-2-7b (32 layers) at
#: --max-decode-batch 768 took 3.96 GiB on an H200 with 1.93 GiB of activations planned, 3.08 MiB a
#: graph (thirteenth session, docs/performance.md); rounded up, and scaled by the layers (each adds
#: its kernels to every graph)
DECODE_GRAPH_BYTES_PER_LAYER = 104 * 1024
#: activations are counted this many times: the caching allocator's fragmentation, kernels' workspaces
ACTIVATION_FACTOR = 2
#: decode's local recompute after an executor failure prefills packs of at most this many tokens
RECOMPUTE_PACK_TOKENS = 8192

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def dtype_bytes(dtype: str) -> int:
    return _DTYPE_BYTES[dtype]


def kv_block_bytes(model: ModelConfig, block_size: int, elem_bytes: int) -> int:
    """Bytes of one KV block: K and V of ``block_size`` tokens in every layer."""
    return 2 * model.num_hidden_layers * block_size * model.num_key_value_heads * model.head_dim * elem_bytes


def weight_bytes(model: ModelConfig, elem_bytes: int, max_positions: int = 0) -> int:
    """Bytes of one copy of the model (embeddings, layers, final norm, LM head unless tied) and its
    RoPE tables (cos and sin, fp32, ``max_positions`` rows)."""
    h, d = model.hidden_size, model.head_dim
    attn = h * (model.num_attention_heads + 2 * model.num_key_value_heads) * d + model.num_attention_heads * d * h
    per_layer = attn + 3 * h * model.intermediate_size + 2 * h
    embeddings = model.vocab_size * h * (1 if model.tie_word_embeddings else 2)
    params = model.num_hidden_layers * per_layer + embeddings + h
    return params * elem_bytes + 2 * max_positions * d * 4


def activation_bytes(model: ModelConfig, tokens: int, rows: int, elem_bytes: int) -> int:
    """Peak temporaries of one forward pass over ``tokens`` tokens that samples ``rows`` rows.

    Layers run one after another and reuse the caching allocator's blocks, so the peak is one
    layer's: attention (hidden, residual, normed input, q/k/v, output) or the MLP (hidden, residual,
    normed input, gate+up, their product); plus fp32 logits of the sampled rows with the sampler's
    sorted copy and probabilities. Times ACTIVATION_FACTOR.
    """
    h, d = model.hidden_size, model.head_dim
    attn = 3 * h + (model.num_attention_heads + 2 * model.num_key_value_heads) * d + model.num_attention_heads * d
    mlp = 3 * h + 3 * model.intermediate_size
    logits = 3 * rows * model.vocab_size * 4
    return ACTIVATION_FACTOR * (tokens * max(attn, mlp) * elem_bytes + logits)


def blocks_for_memory(free_bytes: int, block_bytes: int, reserve_bytes: int = 0) -> int:
    """KV blocks that fit in ``free_bytes`` once ``reserve_bytes`` are kept for everything else."""
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be > 0, got {block_bytes}")
    return max(0, (free_bytes - reserve_bytes) // block_bytes)


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's memory as torch.cuda.mem_get_info reports it before the server starts."""

    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class PoolPlan:
    num_decode_blocks: int
    num_executor_blocks: int
    notes: tuple[str, ...]  # the budget of each GPU, for the launcher's log


def plan_pool_blocks(
    model: ModelConfig, engine: EngineConfig, gpus: Mapping[int, GpuMemory], executor_fraction: float,
    one_process: bool = False,
) -> PoolPlan:
    """Blocks of decode's pool (GPU D) and the executor's (GPU P) from the GPUs' memory.

    Per GPU: budget = min(gpu_memory_utilization x total, free), minus the fixed costs of the roles
    placed there (see `_fixed_costs`); a pool given explicitly in ``engine`` keeps its size and its
    bytes come off its GPU's budget. Two GPUs: each pool gets what is left on its own GPU. One GPU
    (all roles on it): what is left is split, ``executor_fraction`` of it to the executor's pool
    (the caller picks it from the offload mode; see profile.resolve_engine). Each pool holds at
    least one request of max_model_len (the smaller one is raised to that; a budget without room
    for both is an error). ``one_process``: every role in one process (`adrenaline generate`): one
    CUDA context per GPU, and one weight copy per GPU.
    """
    if not 0.0 <= executor_fraction <= 1.0:
        raise ValueError(f"executor_fraction must be in [0, 1], got {executor_fraction}")
    elem = dtype_bytes(engine.dtype)
    block = kv_block_bytes(model, engine.block_size, elem)
    minimum = engine.max_blocks_per_seq
    gpu_of = {"decode": engine.decode_gpu, "executor": engine.prefill_gpu}
    for gpu in set(gpu_of.values()):
        if gpu not in gpus:
            raise ValueError(f"no memory figures for GPU {gpu}")
    costs = _fixed_costs(model, engine, elem, one_process)
    left: dict[int, int] = {}
    notes = []
    for gpu in sorted(set(gpu_of.values())):
        mem = gpus[gpu]
        budget = min(int(engine.gpu_memory_utilization * mem.total_bytes), mem.free_bytes)
        fixed = sum(nbytes for (g, _), nbytes in costs.items() if g == gpu)
        left[gpu] = budget - fixed
        parts = ", ".join(f"{what} {nbytes / GIB:.2f}" for (g, what), nbytes in costs.items() if g == gpu)
        limit = "free memory" if budget == mem.free_bytes else f"{engine.gpu_memory_utilization:g} x total"
        notes.append(f"GPU {gpu}: budget {budget / GIB:.2f} GiB ({limit}; total {mem.total_bytes / GIB:.2f}, "
                     f"free {mem.free_bytes / GIB:.2f}) - fixed {fixed / GIB:.2f} GiB ({parts}) = "
                     f"{left[gpu] / GIB:.2f} GiB for KV; {block / MIB:.3f} MiB per block")
    given = {"decode": engine.num_decode_blocks, "executor": engine.num_executor_blocks}
    for name, blocks in given.items():
        if blocks is not None:
            left[gpu_of[name]] -= blocks * block
    blocks: dict[str, int] = {n: b for n, b in given.items() if b is not None}
    todo = [n for n in ("decode", "executor") if n not in blocks]
    if len(todo) == 2 and gpu_of["decode"] == gpu_of["executor"]:
        total = blocks_for_memory(left[gpu_of["decode"]], block)
        blocks["executor"] = max(minimum, int(executor_fraction * total))
        blocks["decode"] = max(minimum, total - blocks["executor"])
        if blocks["decode"] + blocks["executor"] > total:
            blocks["executor"] = total - blocks["decode"]  # below the minimum: the check below says so
    else:
        for name in todo:
            blocks[name] = blocks_for_memory(left[gpu_of[name]], block)
    for name in todo:
        if blocks[name] < minimum:
            raise ValueError(
                f"GPU {gpu_of[name]} has room for {max(blocks[name], 0)} KV blocks in the {name} pool, fewer than one "
                f"request of max_model_len {engine.max_model_len} needs ({minimum}); raise --gpu-memory-utilization, "
                f"lower --max-model-len / --max-prefill-tokens / --max-decode-batch, or free the GPU "
                f"({'; '.join(notes)})")
    return PoolPlan(blocks["decode"], blocks["executor"], tuple(notes))


def _decode_graphs(engine: EngineConfig) -> int:
    """How many graphs decode captures (none without CUDA graphs)."""
    if not engine.cuda_graphs:
        return 0
    from adrenaline_py.engine.cuda_graphs import captures_offloaded_steps, decode_graph_keys  # when planning

    return len(decode_graph_keys(engine.max_decode_batch, captures_offloaded_steps(engine),
                                 engine.two_batch_overlap != "off", engine.two_batch_min_rows))


def _fixed_costs(model: ModelConfig, engine: EngineConfig, elem: int, one_process: bool) -> dict[tuple[int, str], int]:
    """Bytes by (GPU, what) that are not KV pools.

    - decode (GPU D): its CUDA context, the weights, activations of the larger of a decode step of
      max_decode_batch rows and a recompute pack of RECOMPUTE_PACK_TOKENS tokens, its CUDA graphs
      (DECODE_GRAPH_BYTES_PER_LAYER per graph and layer, at least GRAPH_RESERVE_BYTES),
      and the exchange buffers (max_decode_batch x (2 Hq + 2 Hkv) x D);
    - prefill (GPU P): its context, its own copy of the weights (a process of its own), activations
      of a pack of max_prefill_tokens tokens sampling up to max_decode_batch rows;
    - executor (GPU P): its context and its CUDA graphs; it holds no weights.
    In one process, the roles of one GPU share one context and one weight copy.
    """
    d, p = engine.decode_gpu, engine.prefill_gpu
    weights = weight_bytes(model, elem, engine.max_model_len)
    rows = engine.max_decode_batch
    exchange = rows * 2 * (model.num_attention_heads + model.num_key_value_heads) * model.head_dim * elem
    costs: dict[tuple[int, str], int] = {}

    def add(gpu: int, what: str, nbytes: int) -> None:
        costs[(gpu, what)] = costs.get((gpu, what), 0) + nbytes

    if one_process:
        contexts = copies = Counter({d: 1, p: 1})  # one GPU: a single key
    else:
        contexts, copies = Counter({d: 1}), Counter({d: 1})  # decode
        contexts[p] += 2                                     # prefill worker, executor worker
        copies[p] += 1                                       # prefill's own weights
    for gpu, n in contexts.items():
        add(gpu, f"CUDA contexts x{n}", n * CONTEXT_RESERVE_BYTES)
    for gpu, n in copies.items():
        add(gpu, f"weights x{n}", n * weights)
    add(d, "decode activations", activation_bytes(model, max(rows, RECOMPUTE_PACK_TOKENS), rows, elem))
    graphs = _decode_graphs(engine) * model.num_hidden_layers * DECODE_GRAPH_BYTES_PER_LAYER
    add(d, "decode graphs", max(GRAPH_RESERVE_BYTES, graphs))
    add(d, "exchange buffers", exchange)
    add(p, "prefill activations", activation_bytes(model, engine.max_prefill_tokens, rows, elem))
    add(p, "executor graphs", GRAPH_RESERVE_BYTES)
    return costs
