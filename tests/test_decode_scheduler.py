"""`DecodeScheduler` with fake pools and hand-made runner outputs (no model runs)."""

import threading
import time

import torch

from adrenaline_py.engine.decode import DecodeEngine, DecodeScheduler, Sequence
from adrenaline_py.request import GenerationParams, SamplingParams

EOS = 2


class FakeAllocator:
    def __init__(self):
        self.freed = []

    def free(self, blocks, reserved_tokens):
        self.freed.append((list(blocks), reserved_tokens))


class FakePool:
    def __init__(self):
        self.allocator = FakeAllocator()


def create_scheduler(max_batch=4):
    pools = {"decode": FakePool(), "executor": FakePool()}
    return DecodeScheduler(pools.__getitem__, max_batch), pools


def make_seq(seq_id, first_token=10, max_tokens=8, pool="decode", prompt_len=3, end_ids=(EOS,)):
    params = GenerationParams(SamplingParams(max_tokens=max_tokens, end_ids=end_ids))
    return Sequence(seq_id, list(range(100, 100 + prompt_len)), [first_token], [seq_id * 10, seq_id * 10 + 1],
                    pool, params)


def freed(pools, pool="decode"):
    return pools[pool].allocator.freed


def ids(seqs):
    return [s.seq_id for s in seqs]


def run_step(sched, tokens_by_id):
    """One scheduler step with a fake runner that returns tokens_by_id[seq_id] for each row."""
    plan, abort_events = sched.schedule()
    events = sched.update(plan, [tokens_by_id[s.seq_id] for s in plan.seqs])
    return plan, abort_events, events


# --- add -----------------------------------------------------------------------------------------

def test_add_queues_a_running_request_and_reports_its_first_token():
    sched, pools = create_scheduler()
    seq = make_seq(1, first_token=42)
    ev = sched.add(seq)
    assert (ev.seq, ev.token_ids, ev.finish_reason) == (seq, [42], None)
    assert sched.num_unfinished() == 1
    assert freed(pools) == []


def test_add_finishes_at_once_when_the_first_token_is_an_end_id():
    sched, pools = create_scheduler()
    seq = make_seq(1, first_token=EOS, prompt_len=5)
    ev = sched.add(seq)
    assert (ev.token_ids, ev.finish_reason) == ([EOS], "stop")
    assert seq.finish_reason == "stop"
    assert sched.num_unfinished() == 0
    assert freed(pools) == [([10, 11], 5 + 8)]    # blocks and the prompt + max_tokens reservation


def test_add_finishes_at_once_with_max_tokens_one():
    sched, pools = create_scheduler()
    ev = sched.add(make_seq(1, max_tokens=1, pool="executor"))
    assert ev.finish_reason == "length"
    assert sched.num_unfinished() == 0
    assert freed(pools, "executor") == [([10, 11], 3 + 1)] and freed(pools) == []


def test_custom_end_ids_end_the_request():
    sched, _ = create_scheduler()
    assert sched.add(make_seq(1, first_token=EOS, end_ids=())).finish_reason is None
    assert sched.add(make_seq(2, first_token=7, end_ids=(7, 9))).finish_reason == "stop"


# --- schedule ------------------------------------------------------------------------------------

def test_schedule_puts_local_rows_first_and_offloaded_last():
    sched, _ = create_scheduler()
    for i, pool in enumerate(["executor", "decode", "executor", "decode"]):
        sched.add(make_seq(i, pool=pool))
    plan, events = sched.schedule()
    assert events == []
    assert ids(plan.local) == [1, 3] and ids(plan.offloaded) == [0, 2]
    assert ids(plan.seqs) == [1, 3, 0, 2]


def test_schedule_respects_max_batch_and_admits_in_arrival_order():
    sched, _ = create_scheduler(max_batch=3)
    for i in range(5):
        sched.add(make_seq(i))
    plan, _ = sched.schedule()
    assert ids(plan.seqs) == [0, 1, 2]
    assert sched.num_unfinished() == 5
    plan, _ = sched.schedule()     # nothing finished: still the same three
    assert ids(plan.seqs) == [0, 1, 2]


def test_finished_requests_make_room_for_waiting_ones():
    sched, _ = create_scheduler(max_batch=2)
    for i in range(4):
        sched.add(make_seq(i))
    run_step(sched, {0: EOS, 1: 5})
    plan, _ = sched.schedule()
    assert ids(plan.seqs) == [1, 2]


def test_empty_schedule_is_falsy():
    sched, _ = create_scheduler()
    plan, events = sched.schedule()
    assert not plan and events == []


# --- update --------------------------------------------------------------------------------------

