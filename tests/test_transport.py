"""The data plane's pieces that run anywhere: placement, 2-D graph buckets, exchange buffers, the
host transport against a real executor (CPU). The device transport runs on GPUs only
(tests/test_gpu_engine.py, adrenaline_py/bench_handoff.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import small_engine_config

from adrenaline_py.attention import DecodeMetadata, TorchAttentionBackend, build_decode_metadata
from adrenaline_py.config import NAMED_SHAPES, EngineConfig
from adrenaline_py.engine.cuda_graphs import batch_buckets, decode_graph_keys, graph_keys, offload_buckets
from adrenaline_py.engine.executor import AttentionExecutor
from adrenaline_py.placement import Placement
from adrenaline_py.transport import ExchangeBuffers, ExecutorGone, HostTransport, make_transport


def test_placement_puts_prefill_and_executor_on_the_prefill_gpu_and_decode_on_its_own():
    p = Placement.of(EngineConfig(device="cuda", prefill_gpu=1, decode_gpu=0))
    assert p.prefill == p.executor == torch.device("cuda", 1) and p.decode == torch.device("cuda", 0)
    assert p.pool_device("executor") == p.executor and p.pool_device("decode") == p.decode
    assert p.is_two_gpus
    cpu = Placement.of(EngineConfig())
    assert {cpu.device(r) for r in ("prefill", "executor", "decode")} == {torch.device("cpu")}
    with pytest.raises(ValueError):
        cpu.device("sampler")


@pytest.mark.parametrize("max_batch", [16, 64, 256, 768])
def test_every_step_has_a_graph_and_the_key_count_stays_bounded(max_batch):
    keys = set(graph_keys(max_batch))
    local, remote = [0, *batch_buckets(max_batch)], [0, *offload_buckets(max_batch)]
    bucket = lambda buckets, n: next(b for b in buckets if b >= n)  # noqa: E731
    for m in range(max_batch + 1):
        for n in range(max_batch + 1 - m):
            if m or n:
                assert (bucket(local, m), bucket(remote, n)) in keys, (m, n)
    assert len(keys) < len(local) * len(remote)  # pairs no step reaches are not captured
    assert all(nb == 0 or nb >= 8 for _, nb in keys)
    assert set(graph_keys(max_batch, offload=False)) == {(b, 0) for b in batch_buckets(max_batch)}


def test_steps_of_128_to_768_rows_pad_each_side_by_less_than_32_rows():
    """A bucket every 32 rows from 128: above ~300 rows the products are compute-bound and a padding
    row costs what a real one does (the served knee's 282 local + 257 offloaded rows ran in 320 + 320)."""
    local, remote = batch_buckets(768), offload_buckets(768)
    bucket = lambda buckets, n: next(b for b in buckets if b >= n)  # noqa: E731
    for n in range(128, 769):
        assert bucket(local, n) - n < 32 and bucket(remote, n) - n < 32, n
    assert (bucket(local, 282), bucket(remote, 257)) == (288, 288)


def test_decode_graph_count_at_768_rows():
    assert len(graph_keys(768)) == 649
    assert len(decode_graph_keys(768, offload=True, two_batch=True)) == 649 + 27
    assert len(decode_graph_keys(768, offload=True, two_batch=True, two_batch_min_rows=128)) == 649 + 27 + 171
    assert len(decode_graph_keys(768, offload=False, two_batch=True)) == len(batch_buckets(768)) == 31


def test_exchange_rows_of_one_qkv_projection_are_copied_as_they_sit(tmp_path):
    cfg = NAMED_SHAPES["tiny"]
    engine = small_engine_config(run_dir=str(tmp_path))
    buffers = ExchangeBuffers.create(cfg, engine, torch.float32, torch.device("cpu"))
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = torch.randn(7, (hq + 2 * hkv) * d)  # the model's qkv projection output: q | k | v per row
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(7, hq, d), k.view(7, hkv, d), v.view(7, hkv, d)
    buffers.store_rows(q[4:], k[4:], v[4:])  # the offloaded rows are the batch's tail
    bq, bk, bv = buffers.split(3)
    assert torch.equal(bq, q[4:]) and torch.equal(bk, k[4:]) and torch.equal(bv, v[4:])
    # separate tensors (not views of one projection) land in the same places
    q2, k2, v2 = torch.randn(2, hq, d), torch.randn(2, hkv, d), torch.randn(2, hkv, d)
    buffers.store_rows(q2, k2, v2)
    bq, bk, bv = buffers.split(2)
    assert torch.equal(bq, q2) and torch.equal(bk, k2) and torch.equal(bv, v2)
    again = ExchangeBuffers.attach(cfg, engine, torch.float32, torch.device("cpu"))  # the executor's view
    assert torch.equal(again.split(2)[0], q2)


def test_host_transport_gets_the_executors_attention_of_its_rows(tmp_path):
    """Decode's host transport and a real executor (its own pool and thread): per layer the rows go
    out, K/V land in the executor's pool, and the output equals attention computed here."""
    cfg = NAMED_SHAPES["tiny"]
    engine = small_engine_config(run_dir=str(tmp_path))
    executor = AttentionExecutor(cfg, engine, torch.float32, torch.device("cpu"))
    executor.start()
    transport = make_transport(cfg, engine, torch.float32, torch.device("cpu"))
    assert isinstance(transport, HostTransport)
    try:
        g = torch.Generator().manual_seed(0)
        executor.pool.kv.copy_(torch.randn(executor.pool.kv.shape, generator=g))
        lens = [5, 33]
        tables = [executor.pool.allocator.allocate(-(-n // 16), n) for n in lens]
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        transport.begin_step([10, 11], {10: tables[0], 11: tables[1]}, lens)
        ref_kv = executor.pool.kv.clone()
        for layer in range(cfg.num_hidden_layers):
            q, k, v = torch.randn(2, hq, d, generator=g), torch.randn(2, hkv, d, generator=g), \
                torch.randn(2, hkv, d, generator=g)
            transport.send(layer, q, k, v)
            out = torch.empty(2, hq, d)
            transport.recv(layer, out)
            meta: DecodeMetadata = build_decode_metadata(ref_kv, tables, lens, torch.device("cpu"))
            ref = TorchAttentionBackend().decode(layer, q, k, v, meta)
            assert torch.allclose(out, ref, atol=1e-5)
        assert torch.equal(executor.pool.kv, ref_kv)  # the new tokens' K/V were stored there too
        assert executor.num_steps == 1
    finally:
        transport.shutdown()
        executor.stop()


def test_two_batch_step_exchanges_each_batch_on_its_own_rows_and_frames(tmp_path):
    """A step cut in two (rows [0, 2) and [2, 3)): per layer both batches' rows go out before either
    output is read, each through its own slot; the outputs equal attention computed here."""
    cfg = NAMED_SHAPES["tiny"]
    engine = small_engine_config(run_dir=str(tmp_path))
    executor = AttentionExecutor(cfg, engine, torch.float32, torch.device("cpu"))
    executor.start()
    transport = make_transport(cfg, engine, torch.float32, torch.device("cpu"))
    try:
        g = torch.Generator().manual_seed(3)
        executor.pool.kv.copy_(torch.randn(executor.pool.kv.shape, generator=g))
        lens = [7, 20, 49]
        tables = [executor.pool.allocator.allocate(-(-n // 16), n) for n in lens]
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        transport.begin_step([1, 2, 3], dict(zip([1, 2, 3], tables)), lens, split=2)
        ref_kv = executor.pool.kv.clone()
        for layer in range(cfg.num_hidden_layers):
            q, k, v = torch.randn(3, hq, d, generator=g), torch.randn(3, hkv, d, generator=g), \
                torch.randn(3, hkv, d, generator=g)
            transport.send(layer, q[:2], k[:2], v[:2], part=0, row0=0)
            transport.send(layer, q[2:], k[2:], v[2:], part=1, row0=2)
            out = torch.full((3, hq, d), float("nan"))
            transport.recv(layer, out[:2], part=0, row0=0)
            transport.recv(layer, out[2:], part=1, row0=2)
            meta = build_decode_metadata(ref_kv, tables, lens, torch.device("cpu"))
            ref = TorchAttentionBackend().decode(layer, q, k, v, meta)
            assert torch.allclose(out, ref, atol=1e-5)
        assert torch.equal(executor.pool.kv, ref_kv)
    finally:
        transport.shutdown()
        executor.stop()


def test_host_transport_reports_an_executor_that_refuses_the_step(tmp_path):
    cfg = NAMED_SHAPES["tiny"]
    engine = small_engine_config(run_dir=str(tmp_path))
    executor = AttentionExecutor(cfg, engine, torch.float32, torch.device("cpu"), generation=2)
    executor.start()
    transport = make_transport(cfg, engine, torch.float32, torch.device("cpu"))
    try:
        stale = [1 << 32 | 3]  # a block of generation 1: the executor (generation 2) refuses it
        transport.begin_step([1], {1: stale}, [4])
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        with pytest.raises(ExecutorGone):  # at the doorbell (connection already closed) or at the answer
            transport.send(0, torch.zeros(1, hq, d), torch.zeros(1, hkv, d), torch.zeros(1, hkv, d))
            transport.recv(0, torch.empty(1, hq, d))
        assert transport.channel is None  # the next step connects anew, with a new epoch
        assert executor.num_steps == 0 and not executor.block_tables  # the step was refused, not served
    finally:
        transport.shutdown()
        executor.stop()


@pytest.mark.parametrize("answer", ["silence", "wrong epoch", "error"])
def test_decode_sends_no_step_before_the_executor_is_ready(tmp_path, answer):
    """A connection starts HELLO → READY: decode waits for READY with its epoch (the executor sends
    it once its graphs for decode's buffers are captured) and treats silence, a READY of another
    epoch or an ERROR as a lost executor, with no STEP sent."""
    import threading

    from adrenaline_py.transport import OffloadServer

    cfg = NAMED_SHAPES["tiny"]
    engine = small_engine_config(run_dir=str(tmp_path), offload_timeout_s=0.5)
    server = OffloadServer(engine)
    got: list[bytes] = []

    def fake_executor():
        channel, epoch = server.accept()
        if answer == "wrong epoch":
            channel.send_ready(epoch + 1)
        elif answer == "error":
            channel.send_error("graph capture failed")
        channel.sock.settimeout(2.0)
        try:
            while data := channel.sock.recv(4096):
                got.append(data)
        except (TimeoutError, OSError):
            pass
        channel.close()

    thread = threading.Thread(target=fake_executor, daemon=True)
    thread.start()
    transport = make_transport(cfg, engine, torch.float32, torch.device("cpu"))
    try:
        with pytest.raises(ExecutorGone, match="executor"):
            transport.begin_step([1], {1: [0]}, [4])
        assert transport.channel is None  # closed: the next step reconnects with a new epoch
    finally:
        transport.shutdown()
        thread.join(5.0)
        server.close()
    assert b"".join(got) == b""  # after HELLO (read by accept) nothing came: no STEP frame


def test_private_streams_are_distinct_cuda_streams_even_when_torchs_pool_wraps_around(monkeypatch):
    """torch hands out pool streams round robin, so two streams asked for 32 apart are one CUDA
    stream: a spin-wait and the work it awaits (or its release) would then queue behind each other.
    Each name gets a stream no other name has, and keeps it."""
    from adrenaline_py import placement

    pool = {"next": 0}

    class PoolStream:  # a pool of 4, handed out as torch does: round robin
        def __init__(self, index):
            self.cuda_stream = 1000 + pool["next"] % 4
            pool["next"] += 1

    monkeypatch.setattr(placement.torch.cuda, "Stream", PoolStream)
    monkeypatch.setattr(placement, "_private", {})
    dev = torch.device("cuda", 0)
    decode = placement.private_stream(dev, "decode-loop")
    for _ in range(3):  # captures and others take pool streams meanwhile: the pool wraps around
        PoolStream(0)
    executor = placement.private_stream(dev, "attention-executor")
    release = placement.private_stream(dev, "offload-release-decode")
    assert len({decode.cuda_stream, executor.cuda_stream, release.cuda_stream}) == 3
    assert placement.private_stream(dev, "decode-loop") is decode
    assert placement.private_stream(torch.device("cuda", 1), "decode-loop").cuda_stream  # other GPUs: own pools
    placement.private_stream(dev, "fourth")
    with pytest.raises(RuntimeError, match="no CUDA stream"):
        placement.private_stream(dev, "fifth")


def test_device_watchdog_releases_until_every_launched_step_has_landed():
    """Two offloaded steps in flight (overlapped steps) and the executor fails: the watchdog sets
    decode's flags again and again until both steps have landed (the second waits anew behind the
    first); the first reports the failure, the second is dropped; the next run of steps starts clean.
    The device transport's host logic, with its GPU parts (`_check`, `_release`) replaced."""
    import collections
    import threading
    import time

    from adrenaline_py.transport import DeviceTransport

    t = DeviceTransport.__new__(DeviceTransport)  # no CUDA here: the watchdog's logic only
    t.channel, t.device, t._executor_pid = None, torch.device("cpu"), lambda: None
    t._failure, t._watch, t._stop = None, threading.Condition(), False
    t._launched = collections.deque()
    broken = threading.Event()
    releases = []
    t._check = lambda channel, started: "executor died (test)" if broken.is_set() else None
    t._release = lambda: releases.append(time.monotonic())
    t._watchdog = threading.Thread(target=t._watch_loop, daemon=True)
    t._watchdog.start()

    def wait_for(cond, timeout=5.0):
        end = time.monotonic() + timeout
        while not cond() and time.monotonic() < end:
            time.sleep(0.005)
        return cond()

    try:
        t.step_launched()
        t.step_landed()                  # no failure: lands quietly
        t.step_launched()
        t.step_launched()                # step N and N + 1 in flight
        broken.set()
        assert wait_for(lambda: len(releases) >= 1)
        with pytest.raises(ExecutorGone, match="executor died"):
            t.step_landed()              # N: its offloaded rows are void
        n = len(releases)
        assert wait_for(lambda: len(releases) > n)   # N + 1 still in flight: released again
        t.step_dropped()                 # N + 1 waited out and thrown away
        time.sleep(0.05)
        n = len(releases)
        time.sleep(0.05)
        assert len(releases) == n        # nothing in flight: no more releases
        broken.clear()
        t.step_launched()                # a new run of steps: the old failure is gone
        t.step_landed()
    finally:
        t.shutdown()
