"""Per-layer hand-off between two processes on GPUs: the candidate primitives, measured.

One process plays decode (GPU D), the other the attention executor (GPU P). Per step, decode sends
one schedule message (a pipe, as the product's socket), then per layer: it writes the offloaded
rows' q/k/v into its staging buffer and signals; the executor pulls them over NVLink, produces
an output (here a copy of the q part: no attention, so only the hand-off is timed), pushes it into
decode's output buffer and signals back; decode waits for it. Every layer's output is checked
against what decode sent (a counter in the data), so a variant that races fails instead of
looking fast.

Variants:
- ``socket``: today's CPU protocol on GPUs: copy, device synchronize, a byte on a socket, each way.
- ``memops-host``: stream memory operations (cuStreamWaitValue32/WriteValue32) on flags in a host
  shared-memory page registered with both GPUs; copies by the copy engines (cuMemcpyAsync). Both
  sides enqueue a whole step at once.
- ``memops-device``: the same with each flag in the memory of the GPU that waits on it (the other
  side writes it through NVLink).
- ``*-graph``: the same, each side's step captured in one CUDA graph.
- ``nccl``: torch.distributed send/recv over NVLink.

Reported per layer: the round trip, the same work without the hand-off (decode alone), the
difference (the hand-off's cost), and the copy time of the bytes alone (cuMemcpyAsync between
the GPUs inside one process) as the transfer floor.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

NUM_LAYERS = 32
STEPS, WARMUP = 40, 5
#: (name, q+k+v elements per row, output elements per row) of the shapes the issue names
SHAPES = {"llama-2-7b": (3 * 32 * 128, 32 * 128), "llama-3.1-8b": ((32 + 16) * 128, 32 * 128)}
VARIANTS = ("socket", "memops-host", "memops-device", "memops-host-graph", "memops-device-graph",
            "flags-memops-device-graph", "direct-memops-device-graph", "direct-memops-host-graph",
            "flags-spin-device-graph", "direct-spin-device-graph", "nccl")
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class Case:
    variant: str
    shape: str
    rows: int


@dataclass
class Result:
    variant: str
    shape: str
    rows: int
    layout: str
    round_trip_us: float | None = None   # per layer, decode's view
    alone_us: float | None = None        # per layer, decode's own work without the hand-off
    handoff_us: float | None = None      # round_trip - alone
    transfer_us: float | None = None     # the bytes alone, copy engines, one process
    ok: bool = False
    error: str = ""


def _env_for(mps_env: dict | None, sm_share: int | None) -> None:
    os.environ.update(NCCL_ENV)
    if mps_env:
        os.environ.update(mps_env)
        if sm_share:
            os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(sm_share)


class _Side:
    """Buffers of one side; names are shared through the run directory (adrenaline_py/shm.py)."""

    def __init__(self, role: str, gpu: int, peer_gpu: int, run_dir: str) -> None:
        from adrenaline_py import cuda_driver as cu
        from adrenaline_py.shm import create_shared_tensor

        self.cu, self.role, self.gpu, self.run_dir = cu, role, gpu, run_dir
        torch.cuda.set_device(gpu)
        self.device = torch.device(f"cuda:{gpu}")
        self.stream = torch.cuda.Stream(self.device)
        max_rows, max_in = 256, max(i for i, _ in SHAPES.values())
        # int32 views of bf16-sized rows: exact counters in the data; a bf16 row of E elements is E/2 words
        if role == "decode":
            self.staging = create_shared_tensor(run_dir, "staging", (max_rows, max_in // 2), torch.int32, self.device)
            self.out = create_shared_tensor(run_dir, "out", (max_rows, 4096 // 2), torch.int32, self.device)
            self.flag_o_dev = create_shared_tensor(run_dir, "flag_o", (1 + NUM_LAYERS,), torch.int32, self.device)
        else:
            self.inbuf = torch.zeros(max_rows, max_in // 2, dtype=torch.int32, device=self.device)
            self.out_local = torch.zeros(max_rows, 4096 // 2, dtype=torch.int32, device=self.device)
            self.flag_q_dev = create_shared_tensor(run_dir, "flag_q", (1 + NUM_LAYERS,), torch.int32, self.device)
        # host flags: [2, L] int32 in one page of /dev/shm; q flags (decode → executor) then o flags
        path = Path(run_dir, "flags.host")
        if role == "decode":
            with open(path, "wb") as f:
                f.truncate(4096)
        else:
            while not path.exists() or path.stat().st_size < 4096:
                time.sleep(0.01)
        self.host_flags = torch.from_file(str(path), shared=True, size=1024, dtype=torch.int32)
        self.host_flags_dev = cu.host_register(self.host_flags)

    def attach_peer(self) -> None:
        from adrenaline_py.shm import ipc_address

        if self.role == "decode":
            self.peer_flag_q = ipc_address(self.run_dir, "flag_q")
        else:
            self.peer_staging = ipc_address(self.run_dir, "staging")
            self.peer_out = ipc_address(self.run_dir, "out")
            self.peer_flag_o = ipc_address(self.run_dir, "flag_o")
            from adrenaline_py.shm import attach_shared_tensor

            widest = max(i for i, _ in SHAPES.values()) // 2
            self.staging_view = attach_shared_tensor(self.run_dir, "staging", (256, widest), torch.int32)
            self.out_view = attach_shared_tensor(self.run_dir, "out", (256, 4096 // 2), torch.int32)

    def rows(self, t: torch.Tensor, n: int, width: int) -> torch.Tensor:
        """The first n rows of ``width`` words of a buffer, packed (one contiguous block per layer)."""
        return t.view(-1)[: n * width].view(n, width)

    def flag_addrs(self, variant: str) -> tuple[int, int]:
        """(q flag base, o flag base) as this side addresses them."""
        if "host" in variant:
            return self.host_flags_dev, self.host_flags_dev + 4 * NUM_LAYERS
        # device flags: word 0 holds the epoch (spin kernels), layer l's flag is word 1 + l
        if self.role == "decode":
            return self.peer_flag_q + 4, self.flag_o_dev.data_ptr() + 4
        return self.flag_q_dev.data_ptr() + 4, self.peer_flag_o + 4


def _decode_step(side: _Side, case: Case, res: torch.Tensor, q_addr: int, o_addr: int, handoff: bool) -> None:
    cu, n = side.cu, case.rows
    in_words = SHAPES[case.shape][0] // 2
    s = side.stream
    staging = side.rows(side.staging, n, in_words)
    spin = handoff and "spin" in case.variant
    if spin:
        signal, wait_and_reset = _spin_kernels()
        flag_q, flag_o = _spin_flags(side)
    with torch.cuda.stream(s):
        for layer in range(NUM_LAYERS):
            staging.add_(1)                            # this layer's q/k/v (a new counter value)
            if spin:
                signal(flag_q, 1 + layer)
                wait_and_reset(flag_o, 1 + layer)
            elif handoff:
                cu.stream_write_value32(q_addr + 4 * layer, 1, s)
                cu.stream_wait_value32(o_addr + 4 * layer, 1, s)
                cu.stream_write_value32(o_addr + 4 * layer, 0, s)
            res[layer].copy_(side.out[n - 1, 0])       # decode reads the executor's output


def _spin_kernels():
    """The product's flag kernels (adrenaline_py/transport.py): word 0 of a flag tensor is the epoch."""
    from adrenaline_py.transport import signal_flag, wait_flag

    return signal_flag, wait_flag