def test_update_appends_tokens_row_by_row():
    sched, _ = create_scheduler()
    a, b = make_seq(1, pool="executor"), make_seq(2)
    sched.add(a)
    sched.add(b)
    plan, _, events = run_step(sched, {1: 31, 2: 32})
    assert ids(plan.seqs) == [2, 1]
    assert a.output_ids == [10, 31] and b.output_ids == [10, 32]
    got = [(e.seq.seq_id, e.token_ids, e.finish_reason) for e in events]
    assert got == [(2, [32], None), (1, [31], None)]


def test_update_finishes_on_length_and_frees_once():
    sched, pools = create_scheduler()
    seq = make_seq(1, max_tokens=3)
    sched.add(seq)
    reasons = [run_step(sched, {1: 20 + i})[2][0].finish_reason for i in range(2)]
    assert reasons == [None, "length"]
    assert seq.output_ids == [10, 20, 21]
    assert freed(pools) == [([10, 11], 3 + 3)]
    plan, _ = sched.schedule()
    assert not plan and sched.num_unfinished() == 0


def test_update_finishes_on_an_end_id():
    sched, pools = create_scheduler()
    keep, done = make_seq(1), make_seq(2, pool="executor")
    sched.add(keep)
    sched.add(done)
    _, _, events = run_step(sched, {1: 5, 2: EOS})
    assert {e.seq.seq_id: e.finish_reason for e in events} == {1: None, 2: "stop"}
    assert freed(pools, "executor") == [([20, 21], 11)] and freed(pools) == []
    assert ids(sched.schedule()[0].seqs) == [1]


# --- abort / fail --------------------------------------------------------------------------------

def test_abort_removes_a_running_request_and_frees_it():
    sched, pools = create_scheduler()
    for i in range(3):
        sched.add(make_seq(i))
    sched.schedule()
    sched.abort(1)
    assert freed(pools) == []                  # takes effect at the next schedule
    plan, events = sched.schedule()
    assert ids(plan.seqs) == [0, 2]
    assert [(e.seq.seq_id, e.token_ids, e.finish_reason, e.error) for e in events] == [(1, [], "abort", None)]
    assert freed(pools) == [([10, 11], 11)]
    assert sched.num_unfinished() == 2


def test_abort_removes_a_waiting_request():
    sched, pools = create_scheduler(max_batch=1)
    for i in range(3):
        sched.add(make_seq(i))
    sched.schedule()
    sched.abort(2, "error", "client went away")
    plan, events = sched.schedule()
    assert ids(plan.seqs) == [0]
    assert [(e.seq.seq_id, e.finish_reason, e.error) for e in events] == [(2, "error", "client went away")]
    run_step(sched, {0: EOS})
    assert ids(sched.schedule()[0].seqs) == [1]     # the waiting order is kept
    assert len(freed(pools)) == 2


def test_abort_of_a_finished_request_is_ignored():
    sched, pools = create_scheduler()
    sched.add(make_seq(1))
    run_step(sched, {1: EOS})
    sched.abort(1)                                # e.g. a stop string seen after the request ended
    plan, events = sched.schedule()
    assert events == [] and not plan
    assert len(freed(pools)) == 1                 # no double free


def test_fail_ends_requests_with_an_error_and_frees_them():
    sched, pools = create_scheduler()
    local, remote = make_seq(1), make_seq(2, pool="executor")
    sched.add(local)
    sched.add(remote)
    plan, _ = sched.schedule()
    events = sched.fail(plan.offloaded, "executor gone")
    assert [(e.seq.seq_id, e.finish_reason, e.error) for e in events] == [(2, "error", "executor gone")]
    assert freed(pools, "executor") == [([20, 21], 11)]
    assert ids(sched.schedule()[0].seqs) == [1]


def test_wait_for_work_returns_at_once_when_there_is_work():
    sched, _ = create_scheduler()
    start = time.monotonic()
    sched.wait_for_work(timeout=0.05)             # idle: waits the timeout
    assert time.monotonic() - start >= 0.04
    sched.add(make_seq(1))
    start = time.monotonic()
    sched.wait_for_work(timeout=5.0)
    assert time.monotonic() - start < 1.0


# --- the loop's failure path ---------------------------------------------------------------------
class CountingAllocator(FakeAllocator):
    def publish_generated(self, n):
        pass

    def publish_step_time(self, seconds):
        pass


class FailOnceRunner:
    """Raises on its first step (a failed decode step), then returns token 7 for every row."""

    device = torch.device("cpu")
    gate = None
    launched_at = 0.0
    device_s = 0.0

    def __init__(self):
        self.calls = 0
        self.transport = type("T", (), {"close": lambda self: None})()

    def run(self, plan):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("boom")
        return [7] * len(plan.seqs)


