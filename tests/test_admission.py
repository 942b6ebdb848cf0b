"""The offload policy (never / always / ratio:R / auto / spill) and admission into the KV pools."""

import math
import threading
import time
from fractions import Fraction

import pytest

from adrenaline_py.engine.admission import Admission, AdmissionTimeout, Ticket
from adrenaline_py.kv_cache import BlockAllocator
from adrenaline_py.policy import OffloadPolicy, PoolLoad
from adrenaline_py.request import InvalidRequest

BLOCK = 4

# --- OffloadPolicy -------------------------------------------------------------------------------

# Current lengths as large as the reservations: C2's length term binds only in tests/test_policy.py.
LOCAL = PoolLoad(num_seqs=4, reserved_tokens=1000, num_free_blocks=100, current_tokens=1000)
IDLE_REMOTE = PoolLoad(num_seqs=0, reserved_tokens=0, num_free_blocks=100)


def decisions(policy, n):
    return [policy.should_offload(10, 1, LOCAL, IDLE_REMOTE) for _ in range(n)]


def test_never_and_always_are_fixed_and_strict():
    assert decisions(OffloadPolicy("never"), 10) == [False] * 10
    assert decisions(OffloadPolicy("always"), 10) == [True] * 10
    assert OffloadPolicy("never").is_strict and OffloadPolicy("always").is_strict
    assert not OffloadPolicy("auto").is_strict and not OffloadPolicy("ratio:0.5").is_strict


def test_always_offloads_even_when_the_executor_is_loaded():
    busy = PoolLoad(num_seqs=50, reserved_tokens=10**6, num_free_blocks=0)
    assert OffloadPolicy("always").should_offload(10, 5, LOCAL, busy)


@pytest.mark.parametrize("ratio", ["0", "0.1", "0.25", "0.29", "0.3", "0.5", "0.57", "0.9", "1"])
def test_ratio_offloads_an_exact_share_of_every_prefix(ratio):
    got = decisions(OffloadPolicy(f"ratio:{ratio}"), 120)
    exact = Fraction(ratio)       # e.g. 100 * 0.29 is 28.999999999999996 in floats, but 29 offloads
    for n in range(1, 121):
        assert sum(got[:n]) == math.floor(n * exact), n


def test_ratio_quarter_offloads_every_fourth_request():
    got = decisions(OffloadPolicy("ratio:0.25"), 12)
    assert [i for i, d in enumerate(got) if d] == [3, 7, 11]


def test_ratio_ignores_loads():
    full_remote = PoolLoad(num_seqs=99, reserved_tokens=10**6, num_free_blocks=0)
    policy = OffloadPolicy("ratio:1")
    assert policy.should_offload(10, 5, LOCAL, full_remote)


def auto(num_tokens, local, remote, num_blocks=1, bound=1.0):
    return OffloadPolicy("auto", bound).should_offload(num_tokens, num_blocks, local, remote)


def test_auto_offloads_when_both_conditions_hold():
    remote = PoolLoad(num_seqs=2, reserved_tokens=600, num_free_blocks=100)
    assert auto(400, LOCAL, remote)        # C1: 600 + 400 <= 1000; C2: 2 + 1 <= 4


def test_auto_c1_offloaded_load_bounded_by_local_load():
    remote = PoolLoad(num_seqs=0, reserved_tokens=600, num_free_blocks=100)
    assert auto(400, LOCAL, remote)
    assert not auto(401, LOCAL, remote)    # 1001 > 1000, though C2 (1 <= 4) holds
    assert auto(1400, LOCAL, remote, bound=2.0)
    assert not auto(1401, LOCAL, remote, bound=2.0)


def test_auto_c2_offloaded_batch_bounded_by_local_batch():
    remote = PoolLoad(num_seqs=3, reserved_tokens=0, num_free_blocks=100)
    assert auto(10, LOCAL, remote)                                        # 3 + 1 <= 4
    assert not auto(10, LOCAL, PoolLoad(4, 0, 100))                       # 5 > 4, though C1 holds
    assert auto(10, LOCAL, PoolLoad(7, 0, 100), bound=2.0)                # 8 <= 8