def _spin_flags(side: _Side) -> tuple[torch.Tensor, torch.Tensor]:
    """(q flags, o flags) as tensors of this side's device; each lives on the GPU that waits on it."""
    from adrenaline_py.shm import attach_shared_tensor

    if not hasattr(side, "spin_flags"):
        if side.role == "decode":
            side.spin_flags = (attach_shared_tensor(side.run_dir, "flag_q", (1 + NUM_LAYERS,), torch.int32),
                               side.flag_o_dev)
        else:
            side.spin_flags = (side.flag_q_dev,
                               attach_shared_tensor(side.run_dir, "flag_o", (1 + NUM_LAYERS,), torch.int32))
    return side.spin_flags


def _executor_step(side: _Side, case: Case, q_addr: int, o_addr: int) -> None:
    cu, n = side.cu, case.rows
    in_words = SHAPES[case.shape][0] // 2
    out_words = SHAPES[case.shape][1] // 2
    s = side.stream
    inbuf = side.rows(side.inbuf, n, in_words)
    data = "none" if case.variant.startswith("flags") else "sm" if case.variant.startswith("direct") else "ce"
    if data == "sm":
        staging = side.rows(side.staging_view, n, in_words)
    spin = "spin" in case.variant
    if spin:
        signal, wait_and_reset = _spin_kernels()
        flag_q, flag_o = _spin_flags(side)
    with torch.cuda.stream(s):
        for layer in range(NUM_LAYERS):
            if spin:
                wait_and_reset(flag_q, 1 + layer)
            else:
                cu.stream_wait_value32(q_addr + 4 * layer, 1, s)
                cu.stream_write_value32(q_addr + 4 * layer, 0, s)
            if data == "ce":  # copy engines: pull q/k/v, compute locally, push the output back
                cu.memcpy_async(inbuf.data_ptr(), side.peer_staging, n * in_words * 4, s)
                side.out_local[:n].copy_(inbuf[:, :out_words])     # "attention": the q part
                cu.memcpy_async(side.peer_out, side.out_local.data_ptr(), n * out_words * 4, s)
            elif data == "sm":  # one kernel reads q from decode's GPU and writes the output there (NVLink)
                torch.add(staging[:, :out_words], 0, out=side.out_view[:n, :out_words])
            if spin:
                signal(flag_o, 1 + layer)
            else:
                cu.stream_write_value32(o_addr + 4 * layer, 1, s)