def test_a_request_added_while_a_failed_step_is_reported_is_not_lost():
    """Regression: the loop took its snapshot of the held requests, sent their errors, then cleared
    the queue under a second lock, so a request added in between vanished with its blocks."""
    pools = {"decode": FakePool(), "executor": FakePool()}
    for pool in pools.values():
        pool.allocator = CountingAllocator()
    sched = DecodeScheduler(pools.__getitem__, 4)
    events, late = [], make_seq(2, max_tokens=2)
    done = threading.Event()

    def emit(evs):
        events.extend(evs)
        if any(e.error for e in evs) and late.seq_id not in {e.seq.seq_id for e in events[:-len(evs)]}:
            engine.add(late)                    # a request arrives while the failure is being reported
        if any(e.seq.seq_id == 2 and e.finish_reason for e in evs):
            done.set()

    engine = DecodeEngine(sched, FailOnceRunner(), emit)
    engine.add(make_seq(1))
    engine.start()
    try:
        assert done.wait(5), "the request added during the failure report never finished"
    finally:
        engine.stop()
    ends = {e.seq.seq_id: (e.finish_reason, e.error) for e in events if e.finish_reason}
    assert ends == {1: ("error", "decode step failed: RuntimeError: boom"), 2: ("length", None)}
    assert freed(pools) == [([10, 11], 11), ([20, 21], 5)]   # both requests gave their blocks back


class SlowRunner:
    """Returns token 7 for every row after `wait_s`, as if the GPU took that long."""

    device = torch.device("cpu")
    gate = None
    launched_at = 0.0
    device_s = 0.0

    def __init__(self, wait_s):
        self.wait_s = wait_s
        self.transport = type("T", (), {"close": lambda self: None})()

    def run(self, plan):
        self.launched_at = time.perf_counter()
        time.sleep(self.wait_s)
        return [7] * len(plan.seqs)


def test_step_times_add_up_to_the_loop_and_put_the_runner_in_wait():
    pools = {"decode": FakePool(), "executor": FakePool()}
    for pool in pools.values():
        pool.allocator = CountingAllocator()
    sched = DecodeScheduler(pools.__getitem__, 4)
    engine = DecodeEngine(sched, SlowRunner(0.01), lambda evs: time.sleep(0.002))
    engine.add(make_seq(1, max_tokens=6))
    t0 = time.perf_counter()
    while engine.step():
        pass
    wall = time.perf_counter() - t0
    t = engine.times
    assert t.steps == 5                                   # max_tokens 6: prefill gave the first
    assert 0.05 <= t.wait < wall                          # five steps of 10 ms in the runner
    assert t.emit >= 0.009                                # five emits of 2 ms
    host = t.schedule + t.prepare + t.wait + t.update + t.emit
    assert host <= wall and host > 0.9 * wall


def test_with_steps_in_flight_a_finished_request_keeps_its_blocks_until_they_are_collected():
    """Overlapped steps: a request that ends while a later step is in flight (that step writes its
    K/V) is freed only once that step's tokens are back."""
    sched, pools = create_scheduler()
    sched.hold_frees = True
    a, b = make_seq(1, max_tokens=2), make_seq(2, max_tokens=8)
    sched.add(a)
    sched.add(b)
    plan, _ = sched.schedule()
    sched.steps_launched = 2                  # steps 1 and 2 launched; step 1's tokens come back now
    sched.release_held(1)
    events = sched.update(plan, [5, 6])       # a ends by length at step 1; step 2 (in flight) has it
    assert [e.finish_reason for e in events] == ["length", None]
    assert freed(pools) == []                 # held: step 2 still writes a's K/V
    assert sched.update(plan, [7, 8])[0].seq is b   # step 2: a's row is dropped, b goes on
    sched.release_held(2)
    assert freed(pools) == [([10, 11], 3 + 2)]
    sched.steps_launched = 2                  # nothing in flight now: frees are immediate
    sched.abort(2)
    sched.schedule()
    assert freed(pools)[-1] == ([20, 21], 3 + 8)


class StepTimeAllocator(CountingAllocator):
    def __init__(self):
        super().__init__()
        self.step_times = []

    def publish_step_time(self, seconds):
        self.step_times.append(seconds)


def test_the_loop_publishes_its_time_between_steps_and_zero_once_idle():
    """What admission's TPOT gate reads: the time between decode's steps (an EWMA) while busy, 0 idle."""
    pools = {"decode": FakePool(), "executor": FakePool()}
    for pool in pools.values():
        pool.allocator = StepTimeAllocator()
    sched = DecodeScheduler(pools.__getitem__, 4)
    engine = DecodeEngine(sched, SlowRunner(0.01), lambda evs: None)
    engine.add(make_seq(1, max_tokens=8))
    while engine.step():
        pass
    published = pools["decode"].allocator.step_times
    busy, last = published[:-1], published[-1]
    assert len(busy) == 6 and all(0.009 <= t < 0.1 for t in busy)   # 7 steps: 6 intervals
    assert last == 0.0 and engine.step_interval_s == 0.0           # the loop found no work
