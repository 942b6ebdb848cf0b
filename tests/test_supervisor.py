"""Supervised workers and executor pool generations, without tritonserver (dummy:tiny, CPU).

The attention executor and prefill run in worker processes that their Triton stubs restart
(backends/adrenaline/supervisor.py); each executor start is a new pool generation, and blocks
of one generation are never freed into, nor served from, another.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import greedy, small_engine_config

from adrenaline_py.config import EngineConfig
from adrenaline_py.engine.executor import (
    STALE_POOL_ERROR,
    AttentionExecutor,
    ExecutorState,
    StaleBlocks,
    clear_executor_state,
    executor_state,
    parse_pool_label,
    pool_label,
    split_blocks,
    tag_blocks,
    write_executor_state,
)
from adrenaline_py.kv_cache import BlockAllocator, KVPool
from adrenaline_py.loader import load_checkpoint
from adrenaline_py.transport import OffloadStep

BACKEND = Path(__file__).resolve().parents[1] / "backends" / "adrenaline"
sys.path.insert(0, str(BACKEND))

from executor_pool import ExecutorBlocks  # noqa: E402
from supervisor import WorkerGone, WorkerSupervisor  # noqa: E402


def _engine(tmp_path: Path) -> tuple[EngineConfig, str]:
    engine = small_engine_config(model="dummy:tiny", run_dir=str(tmp_path), num_decode_blocks=32,
                                 num_executor_blocks=32, max_decode_batch=4)
    path = tmp_path / "engine.json"
    engine.save(path)
    return engine, str(path)


def _wait(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_block_tags_and_pool_labels_round_trip():
    assert tag_blocks([0, 5, 7], 0) == [0, 5, 7]
    tagged = tag_blocks([0, 5, 7], 3)
    assert all(b >= 1 << 32 for b in tagged)
    assert split_blocks(tagged) == (3, [0, 5, 7])
    assert split_blocks([4, 2]) == (0, [4, 2])
    assert split_blocks([]) == (0, [])
    assert pool_label("executor", 3) == "executor@3" and parse_pool_label("executor@3") == ("executor", 3)
    assert pool_label("decode", 0) == "decode" and parse_pool_label("decode") == ("decode", 0)


def test_executor_serves_only_blocks_of_its_own_generation(tmp_path):
    engine, _ = _engine(tmp_path)
    config = load_checkpoint("dummy:tiny", with_weights=False).config
    executor = AttentionExecutor(config, engine, torch.float32, torch.device("cpu"), generation=2)
    try:
        assert executor_state(tmp_path) == ExecutorState(os.getpid(), 2)
        executor.apply_step(OffloadStep(0, joined={1: tag_blocks([3, 4], 2)}, seq_ids=[1], seq_lens=[20]))
        assert executor.block_tables[1] == [3, 4]
        with pytest.raises(StaleBlocks, match="generation 1"):
            executor.apply_step(OffloadStep(1, joined={2: tag_blocks([3, 4], 1)}, seq_ids=[1, 2], seq_lens=[21, 5]))
    finally:
        executor.stop()
        clear_executor_state(tmp_path)
    assert executor_state(tmp_path) is None


def test_executor_blocks_free_into_their_own_generation_only(tmp_path):
    engine, _ = _engine(tmp_path)
    blocks = ExecutorBlocks(engine)
    blocks.refresh()  # no executor yet: nothing attached
    assert blocks.generation == -1
    with pytest.raises(LookupError):
        blocks.num_free  # noqa: B018

    first = BlockAllocator.create(tmp_path, "executor", 32)
    write_executor_state(tmp_path, ExecutorState(os.getpid(), 1))
    blocks.refresh()
    assert blocks.generation == 1
    old = first.allocate(4, 60)
    assert blocks.num_free == 28

    # The executor restarts: its regions are unlinked and created anew, all blocks free.
    for p in tmp_path.glob("executor.alloc.*"):
        if p.suffix in (".shm", ".ready"):
            p.unlink()
    second = BlockAllocator.create(tmp_path, "executor", 32)
    write_executor_state(tmp_path, ExecutorState(os.getpid(), 2))
    new = second.allocate(4, 60)
    assert new == old  # the same block ids, now another request's
    blocks.refresh()
    assert blocks.generation == 2
    blocks.free(tag_blocks(old, 1), 60)  # the dead generation's: dropped, not freed into the new pool
    assert blocks.dropped == 4 and second.num_free == 28
    blocks.free(tag_blocks(new, 2), 60)
    assert second.num_free == 32 and second.num_seqs == 0


def _stats(worker: WorkerSupervisor) -> dict:
    return worker.call(("stats",), wait_s=60)[1]


def test_supervisor_restarts_a_killed_executor_worker_with_a_fresh_pool(tmp_path):
    engine, path = _engine(tmp_path)
    config = load_checkpoint("dummy:tiny", with_weights=False).config
    worker = WorkerSupervisor("attention", path, init=config, on_exit=lambda pid: clear_executor_state(tmp_path, pid))
    worker.start()
    try:
        state = executor_state(tmp_path)
        assert state == ExecutorState(worker.pid, 1)
        old_pool = KVPool.attach("executor", config, engine, torch.float32)
        assert old_pool.allocator.allocate(5, 70) is not None  # a request holds blocks in generation 1
        old_pool.kv.fill_(1.0)
        assert _stats(worker)["num_free_blocks"] == 27
        old_inode = (tmp_path / "executor.kv.shm").stat().st_ino

        os.kill(state.pid, signal.SIGKILL)
        assert worker.wait_ready(60, after_generation=1)
        new_state = executor_state(tmp_path)
        assert new_state.generation == 2 and new_state.pid == worker.pid != state.pid
        assert worker.restarts == 1 and worker.last_restart_s < 60
        stats = _stats(worker)
        assert stats["generation"] == 2 and stats["num_free_blocks"] == stats["num_blocks"] == 32
        # New regions; the old one stays valid for processes that still map it (no SIGBUS).
        assert (tmp_path / "executor.kv.shm").stat().st_ino != old_inode
        assert float(old_pool.kv.sum()) == old_pool.kv.numel()
        assert float(KVPool.attach("executor", config, engine, torch.float32).kv.abs().sum()) == 0.0
    finally:
        proc = worker._proc
        worker.stop()
    assert proc.returncode is not None  # stopped and reaped
    assert executor_state(tmp_path) is None  # it withdrew its state: admission stops offloading


def test_a_worker_exits_when_its_stub_goes_away(tmp_path):
    _, path = _engine(tmp_path)
    worker = WorkerSupervisor("attention", path, init=load_checkpoint("dummy:tiny", with_weights=False).config)
    worker.start()
    proc = worker._proc
    worker._chan.close()  # as when the stub dies: the worker's channel reaches EOF
    assert _wait(lambda: proc.poll() is not None, 30)
    assert proc.returncode == 0
    worker.stop()


def test_stop_during_a_restart_leaves_no_worker(tmp_path):
    _, path = _engine(tmp_path)
    worker = WorkerSupervisor("prefill", path)
    worker.start()
    worker._proc.kill()
    assert _wait(lambda: worker._starting[0] is not None, 30)  # the next generation is starting
    starting = worker._starting[0]
    worker.stop()
    assert starting.poll() is not None and worker._proc is None and not worker.ready


def test_prefill_worker_refuses_stale_generations_and_runs_the_same_after_a_restart(tmp_path):
    engine, path = _engine(tmp_path)
    config = load_checkpoint("dummy:tiny", with_weights=False).config
    decode = KVPool.create("decode", config, engine, torch.float32)
    executor = KVPool.create("executor", config, engine, torch.float32)
    write_executor_state(tmp_path, ExecutorState(os.getpid(), 3))  # this process plays the executor
    sampling = greedy(4).sampling
    items = [([1, 2, 3, 4, 5], "decode", [0], sampling),
             ([1, 2, 3, 4, 5], "executor@3", [2], sampling),
             ([6, 7, 8], "executor@2", [1], sampling)]
    worker = WorkerSupervisor("prefill", path)
    worker.start()
    try:
        generation, (kind, results, worker_s) = worker.call(("prefill", items))
        assert (generation, kind) == (1, "ok") and worker_s > 0
        assert isinstance(results[0], int) and results[0] == results[1]  # same prompt, same first token
        assert results[2].startswith(STALE_POOL_ERROR) and "generation 3 runs now" in results[2]
        # prefill wrote the prompt's K/V into the named blocks of both pools
        assert float(decode.kv[:, :, 0].abs().sum()) > 0 and float(executor.kv[:, :, 2].abs().sum()) > 0
        assert float(executor.kv[:, :, 1].abs().sum()) == 0  # not into the stale request's block

        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(WorkerGone):
            worker.call(("prefill", items))
        assert worker.wait_ready(120, after_generation=1)
        generation, (kind, again, _) = worker.call(("prefill", items))
        assert (generation, kind) == (2, "ok") and again[:2] == results[:2]
    finally:
        worker.stop()
        clear_executor_state(tmp_path)


# --- decode's admission: blocks handed on by the scheduler are never leaked ----------------------


class _FakeTensor:
    def __init__(self, name: str, value) -> None:
        self._name, self._value = name, np.asarray(value)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._value


def _fake_pb_utils() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb.Tensor = _FakeTensor
    pb.TritonError = lambda message: message
    pb.InferenceResponse = lambda output_tensors, error=None: types.SimpleNamespace(tensors=output_tensors,
                                                                                   error=error)
    return pb


@pytest.fixture
def role_decode(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    for name in ("common", "metrics", "role_decode"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import role_decode

    yield role_decode
    for name in ("common", "metrics", "role_decode"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("pool", ["decode", "executor@1"])
def test_admission_failing_after_the_hand_off_frees_the_request_blocks(role_decode, tmp_path, pool):
    engine, _ = _engine(tmp_path)
    role = role_decode.Role.__new__(role_decode.Role)
    role.engine = engine
    role.model_name, role._ended, role._ended_lock = "ensemble", role_decode.Counter(), role_decode.threading.Lock()
    role._drain, role._cancelled_keys = role_decode.DrainWatch(tmp_path), {}
    role.executor_blocks = ExecutorBlocks(engine)
    role.pools = {"decode": KVPool.create("decode", load_checkpoint("dummy:tiny", with_weights=False).config,
                                          engine, torch.float32),
                  "executor": role_decode.ExecutorPoolView(role.executor_blocks)}
    executor = BlockAllocator.create(tmp_path, "executor", 32)
    write_executor_state(tmp_path, ExecutorState(os.getpid(), 1))
    allocator = role.pools["decode"].allocator if pool == "decode" else executor
    blocks = allocator.allocate(2, 3 + 8)  # what the scheduler reserved: prompt 3 + max_tokens 8
    added, sent = [], []
    role._ids = itertools.count()
    role.service = types.SimpleNamespace(add=added.append)
    scheduler_out = [_FakeTensor("input_ids", [[1, 2, 3]]), _FakeTensor("first_token", [[9]]),
                     _FakeTensor("block_table", [blocks]), _FakeTensor("kv_pool", [[pool.encode()]]),
                     _FakeTensor("generation_params", [[greedy(8).to_json().encode()]])]
    role._call = lambda model, inputs, outputs, decoupled=False: types.SimpleNamespace(
        output_tensors=lambda: [] if model == "preprocessing" else scheduler_out)

    def cancelled_check_fails():
        raise RuntimeError("lost the client")

    request = types.SimpleNamespace(inputs=lambda: [], parameters=lambda: "{}", is_cancelled=cancelled_check_fails,
                                    requested_output_names=lambda: [])
    sender = types.SimpleNamespace(send=lambda response, flags=0: sent.append(response))
    role._admit(request, sender)
    assert not added
    assert len(sent) == 1 and "RuntimeError: lost the client" in sent[0].error
    assert allocator.num_free == 32 and allocator.num_seqs == 0 and allocator.reserved_tokens == 0
    assert role._ended == {"error": 1}  # counted in adrenaline_requests_finished_total
    clear_executor_state(tmp_path)


# --- heartbeats: a stopped worker is reported down, killed and restarted ---------------------------


def test_a_stopped_worker_is_reported_down_killed_and_restarted(tmp_path):
    """SIGSTOP keeps the process alive (waitid sees nothing): only its silent heartbeat shows it.
    A call waiting on it ends with WorkerGone once it is killed, not never."""
    import threading

    _, path = _engine(tmp_path)
    config = load_checkpoint("dummy:tiny", with_weights=False).config
    worker = WorkerSupervisor("attention", path, init=config, on_exit=lambda pid: clear_executor_state(tmp_path, pid),
                              stall_timeout_s=1.5)
    worker.start()
    try:
        old = worker._proc
        assert _stats(worker)["generation"] == 1
        os.kill(old.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        outcome: list = []

        def waiting_call():
            try:
                outcome.append(worker.call(("stats",)))
            except WorkerGone as e:
                outcome.append(e)

        caller = threading.Thread(target=waiting_call)
        caller.start()  # blocks on the stopped worker's reply
        assert _wait(lambda: not worker.ready, 10)
        down_s = time.monotonic() - stopped
        caller.join(10)
        assert not caller.is_alive() and isinstance(outcome[0], WorkerGone), outcome
        assert worker.wait_ready(60, after_generation=1)
        assert old.poll() == -signal.SIGKILL  # killed (a stopped process takes SIGKILL), and reaped
        assert worker.stalls == 1 and worker.restarts == 1 and worker.pid != old.pid
        assert _stats(worker)["generation"] == 2
        print(f"stopped worker reported down after {down_s:.1f}s (stall timeout 1.5s)")
        assert 1.5 <= down_s < 5
    finally:
        worker.stop()
        clear_executor_state(tmp_path)


def test_a_busy_worker_keeps_beating(tmp_path):
    """The heartbeat has its own thread: a long request is not a stall."""
    _, path = _engine(tmp_path)
    worker = WorkerSupervisor("prefill", path, stall_timeout_s=1.0)
    worker.start()
    try:
        time.sleep(3.0)  # idle for three stall timeouts
        assert worker.ready and worker.stalls == 0 and worker.generation == 1
    finally:
        worker.stop()


def test_client_errors_carry_no_traceback_or_path(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    monkeypatch.delitem(sys.modules, "common", raising=False)
    import common

    raw = ("Failed to process the request(s) for model 'prefill_0_0', message: FileNotFoundError: [Errno 2] No such "
           "file or directory: '/dev/shm/adrenaline-1/executor.kv.shm'\n\nAt:\n  /srv/backends/role_prefill.py(80): "
           "execute\n")
    message = common.client_message(raw)
    assert message == ("Failed to process the request(s) for model 'prefill_0_0', message: FileNotFoundError: "
                       "[Errno 2] No such file or directory: '<path>'")
    assert common.error_response(raw).error == message
    for kept in ("top_p must be in (0, 1], got 3/4", "stale executor pool: executor@2 (generation 2 runs now)"):
        assert common.client_message(kept) == kept
    sys.modules.pop("common", None)