def test_auto_never_offloads_without_local_load():
    assert not auto(1, PoolLoad(0, 0, 100), IDLE_REMOTE)


def test_auto_needs_room_in_the_executor_pool():
    assert auto(10, LOCAL, PoolLoad(0, 0, 5), num_blocks=5)
    assert not auto(10, LOCAL, PoolLoad(0, 0, 4), num_blocks=5)


# --- Admission -----------------------------------------------------------------------------------

@pytest.fixture
def pools(tmp_path):
    return {
        "decode": BlockAllocator.create(tmp_path, "decode", 8),
        "executor": BlockAllocator.create(tmp_path, "executor", 4),
    }


def admission(pools, mode, timeout_s=0.05, touched=None):
    def get(name):
        if touched is not None:
            touched.add(name)
        return pools[name]

    return Admission(get, OffloadPolicy(mode), BLOCK, timeout_s, poll_s=0.002)


def fill(allocator):
    return allocator.allocate(allocator.num_free, 1)


def test_never_admits_to_decode_and_never_touches_the_executor(pools):
    touched = set()
    ticket = admission(pools, "never", touched=touched).admit(num_prompt_tokens=5, max_tokens=6)
    assert ticket == Ticket("decode", [0, 1, 2], 11)      # ceil(11 / 4) = 3 blocks
    assert touched == {"decode"}
    assert (pools["decode"].num_free, pools["decode"].num_seqs, pools["decode"].reserved_tokens) == (5, 1, 11)


def test_always_admits_to_the_executor(pools):
    ticket = admission(pools, "always").admit(num_prompt_tokens=3, max_tokens=1)
    assert ticket == Ticket("executor", [0], 4)
    assert pools["executor"].num_free == 3 and pools["decode"].num_free == 8


def test_release_returns_the_blocks(pools):
    adm = admission(pools, "always")
    ticket = adm.admit(8, 8)
    assert pools["executor"].num_free == 0
    adm.release(ticket)
    executor = pools["executor"]
    assert (executor.num_free, executor.num_seqs, executor.reserved_tokens) == (4, 0, 0)


def test_auto_falls_back_to_decode_when_the_executor_pool_is_full(pools):
    adm = admission(pools, "auto")
    pools["decode"].allocate(2, 100, 50)  # local load: 1 seq, 100 tokens, 50 now → offloading 8 (4 now) is allowed
    assert adm.admit(4, 4).pool == "executor"
    fill(pools["executor"])
    assert adm.admit(4, 4).pool == "decode"


def test_auto_keeps_requests_local_when_c1_fails_and_uses_the_executor_when_decode_is_full(pools):
    adm = admission(pools, "auto")
    assert adm.admit(4, 4).pool == "decode"       # no local load yet: C1 / C2 fail
    fill(pools["decode"])
    assert adm.admit(4, 4).pool == "executor"     # not strict: the other pool takes it


def test_spill_keeps_requests_local_while_decode_has_room(pools):
    adm = admission(pools, "spill")
    assert [adm.admit(4, 4).pool for _ in range(4)] == ["decode"] * 4   # 2 blocks each: decode's 8
    assert pools["executor"].num_free == 4 and pools["executor"].num_seqs == 0


def test_spill_sends_what_decode_cannot_hold_to_the_executor_within_the_bound(pools):
    adm = admission(pools, "spill")
    for _ in range(4):
        adm.admit(4, 4)                    # decode full: 4 requests, 32 tokens reserved, 16 now
    assert adm.admit(4, 4).pool == "executor"   # C1: 8 <= 32; C2: 4 <= 16, 1 <= 4
    assert adm.admit(4, 4).pool == "executor"


