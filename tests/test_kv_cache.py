"""`BlockAllocator`: block accounting in shared memory, seen alike by every attached process."""

import multiprocessing

import pytest

from adrenaline_py.kv_cache import BlockAllocator, blocks_needed


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