def _reset_flags(side: _Side) -> None:
    side.host_flags.zero_()
    own = side.flag_o_dev if side.role == "decode" else side.flag_q_dev
    own.zero_()
    own[0] = 1  # the epoch of the spin kernels (both sides read their own flag tensor's word 0)
    torch.cuda.synchronize()


def _run_decode(conn, peer, gpu: int, peer_gpu: int, run_dir: str, mps_env: dict | None) -> None:
    _env_for(mps_env, None)
    try:
        side = _Side("decode", gpu, peer_gpu, run_dir)
        conn.send(("created", None))
        assert conn.recv() == "attach"
        side.attach_peer()
        conn.send(("attached", None))
        while True:
            msg = conn.recv()
            if msg is None:
                return
            case: Case = msg
            try:
                conn.send(("result", _decode_case(side, case, peer)))
            except Exception as e:  # report, keep going with the next case
                conn.send(("result", {"ok": False, "error": f"{type(e).__name__}: {e}",
                                      "trace": traceback.format_exc()[-2000:]}))
    except Exception as e:
        conn.send(("fatal", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"))


def _timed_steps(run_step, check) -> list[float]:
    times = []
    for i in range(WARMUP + STEPS):
        t0 = time.perf_counter()
        run_step(i)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        check(i)
        if i >= WARMUP:
            times.append(dt)
    return times


def _decode_case(side: _Side, case: Case, peer) -> dict:
    """Decode's side of one case; the executor runs the matching loop, driven by decode's messages on ``peer``."""
    n, in_words = case.rows, SHAPES[case.shape][0] // 2
    res = torch.zeros(NUM_LAYERS, dtype=torch.int32, device=side.device)
    side.staging.zero_()
    staging = side.rows(side.staging, n, in_words)
    staging.copy_(torch.randint(0, 1 << 20, (n, in_words), dtype=torch.int32, device=side.device))
    _reset_flags(side)
    expected = {"base": None}

    def check(i: int) -> None:
        got = res.tolist()
        base = expected["base"]
        want = [base + i * NUM_LAYERS + 1 + layer for layer in range(NUM_LAYERS)]
        if got != want:
            raise AssertionError(f"step {i}: executor output {got[:4]}... expected {want[:4]}...")

    # the first row of the last offloaded row's q part, before any step: the counter's base
    expected["base"] = int(staging[n - 1, 0])
    v = case.variant
    if v == "alone":
        # decode's own per-layer work, no hand-off (the executor is not involved); output not checked
        return {"times": _timed_steps(lambda i: _decode_step(side, case, res, 0, 0, handoff=False), lambda i: None)}
    if v == "alone-graph":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side.stream):
            _decode_step(side, case, res, 0, 0, handoff=False)
        return {"times": _timed_steps(lambda i: graph.replay(), lambda i: None)}
    q_addr, o_addr = side.flag_addrs(v) if "memops" in v else (0, 0)
    if "spin" in v:  # spin flags: warm the kernels up (compile) before any capture
        _decode_spin_warmup(side)
    if v.startswith("flags"):  # no data moves: the output is not the executor's
        check = lambda i: None  # noqa: E731
    if v in ("memops-host", "memops-device", "spin-device"):
        def step(i: int) -> None:
            peer.send(("step", i))
            _decode_step(side, case, res, q_addr, o_addr, handoff=True)
        return {"times": _timed_steps(step, check)}
    if v.endswith("-graph"):
        graph = torch.cuda.CUDAGraph()
        # capture only records: no flag is written until the graph replays
        with torch.cuda.graph(graph, stream=side.stream):
            _decode_step(side, case, res, q_addr, o_addr, handoff=True)
        peer.send(("captured", None))

        def step(i: int) -> None:
            peer.send(("step", i))
            with torch.cuda.stream(side.stream):
                graph.replay()
        return {"times": _timed_steps(step, check)}
    if v == "socket":
        return {"times": _socket_decode(side, case, res, peer, check)}
    if v == "nccl":
        return {"times": _nccl_decode(side, case, res, peer, check)}
    raise ValueError(v)


def _decode_spin_warmup(side: _Side) -> None:
    from adrenaline_py.transport import warm_up_flag_kernels

    warm_up_flag_kernels(side.device)


def _socket_decode(side: _Side, case: Case, res, peer, check) -> list[float]:
    """Today's protocol: per layer copy into the executor's buffer, device sync, doorbell, wait for its answer."""
    import socket

    from adrenaline_py.shm import attach_shared_tensor

    n, in_words = case.rows, SHAPES[case.shape][0] // 2
    peer.send(("socket", None))
    inbuf = attach_shared_tensor(side.run_dir, "exec_in", (256, side.staging.shape[1]), torch.int32)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _ in range(200):
        try:
            sock.connect(str(Path(side.run_dir, "doorbell.sock")))
            break
        except OSError:
            time.sleep(0.05)

    staging, remote = side.rows(side.staging, n, in_words), side.rows(inbuf, n, in_words)

    def step(i: int) -> None:
        for layer in range(NUM_LAYERS):
            staging.add_(1)
            remote.copy_(staging)                           # cross-device copy into the executor's memory
            torch.cuda.synchronize()
            sock.sendall(b"L")
            if sock.recv(1) != b"O":
                raise ConnectionError("executor closed")
            res[layer].copy_(side.out[n - 1, 0])

    try:
        return _timed_steps(step, check)
    finally:
        sock.close()


def _nccl_decode(side: _Side, case: Case, res, peer, check) -> list[float]:
    import torch.distributed as dist

    n, in_words = case.rows, SHAPES[case.shape][0] // 2
    out_words = SHAPES[case.shape][1] // 2
    peer.send(("nccl", None))
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"file://{side.run_dir}/pg", rank=0, world_size=2,
                                device_id=side.device)
    recv_buf = torch.zeros(n, out_words, dtype=torch.int32, device=side.device)
    staging = side.rows(side.staging, n, in_words)

    def step(i: int) -> None:
        for layer in range(NUM_LAYERS):
            staging.add_(1)
            dist.send(staging, dst=1)
            dist.recv(recv_buf, src=1)
            res[layer].copy_(recv_buf[n - 1, 0])

    return _timed_steps(step, check)


