"""`BlockAllocator`: block accounting in shared memory, seen alike by every attached process."""

import dataclasses
import multiprocessing
import re

import pytest

from adrenaline_py.config import NAMED_SHAPES, EngineConfig
from adrenaline_py.kv_cache import (
    BlockAllocator,
    GpuMemory,
    activation_bytes,
    blocks_for_memory,
    blocks_needed,
    kv_block_bytes,
    plan_pool_blocks,
    weight_bytes,
)


@pytest.fixture
def alloc(tmp_path):
    return BlockAllocator.create(tmp_path, "decode", 8)


def counters(a):
    return a.num_free, a.num_seqs, a.reserved_tokens


def test_new_allocator_is_empty(alloc):
    assert alloc.num_blocks == 8
    assert counters(alloc) == (8, 0, 0)


def test_allocate_hands_out_low_ids_first_and_counts(alloc):
    first = alloc.allocate(3, 40)
    second = alloc.allocate(2, 25)
    assert first == [0, 1, 2]
    assert second == [3, 4]
    assert counters(alloc) == (3, 2, 65)


def test_free_returns_blocks_and_counters(alloc):
    a = alloc.allocate(3, 40)
    b = alloc.allocate(4, 50)
    alloc.free(a, 40)
    assert counters(alloc) == (4, 1, 50)
    alloc.free(b, 50)
    assert counters(alloc) == (8, 0, 0)


def test_blocks_of_live_sequences_are_disjoint_and_reused_after_free(alloc):
    a = alloc.allocate(3, 1)
    b = alloc.allocate(3, 1)
    assert not set(a) & set(b)
    alloc.free(a, 1)
    c = alloc.allocate(5, 1)
    assert c is not None and not set(c) & set(b)
    assert sorted(b + c) == list(range(8))


def test_allocate_returns_none_when_the_pool_cannot_hold_it(alloc):
    assert alloc.allocate(9, 100) is None
    assert counters(alloc) == (8, 0, 0)
    assert alloc.allocate(8, 100) == list(range(8))
    assert alloc.allocate(1, 1) is None
    assert counters(alloc) == (0, 1, 100)


def test_double_free_raises_when_the_pool_would_overflow(alloc):
    a = alloc.allocate(3, 10)
    alloc.free(a, 10)
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free(a, 10)
    assert counters(alloc) == (8, 0, 0)


def test_double_free_raises_while_other_sequences_hold_blocks(alloc):
    a = alloc.allocate(2, 10)
    b = alloc.allocate(2, 10)
    alloc.free(a, 10)
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free(a, 10)
    assert counters(alloc) == (6, 1, 10)
    # The free list is intact: the remaining six blocks are handed out once each.
    rest = alloc.allocate(6, 1)
    assert sorted(rest + b) == list(range(8))


def test_freeing_the_same_block_twice_in_one_call_raises(alloc):
    alloc.allocate(2, 10)
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free([0, 0], 10)


def test_two_objects_on_the_same_run_dir_share_state(tmp_path):
    owner = BlockAllocator.create(tmp_path, "executor", 6)
    other = BlockAllocator.attach(tmp_path, "executor", 6)
    a = owner.allocate(2, 30)
    assert counters(other) == (4, 1, 30)
    b = other.allocate(4, 5)
    assert not set(a) & set(b)
    assert owner.allocate(1, 1) is None
    owner.free(b, 5)
    assert counters(other) == (4, 1, 30)


def test_pools_of_one_run_dir_are_independent(tmp_path):
    decode = BlockAllocator.create(tmp_path, "decode", 4)
    executor = BlockAllocator.create(tmp_path, "executor", 4)
    decode.allocate(4, 8)
    assert counters(executor) == (4, 0, 0)


def test_attach_with_the_wrong_size_fails(tmp_path):
    BlockAllocator.create(tmp_path, "decode", 4)
    with pytest.raises(RuntimeError, match="bytes"):
        BlockAllocator.attach(tmp_path, "decode", 5)


def _child(run_dir, rounds, queue):
    a = BlockAllocator.attach(run_dir, "decode", 64)
    kept = []
    for i in range(rounds):
        blocks = a.allocate(2, 3)
        if i % 2:
            a.free(blocks, 3)
        else:
            kept.append(blocks)
    queue.put(kept)


def test_a_spawned_process_sees_and_updates_the_same_state(tmp_path):
    parent = BlockAllocator.create(tmp_path, "decode", 64)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(str(tmp_path), 20, queue))
    proc.start()
    mine = []
    for i in range(20):  # race the child: the file lock must keep the free list consistent
        blocks = parent.allocate(1, 2)
        if i % 2:
            parent.free(blocks, 2)
        else:
            mine.append(blocks)
    theirs = queue.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    held = [b for blocks in mine + theirs for b in blocks]
    assert len(held) == len(set(held)) == 10 * 1 + 10 * 2
    assert counters(parent) == (64 - 30, 20, 10 * 2 + 10 * 3)


