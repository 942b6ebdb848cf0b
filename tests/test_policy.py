"""The offload policy's ``auto`` rule (C1, C2, executor room) and where its inputs come from: the bound OB
(a profile or the pools' capacities) and the current lengths (allocators + decode's published counts)."""

import json
from dataclasses import replace
from types import SimpleNamespace

from adrenaline_py.config import NAMED_SHAPES, EngineConfig
from adrenaline_py.engine.admission import Admission
from adrenaline_py.engine.decode import DecodeScheduler, Sequence
from adrenaline_py.kv_cache import BlockAllocator
from adrenaline_py.policy import OffloadPolicy, PoolLoad
from adrenaline_py.profile import GpuInfo, resolve_engine
from adrenaline_py.request import GenerationParams, SamplingParams

GIB = 1 << 30

# Local: 4 requests reserving 1000 tokens, 600 of them written so far.
LOCAL = PoolLoad(num_seqs=4, reserved_tokens=1000, num_free_blocks=100, current_tokens=600)
# Offloaded: 1 request reserving 300 tokens, 200 written.
REMOTE = PoolLoad(num_seqs=1, reserved_tokens=300, num_free_blocks=100, current_tokens=200)


def auto(max_len, prompt, local=LOCAL, remote=REMOTE, bound=1.0, blocks=1):
    return OffloadPolicy("auto", bound).should_offload(max_len, blocks, local, remote, prompt)


def test_c1_counts_the_new_request_at_its_maximum_length():
    assert auto(700, 10)                  # 300 + 700 <= 1000
    assert not auto(701, 10)              # 1001 > 1000, though C2 holds (210 <= 600, 2 <= 4)
    assert auto(200, 10, bound=0.5)       # 300 + 200 <= 500
    assert not auto(201, 10, bound=0.5)


def test_c2_current_lengths_use_the_prompt_not_the_maximum():
    assert auto(500, 400)                 # current: 200 + 400 <= 600; C1: 800 <= 1000
    assert not auto(500, 401)             # 601 > 600, though C1 holds
    assert not auto(450, 101, bound=0.5)  # current: 301 > 300 (C1: 750 > 500 too)
    assert auto(200, 100, bound=0.5)      # current 300 <= 300, C1 500 <= 500, count 2 <= 2


def test_c2_batch_ratio():
    busy = replace(REMOTE, num_seqs=3)
    assert auto(10, 10, remote=busy)                      # 3 + 1 <= 4
    assert not auto(10, 10, remote=replace(REMOTE, num_seqs=4))
    assert not auto(10, 10, remote=busy, bound=0.75)      # 4 > 3
    assert auto(10, 10, remote=replace(REMOTE, num_seqs=2), bound=0.75)


def test_without_a_prompt_length_the_maximum_counts_as_current():
    policy = OffloadPolicy("auto", 1.0)
    assert policy.should_offload(400, 1, LOCAL, REMOTE)       # 200 + 400 <= 600
    assert not policy.should_offload(401, 1, LOCAL, REMOTE)


def test_only_while_the_executor_pool_has_room():
    assert auto(10, 10, remote=replace(REMOTE, num_free_blocks=3), blocks=3)
    assert not auto(10, 10, remote=replace(REMOTE, num_free_blocks=2), blocks=3)


def test_nothing_is_offloaded_without_local_load():
    empty = PoolLoad(0, 0, 100, 0)
    assert not auto(1, 1, local=empty, remote=empty, bound=100.0)
    assert not auto(1, 1, local=replace(LOCAL, current_tokens=0), remote=replace(REMOTE, current_tokens=0))


def test_spill_offloads_only_what_decode_has_no_room_for():
    def spill(local_free, **kw):
        return OffloadPolicy("spill", 1.0).should_offload(700, 3, replace(LOCAL, num_free_blocks=local_free),
                                                          kw.get("remote", REMOTE), 10)
    assert not spill(3)                      # decode has room: local first, though C1 and C2 hold
    assert spill(2)                          # no room: auto's rule (700 + 300 <= 1000)
    assert not spill(2, remote=replace(REMOTE, reserved_tokens=301))   # ... and C1 still binds
    assert auto(700, 10, blocks=3)           # auto offloads it whatever decode's room


def test_never_always_and_ratio_ignore_the_loads():
    full = PoolLoad(num_seqs=99, reserved_tokens=10**6, num_free_blocks=0, current_tokens=10**6)
    empty = PoolLoad(0, 0, 0, 0)
    assert not OffloadPolicy("never").should_offload(10, 1, LOCAL, PoolLoad(0, 0, 100, 0), 5)
    assert OffloadPolicy("always").should_offload(10, 1, empty, full, 5)
    half = OffloadPolicy("ratio:0.5", bound=0.0)
    assert [half.should_offload(10, 1, empty, full, 5) for _ in range(6)] == [False, True] * 3


# --- where OB comes from -------------------------------------------------------------------------

PROFILE = {
    "version": 1, "gpu": "NVIDIA Test GPU", "gpu_slug": "nvidia-test-gpu", "shape": "llama-2-7b",
    "dtype": "bfloat16", "block_size": 16,
    "attention": [{"sm_share": 10, "gbs": 1000.0}, {"sm_share": 30, "gbs": 2000.0}, {"sm_share": 100, "gbs": 4000.0}],
    "prefill": [], "decode_step": [],
}


def served(profile_dir=None):
    """An engine resolved as the launcher does: one GPU named 'NVIDIA Test GPU', pools of 1000 blocks each,
    the executor at 30 % of the SMs (prefill 70 %)."""
    e = EngineConfig(model="dummy:llama-2-7b", device="cuda", dtype="bfloat16", num_decode_blocks=1000,
                     num_executor_blocks=1000, prefill_sm_share=70, executor_sm_share=30)
    gpus = {0: GpuInfo(0, "NVIDIA Test GPU", 100 * GIB, 100 * GIB)}
    return resolve_engine(e, NAMED_SHAPES["llama-2-7b"], gpus, dirs=[profile_dir] if profile_dir else [])