def test_spill_waits_for_decode_rather_than_exceed_the_bound(pools):
    adm = Admission(lambda name: pools[name], OffloadPolicy("spill", bound=0.1), BLOCK, 0.05, poll_s=0.002)
    held = [adm.admit(4, 4) for _ in range(4)]   # decode full; OB x 32 reserved = 3.2 tokens < 8
    with pytest.raises(AdmissionTimeout):
        adm.admit(4, 4)
    assert pools["executor"].num_free == 4       # no fallback past the bound
    adm.timeout_s = 5.0
    timer = threading.Timer(0.05, adm.release, args=(held[0],))
    timer.start()
    try:
        assert adm.admit(4, 4).pool == "decode"  # decided again while waiting: decode's room came back
    finally:
        timer.cancel()


def test_spill_uses_the_executor_once_the_bound_allows_it_while_a_request_waits(pools):
    adm = Admission(lambda name: pools[name], OffloadPolicy("spill", bound=0.5), BLOCK, 5.0, poll_s=0.002)
    assert adm.admit(12, 12).pool == "decode"     # 6 of decode's 8 blocks; 2 left
    result = {}
    waiter = threading.Thread(target=lambda: result.update(t=adm.admit(6, 6)))  # 3 blocks: not in decode
    waiter.start()
    time.sleep(0.05)
    # waiting: C2's batch term fails (0 + 1 > 0.5 x 1 local request)
    assert "t" not in result and pools["executor"].num_free == 4
    pools["decode"].allocate(2, 8, 4)             # a second local request (decode full): now 1 <= 0.5 x 2,
    waiter.join(5.0)                              # C1 12 <= 0.5 x 32, C2 6 <= 0.5 x 16
    assert result["t"].pool == "executor"


def test_ratio_falls_back_to_decode_when_the_executor_pool_is_full(pools):
    adm = admission(pools, "ratio:1", timeout_s=5.0)
    fill(pools["executor"])
    start = time.monotonic()
    assert adm.admit(4, 4).pool == "decode"
    assert time.monotonic() - start < 1.0         # no waiting for the executor


def test_non_strict_request_too_big_for_the_executor_goes_to_decode(pools):
    # 24 tokens = 6 blocks: more than the executor's 4, fits decode's 8.
    assert admission(pools, "ratio:1").admit(20, 4).pool == "decode"


def test_strict_always_waits_then_times_out_when_the_executor_is_full(pools):
    fill(pools["executor"])
    adm = admission(pools, "always", timeout_s=0.1)
    start = time.monotonic()
    with pytest.raises(AdmissionTimeout, match="KV cache full"):
        adm.admit(4, 4)
    assert time.monotonic() - start >= 0.1
    assert pools["decode"].num_free == 8              # no fallback for a strict mode


def test_strict_never_times_out_when_decode_is_full(pools):
    fill(pools["decode"])
    with pytest.raises(AdmissionTimeout):
        admission(pools, "never").admit(4, 4)
    assert pools["executor"].num_free == 4


def test_strict_admission_waits_for_blocks_to_be_released(pools):
    held = fill(pools["executor"])
    timer = threading.Timer(0.05, pools["executor"].free, args=(held, 1))
    timer.start()
    try:
        ticket = admission(pools, "always", timeout_s=5.0).admit(4, 4)
    finally:
        timer.cancel()
    assert ticket.pool == "executor" and len(ticket.block_table) == 2


def test_request_larger_than_every_pool_is_invalid_at_once(pools):
    start = time.monotonic()
    for mode in ("never", "always", "auto", "spill", "ratio:0.5"):
        with pytest.raises(InvalidRequest, match="needs 9 KV blocks"):
            admission(pools, mode, timeout_s=10).admit(30, 6)   # 36 tokens = 9 blocks > 8
    assert time.monotonic() - start < 1.0


def test_strict_always_rejects_a_request_only_decode_could_hold(pools):
    with pytest.raises(InvalidRequest, match="more than a pool holds"):
        admission(pools, "always", timeout_s=10).admit(20, 4)   # 6 blocks > executor's 4