def test_blocks_needed_rounds_up():
    assert [blocks_needed(n, 16) for n in (1, 15, 16, 17, 32, 33)] == [1, 1, 1, 2, 2, 3]


# --- current lengths ---------------------------------------------------------------------------

def test_prompts_count_as_current_tokens_until_freed(alloc):
    a = alloc.allocate(3, 40, prompt_tokens=30)
    b = alloc.allocate(2, 25, prompt_tokens=20)
    assert alloc.current_tokens == 50
    alloc.publish_generated(7)              # decode's count of generated tokens, one store
    assert alloc.current_tokens == 57
    alloc.free(a, 40)                       # the prompt recorded under a's first block goes with it
    assert alloc.current_tokens == 27
    alloc.publish_generated(0)
    alloc.free(b, 25)
    assert (alloc.current_tokens, *counters(alloc)) == (0, 8, 0, 0)
    c = alloc.allocate(3, 10)               # no prompt given: counts nothing
    assert alloc.current_tokens == 0
    alloc.free(c, 10)


# --- pool sizes from GPU memory ------------------------------------------------------------------
# llama-2-7b in bfloat16, block 16, max_model_len 4096, 64 decode rows, 8192 prefill tokens, on GPUs of
# 80 GiB: budget int(0.9 × 80 GiB) = 77309411328 bytes. Pieces (kv_cache.py):
#   block      2 × 32 layers × 16 × 32 heads × 128 × 2 B                  = 8388608 (8 MiB)
#   weights    6738415616 params × 2 B + RoPE 2 × 4096 × 128 × 4 B         = 13481025536
#   activations (8192 tokens) 2 × (8192 × max(28672, 45312) × 2 B + 3 × 64 × 32000 × 4 B) = 1533935616
#   exchange   64 × 2 × (32 + 32) × 128 × 2 B                              = 2097152
#   context 1 GiB per process, graphs 512 MiB per role
# GPU D: 1 GiB + weights + activations + 512 MiB + exchange = 16627671040 → (77309411328 - 16627671040) // 8 MiB = 7233
# GPU P: 2 GiB + weights + activations + 512 MiB            = 17699315712 → 7106
# one GPU (3 processes, 2 weight copies, both activations and graphs, exchange) = 34326986752 → 5123 blocks

GIB = 1 << 30
LLAMA7B = NAMED_SHAPES["llama-2-7b"]
H80 = GpuMemory(free_bytes=80 * GIB, total_bytes=80 * GIB)


def cuda_engine(**kw):
    base = dict(model="dummy:llama-2-7b", device="cuda", dtype="bfloat16", max_model_len=4096, max_tokens_limit=1024,
                max_decode_batch=64, max_prefill_tokens=8192, block_size=16, gpu_memory_utilization=0.9)
    base.update(kw)
    return EngineConfig(**base)


def test_block_bytes_and_blocks_for_memory():
    assert kv_block_bytes(LLAMA7B, 16, 2) == 8 * 2**20
    assert kv_block_bytes(NAMED_SHAPES["tiny"], 16, 4) == 2 * 2 * 16 * 2 * 16 * 4
    assert blocks_for_memory(10 * GIB, 8 * 2**20, 2 * GIB) == 1024
    assert blocks_for_memory(10 * GIB + 8 * 2**20 - 1, 8 * 2**20, 2 * GIB) == 1024   # whole blocks only
    assert blocks_for_memory(GIB, 8 * 2**20, 2 * GIB) == 0
    with pytest.raises(ValueError):
        blocks_for_memory(GIB, 0)


def test_weight_bytes_are_the_models_parameters():
    import torch

    from adrenaline_py.models.llama import LlamaForCausalLM

    for name in ("tiny", "llama-2-7b", "llama-3.1-8b"):
        with torch.device("meta"):
            model = LlamaForCausalLM(NAMED_SHAPES[name], max_positions=64)
        assert weight_bytes(NAMED_SHAPES[name], 2) == 2 * sum(p.numel() for p in model.parameters())
    assert weight_bytes(LLAMA7B, 2, 4096) == 13481025536


def test_activation_bytes_by_hand():
    # tiny: attention 3×64 + (4 + 4)×16 + 4×16 = 384, MLP 3×64 + 3×128 = 576 per token;
    # 2 × (100 tokens × 576 × 2 B + 3 × 2 rows × 512 × 4 B) = 254976
    assert activation_bytes(NAMED_SHAPES["tiny"], 100, 2, 2) == 254976
    assert activation_bytes(LLAMA7B, 8192, 64, 2) == 1533935616


def test_two_gpus_each_pool_gets_what_its_gpu_has_left():
    plan = plan_pool_blocks(LLAMA7B, cuda_engine(prefill_gpu=0, decode_gpu=1), {0: H80, 1: H80}, 0.3)
    assert (plan.num_decode_blocks, plan.num_executor_blocks) == (7233, 7106)
    assert len(plan.notes) == 2 and plan.notes[0].startswith("GPU 0: budget 72.00 GiB")