def test_ob_from_a_profile_is_tighter_than_from_the_pools(tmp_path):
    (tmp_path / "nvidia-test-gpu").mkdir()
    (tmp_path / "nvidia-test-gpu" / "llama-2-7b.json").write_text(json.dumps(PROFILE))
    from_pools, from_profile = served(), served(tmp_path)
    assert from_pools.offload_bound == 1.0          # 1000 / 1000 blocks
    assert from_profile.offload_bound == 0.5        # executor at 30 %: 2000 / 4000 GB/s
    local = PoolLoad(num_seqs=4, reserved_tokens=1000, num_free_blocks=500, current_tokens=1000)
    remote = PoolLoad(num_seqs=1, reserved_tokens=400, num_free_blocks=500, current_tokens=400)
    args = (200, 13, local, remote, 100)            # C1: 600 within 1.0 × 1000, not within 0.5 × 1000
    assert OffloadPolicy("auto", from_pools.offload_bound).should_offload(*args)
    assert not OffloadPolicy("auto", from_profile.offload_bound).should_offload(*args)


def test_explicit_offload_bound_wins_over_the_profile(tmp_path):
    (tmp_path / "nvidia-test-gpu").mkdir()
    (tmp_path / "nvidia-test-gpu" / "llama-2-7b.json").write_text(json.dumps(PROFILE))
    e = EngineConfig(model="dummy:llama-2-7b", device="cuda", dtype="bfloat16", num_decode_blocks=1000,
                     num_executor_blocks=1000, offload_bound=2.5)
    gpus = {0: GpuInfo(0, "NVIDIA Test GPU", 100 * GIB, 100 * GIB)}
    assert resolve_engine(e, NAMED_SHAPES["llama-2-7b"], gpus, dirs=[tmp_path]).offload_bound == 2.5


# --- current lengths: prompts in the allocator, generated tokens published by decode -------------

def sequence(seq_id, blocks, pool, prompt_len, max_tokens=8):
    return Sequence(seq_id, list(range(prompt_len)), [7], blocks, pool,
                    GenerationParams(SamplingParams(max_tokens=max_tokens, end_ids=(2,))))


def test_current_tokens_follow_admission_decode_steps_and_frees(tmp_path):
    allocators = {"decode": BlockAllocator.create(tmp_path, "decode", 16),
                  "executor": BlockAllocator.create(tmp_path, "executor", 16)}
    admission = Admission(allocators.__getitem__, OffloadPolicy("ratio:0.5"), 4, timeout_s=1.0)
    local = admission.admit(num_prompt_tokens=5, max_tokens=8)      # ratio: request 0 local, request 1 offloaded
    remote = admission.admit(num_prompt_tokens=3, max_tokens=8)
    assert (local.pool, remote.pool) == ("decode", "executor")
    loads = admission.loads()
    assert (loads["decode"].current_tokens, loads["executor"].current_tokens) == (5, 3)
    assert (loads["decode"].reserved_tokens, loads["executor"].reserved_tokens) == (13, 11)

    pools = {name: SimpleNamespace(allocator=a) for name, a in allocators.items()}
    sched = DecodeScheduler(pools.__getitem__, max_batch=4)
    a, b = sequence(1, local.block_table, "decode", 5), sequence(2, remote.block_table, "executor", 3)
    sched.add(a)
    sched.add(b)
    for _ in range(3):                                                # three steps, no request ends
        plan, _ = sched.schedule()
        sched.update(plan, [9] * len(plan.seqs))
    sched.publish_load()
    assert allocators["decode"].current_tokens == 5 + 3
    assert allocators["executor"].current_tokens == 3 + 3
    sched.abort(1)
    sched.schedule()                                                  # the abort frees request 1's blocks
    sched.publish_load()
    assert allocators["decode"].current_tokens == 0 and allocators["decode"].num_seqs == 0
    assert allocators["executor"].current_tokens == 6
    # seen alike by another process's attachment (the scheduler's)
    other = BlockAllocator.attach(tmp_path, "executor", 16)
    assert other.current_tokens == 6


def test_migrated_request_moves_its_generated_tokens_to_decode():
    freed = []
    pools = {name: SimpleNamespace(allocator=SimpleNamespace(free=lambda blocks, r, n=name: freed.append(n)))
             for name in ("decode", "executor")}
    sched = DecodeScheduler(pools.__getitem__, max_batch=4)
    seq = sequence(1, [0, 1], "executor", 4)
    sched.add(seq)
    for _ in range(2):
        plan, _ = sched.schedule()
        sched.update(plan, [9])
    assert sched.generated == {"decode": 0, "executor": 2}
    sched.migrate_to_local(seq, [5, 6])
    assert sched.generated == {"decode": 2, "executor": 0} and freed == ["executor"]



def test_serve_flags_reach_the_engine_config(tmp_path):
    import argparse

    from adrenaline_py.cli import _engine_args, engine_config_from_args

    p = argparse.ArgumentParser()
    _engine_args(p)
    cfg = engine_config_from_args(p.parse_args(["--offload", "spill", "--no-overlap-steps"]))
    assert cfg.offload == "spill" and not cfg.overlap_steps
    default = engine_config_from_args(p.parse_args([]))
    assert default.offload == "auto" and default.overlap_steps
    cfg.save(tmp_path / "engine.json")
    assert not EngineConfig.load(tmp_path / "engine.json").overlap_steps    # what the roles read