def test_invalid_request_takes_no_blocks(pools):
    with pytest.raises(InvalidRequest):
        admission(pools, "auto").admit(100, 100)
    assert pools["decode"].num_free == 8 and pools["executor"].num_free == 4


def test_requests_waiting_for_room_are_admitted_first_come_first_served(pools):
    adm = admission(pools, "never", timeout_s=5.0)
    held = pools["decode"].allocate(8, 32)                  # decode full
    order, threads = [], []
    for name in ("first", "second", "third"):
        t = threading.Thread(target=lambda n=name: order.append((n, adm.admit(8, 8))))  # 4 blocks each
        t.start()
        threads.append(t)
        while adm.num_waiting < len(threads):
            time.sleep(0.001)
    pools["decode"].free(held, 32)                           # room for two of the three
    deadline = time.monotonic() + 5
    while len(order) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    assert [n for n, _ in order] == ["first", "second"] and adm.num_waiting == 1
    adm.release(order[0][1])                                  # room again: the third's turn
    for t in threads:
        t.join(5)
    assert [n for n, _ in order] == ["first", "second", "third"] and adm.num_waiting == 0


def test_a_later_request_waits_behind_an_earlier_one(pools):
    adm = admission(pools, "never", timeout_s=5.0)
    held_a, held_b = pools["decode"].allocate(4, 16), pools["decode"].allocate(4, 16)  # decode full
    got = []
    waiter = threading.Thread(target=lambda: got.append(("waiter", adm.admit(8, 8))))
    waiter.start()
    while adm.num_waiting < 1:
        time.sleep(0.001)
    late = threading.Thread(target=lambda: got.append(("late", adm.admit(8, 8))))
    late.start()
    while adm.num_waiting < 2:                                # room is freed only once both wait
        time.sleep(0.001)
    pools["decode"].free(held_a, 16)                          # room for one of them
    waiter.join(5)
    assert [n for n, _ in got] == ["waiter"]                  # the one that waited longer took it
    pools["decode"].free(held_b, 16)
    late.join(5)
    assert [n for n, _ in got] == ["waiter", "late"]


# --- the TPOT gate ------------------------------------------------------------------------------

def test_with_a_tpot_slo_admission_waits_while_decode_steps_are_near_it(pools):
    adm = Admission(lambda name: pools[name], OffloadPolicy("never"), BLOCK, 5.0, poll_s=0.002, tpot_slo_s=0.05)
    pools["decode"].publish_step_time(0.046)          # ≥ 0.9 × 50 ms: decode is at its SLO
    timer = threading.Timer(0.1, pools["decode"].publish_step_time, args=(0.02,))
    start = time.monotonic()
    timer.start()
    try:
        ticket = adm.admit(4, 4)
    finally:
        timer.cancel()
    assert ticket.pool == "decode" and time.monotonic() - start >= 0.1
    assert adm.num_held_for_tpot == 1
    assert adm.admit(4, 4).pool == "decode" and adm.num_held_for_tpot == 1   # steps are fast now: at once


def test_without_a_tpot_slo_decode_step_time_does_not_hold_requests(pools):
    adm = admission(pools, "never", timeout_s=0.05)
    pools["decode"].publish_step_time(10.0)
    assert adm.admit(4, 4).pool == "decode" and adm.num_held_for_tpot == 0


def test_a_request_held_at_the_tpot_slo_times_out_with_that_reason(pools):
    adm = Admission(lambda name: pools[name], OffloadPolicy("auto"), BLOCK, 0.05, poll_s=0.002, tpot_slo_s=0.05)
    pools["decode"].publish_step_time(0.06)
    with pytest.raises(AdmissionTimeout, match="TPOT SLO"):
        adm.admit(4, 4)
    assert pools["decode"].num_free == 8 and pools["executor"].num_free == 4