def test_free_memory_bounds_the_budget():
    busy = GpuMemory(free_bytes=60 * GIB, total_bytes=80 * GIB)   # another tenant holds 20 GiB
    plan = plan_pool_blocks(LLAMA7B, cuda_engine(prefill_gpu=0, decode_gpu=1), {0: H80, 1: busy}, 0.3)
    assert plan.num_decode_blocks == (60 * GIB - 16627671040) // (8 * 2**20) == 5697
    assert "free memory" in plan.notes[1]


@pytest.mark.parametrize("fraction, executor", [(0.3, 1536), (0.0, 256), (1.0, 5123 - 256)])
def test_one_gpu_splits_what_is_left(fraction, executor):
    # 5123 blocks in all; the executor gets int(fraction × 5123), and each pool at least one request of
    # max_model_len (4096 / 16 = 256 blocks)
    plan = plan_pool_blocks(LLAMA7B, cuda_engine(), {0: H80}, fraction)
    assert (plan.num_executor_blocks, plan.num_decode_blocks) == (executor, 5123 - executor)


def test_one_process_shares_context_and_weights():
    # adrenaline generate: 1 context and 1 weight copy; both activations and graphs, exchange: 6986 blocks
    plan = plan_pool_blocks(LLAMA7B, cuda_engine(), {0: H80}, 0.0, one_process=True)
    assert plan.num_decode_blocks + plan.num_executor_blocks == 6986


def test_an_explicit_pool_keeps_its_size_and_the_other_gets_the_rest():
    plan = plan_pool_blocks(LLAMA7B, cuda_engine(num_executor_blocks=1000), {0: H80}, 0.3)
    assert (plan.num_decode_blocks, plan.num_executor_blocks) == (5123 - 1000, 1000)


def _note_term(plan, term: str) -> str:
    """The figure of one fixed cost in the plan's notes (e.g. "decode graphs 2.15")."""
    return next(re.search(rf"{term} ([0-9.]+)", n).group(0) for n in plan.notes if term in n)


def test_decode_graphs_are_reserved_by_their_count_and_layers():
    """104 KiB per decode graph and layer, at least 512 MiB: 66 graphs at 64 rows keep the floor; 676
    at 768 rows (2.0 GiB measured on an H200 beyond activations) reserve 2.15 GiB; without CUDA graphs
    or with --offload never (local buckets only: 31 graphs) the floor."""
    two = dict(prefill_gpu=0, decode_gpu=1)
    small = plan_pool_blocks(LLAMA7B, cuda_engine(**two), {0: H80, 1: H80}, 0.3)
    assert _note_term(small, "decode graphs") == "decode graphs 0.50"
    large = plan_pool_blocks(LLAMA7B, cuda_engine(**two, max_decode_batch=768), {0: H80, 1: H80}, 0.3)
    assert _note_term(large, "decode graphs") == "decode graphs 2.15"
    for floor in (dict(cuda_graphs=False), dict(offload="never")):
        eager = plan_pool_blocks(LLAMA7B, cuda_engine(**two, max_decode_batch=768, **floor), {0: H80, 1: H80}, 0.3)
        assert _note_term(eager, "decode graphs") == "decode graphs 0.50"
        reserved_mib = 676 * 32 * 104 / 1024 - 512  # more than the floor, in 8 MiB blocks (each plan rounds down)
        assert abs(eager.num_decode_blocks - large.num_decode_blocks - reserved_mib / 8) < 1
    half = dataclasses.replace(LLAMA7B, num_hidden_layers=16)
    shallow = plan_pool_blocks(half, cuda_engine(**two, max_decode_batch=768), {0: H80, 1: H80}, 0.3)
    assert _note_term(shallow, "decode graphs") == "decode graphs 1.07"


def test_too_little_memory_is_a_clear_error():
    small = GpuMemory(free_bytes=16 * GIB, total_bytes=16 * GIB)
    with pytest.raises(ValueError, match="fewer than one request of max_model_len 4096 needs"):
        plan_pool_blocks(LLAMA7B, cuda_engine(prefill_gpu=0, decode_gpu=1), {0: small, 1: small}, 0.3)
    with pytest.raises(ValueError, match="no memory figures for GPU 1"):
        plan_pool_blocks(LLAMA7B, cuda_engine(prefill_gpu=0, decode_gpu=1), {0: H80}, 0.3)


def test_decode_step_time_published_in_one_process_is_read_in_another(tmp_path):
    mine = BlockAllocator.create(tmp_path, "decode", 8)
    theirs = BlockAllocator.attach(tmp_path, "decode", 8)     # admission's view of decode's pool
    assert theirs.step_time_s == 0.0
    mine.publish_step_time(0.0375)
    assert theirs.step_time_s == pytest.approx(0.0375)
    assert theirs.num_free == 8 and theirs.current_tokens == 0  # the other counters are untouched