def _run_executor(conn, peer, gpu: int, peer_gpu: int, run_dir: str, mps_env: dict | None,
                  sm_share: int | None) -> None:
    from multiprocessing.connection import wait

    _env_for(mps_env, sm_share)
    try:
        side = _Side("executor", gpu, peer_gpu, run_dir)
        conn.send(("created", None))
        assert conn.recv() == "attach"
        side.attach_peer()
        conn.send(("attached", None))
        case: Case | None = None
        graph = None
        while True:
            ready = wait([conn, peer])
            source = peer if peer in ready else conn  # decode's messages first
            msg = source.recv()
            if msg is None:
                return
            if isinstance(msg, Case):
                case, graph = msg, None
                if "memops" in case.variant or "spin" in case.variant:
                    _reset_flags(side)
                if "spin" in case.variant:
                    _decode_spin_warmup(side)
                conn.send(("ready", None))
                continue
            kind, _ = msg
            q_addr, o_addr = side.flag_addrs(case.variant) if "memops" in case.variant else (0, 0)
            if kind == "step" and graph is None:
                _executor_step(side, case, q_addr, o_addr)
            elif kind == "step":
                with torch.cuda.stream(side.stream):
                    graph.replay()
            elif kind == "captured":
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side.stream):
                    _executor_step(side, case, q_addr, o_addr)
            elif kind == "socket":
                _socket_executor(side, case)
            elif kind == "nccl":
                _nccl_executor(side, case)
    except Exception as e:
        conn.send(("fatal", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"))


def _socket_executor(side: _Side, case: Case) -> None:
    import socket

    from adrenaline_py.shm import create_shared_tensor

    n, out_words = case.rows, SHAPES[case.shape][1] // 2
    if not hasattr(side, "exec_in"):
        side.exec_in = create_shared_tensor(side.run_dir, "exec_in", tuple(side.inbuf.shape), torch.int32,
                                            side.device)
    path = Path(side.run_dir, "doorbell.sock")
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    conn, _ = listener.accept()
    with conn, listener:
        while conn.recv(1) == b"L":
            exec_in = side.rows(side.exec_in, n, SHAPES[case.shape][0] // 2)
            side.out_view[:n, :out_words].copy_(exec_in[:, :out_words])  # into decode's memory, across devices
            torch.cuda.synchronize()
            conn.sendall(b"O")


def _nccl_executor(side: _Side, case: Case) -> None:
    import torch.distributed as dist

    n, in_words = case.rows, SHAPES[case.shape][0] // 2
    out_words = SHAPES[case.shape][1] // 2
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"file://{side.run_dir}/pg", rank=1, world_size=2,
                                device_id=side.device)
    buf = torch.zeros(n, in_words, dtype=torch.int32, device=side.device)
    for _ in range((WARMUP + STEPS) * NUM_LAYERS):
        dist.recv(buf, src=0)
        dist.send(buf[:, :out_words].contiguous(), dst=0)


def transfer_floor_us(decode_gpu: int, exec_gpu: int, shape: str, rows: int) -> float:
    """cuMemcpyAsync of one layer's q/k/v D→P plus its output P→D, in one process (events, median)."""
    import triton.testing

    from adrenaline_py import cuda_driver as cu

    in_bytes, out_bytes = rows * SHAPES[shape][0] * 2, rows * SHAPES[shape][1] * 2
    torch.cuda.set_device(exec_gpu)
    cu.enable_peer_access(exec_gpu, decode_gpu)
    src_d = torch.randn(in_bytes // 2, device=f"cuda:{decode_gpu}", dtype=torch.bfloat16)
    dst_p = torch.empty(in_bytes // 2, device=f"cuda:{exec_gpu}", dtype=torch.bfloat16)
    out_p = torch.randn(out_bytes // 2, device=f"cuda:{exec_gpu}", dtype=torch.bfloat16)
    out_d = torch.empty(out_bytes // 2, device=f"cuda:{decode_gpu}", dtype=torch.bfloat16)
    def both() -> None:
        s = torch.cuda.current_stream()  # the capture stream inside torch.cuda.graph
        cu.memcpy_async(dst_p.data_ptr(), src_d.data_ptr(), in_bytes, s)
        cu.memcpy_async(out_d.data_ptr(), out_p.data_ptr(), out_bytes, s)

    graph = torch.cuda.CUDAGraph()  # no launch gaps: the copies alone
    with torch.cuda.graph(graph):
        for _ in range(10):
            both()
    return triton.testing.do_bench(graph.replay, warmup=20, rep=100, return_mode="median") * 1e3 / 10


def _transfer_floors(keys: list[tuple[str, int]]) -> dict:
    if torch.cuda.device_count() < 2:
        return {}
    return {k: transfer_floor_us(1, 0, *k) for k in keys}


def _child(q, fn, arg) -> None:
    os.environ.update(NCCL_ENV)
    try:
        q.put(fn(arg))
    except Exception as e:
        q.put(f"{type(e).__name__}: {e}")


def _in_child(fn, arg):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, fn, arg))
    p.start()
    try:
        return q.get(timeout=300)
    finally:
        p.join(30)


def run_layout(layout: str, decode_gpu: int, exec_gpu: int, mps: bool, sm_share: int | None,
               cases: list[Case]) -> list[Result]:
    from adrenaline_py.serving.launcher import MPSDaemon

    results: list[Result] = []
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="handoff-", dir="/dev/shm") as run_dir:
        daemon = None
        mps_env = None
        if mps:
            daemon = MPSDaemon(Path(run_dir))
            daemon.start()
            mps_env = daemon.env
        d_conn, d_child = ctx.Pipe()
        e_conn, e_child = ctx.Pipe()
        d_peer, e_peer = ctx.Pipe()
        dproc = ctx.Process(target=_run_decode, args=(d_child, d_peer, decode_gpu, exec_gpu, run_dir, mps_env))
        eproc = ctx.Process(target=_run_executor,
                            args=(e_child, e_peer, exec_gpu, decode_gpu, run_dir, mps_env, sm_share))
        dproc.start()
        eproc.start()
        try:
            for c in (d_conn, e_conn):
                kind, info = _recv(c, 180)
                if kind != "created":
                    raise RuntimeError(info)
            for c in (d_conn, e_conn):
                c.send("attach")
            for c in (d_conn, e_conn):
                kind, info = _recv(c, 120)
                if kind != "attached":
                    raise RuntimeError(info)
            for case in cases:
                results.append(_run_case(layout, case, d_conn, e_conn))
                print(_row(results[-1]), flush=True)
        except Exception as e:
            results.append(Result("setup", "", 0, layout, error=f"{type(e).__name__}: {e}"))
            print(f"{layout}: {e}", flush=True)
        finally:
            for c in (d_conn, e_conn):
                try:
                    c.send(None)
                except OSError:
                    pass
            for p in (dproc, eproc):
                p.join(20)
                if p.is_alive():
                    p.kill()
            if daemon is not None:
                daemon.stop()
    return results


def _recv(conn, timeout: float):
    if not conn.poll(timeout):
        raise TimeoutError(f"no answer in {timeout:.0f}s")
    return conn.recv()


def _run_case(layout: str, case: Case, d_conn, e_conn) -> Result:
    r = Result(case.variant, case.shape, case.rows, layout)
    e_conn.send(case)
    kind, info = _recv(e_conn, 60)
    if kind != "ready":
        r.error = str(info)
        return r
    d_conn.send(case)
    if not d_conn.poll(90):
        r.error = "timed out (a wait that never completed?)"
        if e_conn.poll(0):
            r.error += f"; executor: {e_conn.recv()}"
        raise TimeoutError(f"{case}: {r.error}")  # the sides are stuck: this layout cannot go on
    kind, info = d_conn.recv()
    if kind == "fatal":
        r.error = info
        return r
    if not info.get("ok", True):
        r.error = info.get("error", "") + "\n" + info.get("trace", "")
        return r
    times = info["times"]
    r.round_trip_us = statistics.median(times) / NUM_LAYERS * 1e6
    r.ok = True
    return r


def _row(r: Result) -> str:
    f = lambda x: "—" if x is None else f"{x:.1f}"
    status = "ok" if r.ok else f"FAILED: {r.error.splitlines()[0] if r.error else ''}"
    return (f"| {r.layout} | {r.variant} | {r.shape} | {r.rows} | {f(r.round_trip_us)} | {f(r.alone_us)} | "
            f"{f(r.handoff_us)} | {f(r.transfer_us)} | {status} |")


HEADER = ("| layout | primitive | shape | rows | round trip µs/layer | decode alone µs/layer | hand-off µs/layer | "
          "transfer µs (copy engines) | |\n|---|---|---|---:|---:|---:|---:|---:|---|")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--rows", nargs="+", type=int, default=[64, 256])
    p.add_argument("--layouts", nargs="+", default=["2gpu", "2gpu-mps", "1gpu-mps"])
    p.add_argument("--executor-sm-share", type=int, default=30)
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--peer-store", action="store_true", help="also check kernels writing into the other GPU")
    a = p.parse_args(argv)
    os.environ.update(NCCL_ENV)
    if a.peer_store:
        peer = peer_store_check() if torch.cuda.device_count() >= 2 else []
        print("peer store:", json.dumps(peer), flush=True)
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            Path(a.out, "peer_store.json").write_text(json.dumps(peer, indent=1))
    cases = [Case(v, s, n) for s in a.shapes for n in a.rows for v in ("alone", "alone-graph", *a.variants)]
    results: list[Result] = []
    print(HEADER, flush=True)
    for layout in a.layouts:
        two = layout.startswith("2gpu")
        if two and torch.cuda.device_count() < 2:
            print(f"{layout}: skipped, {torch.cuda.device_count()} GPU(s)")
            continue
        decode_gpu, exec_gpu = (1, 0) if two else (0, 0)
        mps = layout.endswith("mps")
        layout_cases = [c for c in cases if not (c.variant == "nccl" and not two)]  # NCCL needs two GPUs
        got = run_layout(layout, decode_gpu, exec_gpu, mps, a.executor_sm_share if mps else None, layout_cases)
        alone = {(r.shape, r.rows, r.variant.endswith("graph")): r.round_trip_us
                 for r in got if r.variant.startswith("alone") and r.ok}
        for r in got:
            if not r.variant.startswith("alone") and r.ok:
                r.alone_us = alone.get((r.shape, r.rows, r.variant.endswith("graph")))
                if r.alone_us is not None:
                    r.handoff_us = r.round_trip_us - r.alone_us
        results += got
    floors = _in_child(_transfer_floors, sorted({(r.shape, r.rows) for r in results if r.rows}))
    for r in results:
        if r.layout.startswith("2gpu") and r.variant not in ("alone", "alone-graph", "setup"):
            r.transfer_us = floors.get((r.shape, r.rows)) if isinstance(floors, dict) else None
    table = HEADER + "\n" + "\n".join(_row(r) for r in results)
    print("\n" + table)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "handoff.md").write_text(table + "\n")
        Path(a.out, "handoff.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0



# --- a kernel on one GPU writing into another process's memory on the other GPU ----------------------

_POOL_SHAPE = (2, 2, 64, 16, 8, 128)


def _peer_owner(conn, gpu: int, run_dir: str) -> None:
    from adrenaline_py.shm import create_shared_tensor

    torch.cuda.set_device(gpu)
    kv = create_shared_tensor(run_dir, "pool", _POOL_SHAPE, torch.bfloat16, f"cuda:{gpu}")
    create_shared_tensor(run_dir, "big", (1 << 28,), torch.bfloat16, f"cuda:{gpu}")  # 512 MiB
    kv.fill_(float("nan"))
    torch.cuda.synchronize()
    conn.send("created")
    report = {}
    while (msg := conn.recv()) is not None:
        how, slots, k, v = msg
        torch.cuda.synchronize()
        flat = kv[1].view(2, -1, 8, 128).cpu()
        ok = torch.equal(flat[0, slots], k) and torch.equal(flat[1, slots], v)
        report[how] = ok
        kv.fill_(float("nan"))
        torch.cuda.synchronize()
        conn.send(ok)
    conn.send(report)


def _peer_writer(conn, gpu: int, owner_gpu: int, run_dir: str, how: str) -> None:
    import triton.testing

    from adrenaline_py.attention.triton_decode import store_kv_triton
    from adrenaline_py.shm import attach_shared_tensor

    os.environ.update(NCCL_ENV)
    torch.cuda.set_device(gpu)
    out: dict = {"how": how}
    try:
        kv = attach_shared_tensor(run_dir, "pool", _POOL_SHAPE, torch.bfloat16)  # labelled cuda:<gpu>
        out["label"] = str(kv.device)
        g = torch.Generator(device=f"cuda:{gpu}").manual_seed(1)
        k = torch.randn(20, 8, 128, generator=g, device=f"cuda:{gpu}").to(torch.bfloat16)
        v = torch.randn(20, 8, 128, generator=g, device=f"cuda:{gpu}").to(torch.bfloat16)
        slots = torch.randperm(64 * 16, generator=g, device=f"cuda:{gpu}")[:20]
        if how == "triton":
            store_kv_triton(kv, 1, slots, k, v)
        else:
            from adrenaline_py.attention.base import store_kv
            store_kv(kv, 1, slots, k, v)
        torch.cuda.synchronize(gpu)
        conn.send((how, slots.cpu(), k.cpu(), v.cpu()))
        out["store_kv_ok"] = conn.recv()
        if how == "triton":
            # a captured copy into the peer tensor, and the bandwidth of writes/reads through NVLink
            flat = kv.view(-1)
            src = torch.randn(flat.numel(), device=f"cuda:{gpu}").to(torch.bfloat16)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                flat.copy_(src)
            graph.replay()
            torch.cuda.synchronize()
            out["graph_copy_ok"] = bool(torch.equal(flat.cpu(), src.cpu()))
            big = attach_shared_tensor(run_dir, "big", (1 << 28,), torch.bfloat16)
            bsrc = torch.randn(1 << 28, device=f"cuda:{gpu}").to(torch.bfloat16)
            for name, fn in (("copy_into_peer_GBps", lambda: big.copy_(bsrc)),
                             ("copy_from_peer_GBps", lambda: bsrc.copy_(big)),
                             ("add_into_peer_GBps", lambda: torch.add(bsrc, 1, out=big))):
                ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
                out[name] = 2 * big.numel() * 2 / ms / 1e6 / 2  # bytes crossing NVLink (one way) per second
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        try:
            conn.send(None)
        except OSError:
            pass
    conn.send(("done", out))


def peer_store_check(owner_gpu: int = 1, writer_gpu: int = 0) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory(prefix="peer-", dir="/dev/shm") as run_dir:
        o_conn, o_child = ctx.Pipe()
        owner = ctx.Process(target=_peer_owner, args=(o_child, owner_gpu, run_dir))
        owner.start()
        assert _recv(o_conn, 120) == "created"
        for how in ("triton", "torch"):
            w_conn, w_child = ctx.Pipe()
            writer = ctx.Process(target=_peer_writer, args=(w_child, writer_gpu, owner_gpu, run_dir, how))
            writer.start()
            try:
                while True:
                    msg = _recv(w_conn, 120)
                    if isinstance(msg, tuple) and msg[0] == "done":
                        results.append(msg[1])
                        break
                    if msg is None:
                        continue
                    o_conn.send(msg)
                    w_conn.send(_recv(o_conn, 60))
            except Exception as e:
                results.append({"how": how, "error": f"{type(e).__name__}: {e}"})
            writer.join(30)
            if writer.is_alive():
                writer.kill()
        o_conn.send(None)
        _recv(o_conn, 30)
        owner.join(30)
    return results


if __name__ == "__main__":
    raise SystemExit(main())
