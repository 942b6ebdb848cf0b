"""Decode ↔ attention-executor data plane: per-layer q/k/v out, attention output back.

A connection starts with HELLO(epoch) from decode and READY(epoch) from the executor, sent once
the executor has attached decode's exchange buffers and, on CUDA, captured its step graphs for
them: decode launches no step (and so no wait on the GPU) before the executor's set-up is done,
and no capture runs while decode's waits spin.

Protocol of one decode step with N offloaded rows (N padded to the step's bucket):

1. control, once per step: decode sends a STEP frame on the executor's socket (`OffloadStep`:
   which sequences joined, with their block tables, which left, the order of the rows and their
   context lengths). Block allocation is not on this path: blocks were reserved at admission.
   Both sides pad the rows to the same bucket (`engine/cuda_graphs.offload_buckets`) when they
   replay graphs; padding rows store nothing and are never read.
2. data, per layer l: decode writes the rows' post-RoPE q/k/v into the exchange buffer and signals
   layer l, then runs local attention for its own rows; the executor stores k/v into its pool,
   runs attention, writes the output into the exchange buffer and signals back; decode waits for
   that signal only when it needs the rows (after its local attention).

   With every row offloaded, decode may cut the step into two batches (``split``: rows [0, split)
   and [split, N)) whose layers interleave (two-batch overlap): each batch has its own flags per
   layer (`ExchangeBuffers.slot`) and its own rows of the exchange buffers, so the executor runs
   one batch's attention while decode runs the other's dense work.

Two implementations of that data plane share the interface (`OffloadTransport` on decode's side,
`ExecutorEndpoint` on the executor's side) and the control socket:

- **host** (CPU): the exchange buffers are POSIX shared memory and the per-layer signals are
  LAYER/OUT bytes on the socket;
- **device** (CUDA): the exchange buffers live in decode's GPU memory; the executor's kernels read
  q/k/v and write outputs there directly through NVLink (peer access; the buffers are tensors of
  the executor's own device, see adrenaline_py/shm.py), and the signals are flags in that memory
  written with release and polled with acquire semantics at system scope by one-warp Triton
  kernels. No host synchronization and no host round trip per layer; every per-layer operation
  is a kernel, so a whole step (either side's) can be captured in one CUDA graph. Measured
  against the alternatives in adrenaline_py/bench_handoff.py.

Decode owns all exchange memory (so its captured graphs survive an executor restart). Each
connection gets a random *epoch*: a signal writes the epoch, a wait waits for it and resets the
flag to 0, so a late write of an earlier connection never releases a wait of the current one.
A wait never hangs forever: on a dead or stalled executor decode's watchdog releases decode's own
waits from the host, and the step is redone after recovery (adrenaline_py/engine/decode.py).
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import random
import select
import signal
import socket
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adrenaline_py.config import EngineConfig, ModelConfig
from adrenaline_py.placement import bind, private_stream
from adrenaline_py.shm import attach_shared_tensor, create_shared_tensor
from adrenaline_py.triton_support import tl, triton

log = logging.getLogger(__name__)

_HELLO, _READY, _STEP, _LAYER, _OUT, _ERROR = b"H", b"R", b"S", b"L", b"O", b"E"
_INT = struct.Struct("<i")


@dataclass
class OffloadStep:
    """The one per-step schedule message; carries only what changed plus this step's row order."""

    step_id: int
    joined: dict[int, list[int]] = field(default_factory=dict)  # seq id → block table
    left: list[int] = field(default_factory=list)              # seq ids that finished
    seq_ids: list[int] = field(default_factory=list)           # the N rows, in batch order
    seq_lens: list[int] = field(default_factory=list)          # [N] context incl. the new token
    split: int = 0  # two batches: rows [0, split) and [split, N) (padded to the bucket); 0: one batch


class ExecutorGone(RuntimeError):
    """The attention executor is unreachable or failed; offloaded rows cannot be served."""


def socket_path(engine: EngineConfig) -> Path:
    return Path(engine.run_dir) / "executor.sock"


# --- exchange memory ------------------------------------------------------------------------------

def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass
class ExchangeBuffers:
    """Decode-owned buffers of the per-layer exchange (one slot: layer l + 1 is written only after
    layer l's output was read, on both sides).

    qkv:  [R, (Hq + 2 Hkv) D]  the offloaded rows' post-RoPE q | k | v, in the model dtype
    out:  [R, Hq, D]           their attention output
    ctrl: int32, device variant only: [0] the connection's epoch; a line of wait counters
          (``waits``); q flags at ``q_flags`` (decode → executor: layer l's q/k/v are in place),
          o flags at ``o_flags`` (executor → decode)

    The wait counters are int64 nanoseconds of GPU time spent spinning in flag waits, summed since
    the buffers were made: ``WAIT_DECODE`` decode waiting for the executor's outputs (the executor
    was the slower side of a layer), ``WAIT_EXECUTOR_FIRST`` the executor waiting for a step's
    first layer (it was ready before decode), ``WAIT_EXECUTOR`` the executor waiting for later
    layers (decode was the slower side).
    """

    qkv: torch.Tensor
    out: torch.Tensor
    ctrl: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    head_dim: int

    NAMES = ("offload.qkv", "offload.out", "offload.ctrl")
    HEADER = 32  # int32 slots of the first 128-byte line: [0] the epoch
    STATS = 32   # the next line: int64 wait counters
    WAIT_DECODE, WAIT_EXECUTOR_FIRST, WAIT_EXECUTOR = 0, 1, 2

    @staticmethod
    def shapes(model: ModelConfig, engine: EngineConfig) -> dict[str, tuple[int, ...]]:
        hq, hkv, d = model.num_attention_heads, model.num_key_value_heads, model.head_dim
        rows = engine.max_decode_batch
        # separate 128-byte lines for the header, the counters, q flags and o flags (two per layer)
        ctrl = ExchangeBuffers.HEADER + ExchangeBuffers.STATS + 2 * _round_up(2 * model.num_hidden_layers, 32)
        return {"offload.qkv": (rows, (hq + 2 * hkv) * d), "offload.out": (rows, hq, d), "offload.ctrl": (ctrl,)}

    @classmethod
    def create(cls, model: ModelConfig, engine: EngineConfig, dtype: torch.dtype, device: torch.device,
               ) -> ExchangeBuffers:
        return cls._make(model, engine, dtype, device, create=True)

    @classmethod
    def attach(cls, model: ModelConfig, engine: EngineConfig, dtype: torch.dtype, device: torch.device,
               ) -> ExchangeBuffers:
        return cls._make(model, engine, dtype, device, create=False)

    @classmethod
    def _make(cls, model, engine, dtype, device, create: bool) -> ExchangeBuffers:
        shapes = cls.shapes(model, engine)
        names = cls.NAMES if device.type == "cuda" else cls.NAMES[:2]

        def region(name: str) -> torch.Tensor:
            dt = torch.int32 if name == "offload.ctrl" else dtype
            if create:
                return create_shared_tensor(engine.run_dir, name, shapes[name], dt, device)
            kw = {"device": device.index} if device.type == "cuda" else {}
            return attach_shared_tensor(engine.run_dir, name, shapes[name], dt, **kw)

        t = {name: region(name) for name in names}
        return cls(t["offload.qkv"], t["offload.out"], t.get("offload.ctrl"), model.num_attention_heads,
                   model.num_key_value_heads, model.head_dim)

    @staticmethod
    def slot(layer: int, part: int = 0) -> int:
        """The flag (and socket frame) index of a layer's exchange for batch ``part`` (0, or 1 in two-batch steps)."""
        return 2 * layer + part

    @property
    def q_flags(self) -> int:
        return self.HEADER + self.STATS

    @property
    def o_flags(self) -> int:
        return self.q_flags + (self.ctrl.shape[0] - self.q_flags) // 2

    def waits(self, slot: int) -> torch.Tensor:
        """The int64 wait counter ``slot`` (a one-element view of ``ctrl``, given to `wait_flag`)."""
        return self.ctrl[self.HEADER: self.HEADER + self.STATS].view(torch.int64)[slot: slot + 1]

    def wait_seconds(self) -> tuple[float, float, float]:
        """The three wait counters in seconds (one small device-to-host copy)."""
        ns = self.ctrl[self.HEADER: self.HEADER + 6].view(torch.int64).tolist()
        return ns[0] / 1e9, ns[1] / 1e9, ns[2] / 1e9

    def split(self, n: int, row0: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [n, Hq, D], k and v [n, Hkv, D]: views of rows [row0, row0 + n)."""
        qd, kd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        rows = self.qkv[row0:row0 + n]
        return (rows[:, :qd].view(n, self.num_heads, self.head_dim),
                rows[:, qd:qd + kd].view(n, self.num_kv_heads, self.head_dim),
                rows[:, qd + kd:].view(n, self.num_kv_heads, self.head_dim))

    def views(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v and out of a batch's exchange rows (what its attention reads and writes)."""
        q, k, v = self.split(batch.rows, batch.row0)
        return q, k, v, self.out[batch.row0:batch.row0 + batch.rows]

    def store_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row0: int = 0) -> None:
        """Write the rows' q/k/v from row ``row0`` on: one copy when they are adjacent views of one qkv
        row (the model's case)."""
        n = q.shape[0]
        width = self.qkv.shape[1]
        elem = q.element_size()
        qd, kd = q.shape[1] * q.shape[2], k.shape[1] * k.shape[2]
        if (q.stride(0) == width and k.stride(0) == width and v.stride(0) == width
                and k.data_ptr() == q.data_ptr() + qd * elem and v.data_ptr() == k.data_ptr() + kd * elem
                and q.stride(2) == 1 and q.stride(1) == q.shape[2] and q.dtype == self.qkv.dtype):
            self.qkv[row0:row0 + n].copy_(torch.as_strided(q, (n, width), (width, 1)))
            return
        dq, dk, dv = self.split(n, row0)
        dq.copy_(q)
        dk.copy_(k)
        dv.copy_(v)


# --- the control socket (both variants) -----------------------------------------------------------

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the offload channel")
        buf += chunk
    return bytes(buf)


class Channel:
    """Framing on one decode ↔ executor connection: HELLO(epoch), READY(epoch), STEP, LAYER(l), OUT(l),
    ERROR(text)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send_hello(self, epoch: int) -> None:
        self.sock.sendall(_HELLO + _INT.pack(epoch))

    def send_ready(self, epoch: int) -> None:
        self.sock.sendall(_READY + _INT.pack(epoch))

    def send_step(self, step: OffloadStep) -> None:
        payload = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(_STEP + _INT.pack(len(payload)) + payload)

    def send_layer(self, layer: int) -> None:
        self.sock.sendall(_LAYER + _INT.pack(layer))

    def send_out(self, layer: int) -> None:
        self.sock.sendall(_OUT + _INT.pack(layer))

    def send_error(self, message: str) -> None:
        data = message.encode()
        self.sock.sendall(_ERROR + _INT.pack(len(data)) + data)

    def read_frame(self) -> tuple[bytes, int | OffloadStep | str]:
        kind = _recv_exact(self.sock, 1)
        value = _INT.unpack(_recv_exact(self.sock, _INT.size))[0]
        if kind == _STEP:
            return kind, pickle.loads(_recv_exact(self.sock, value))
        if kind == _ERROR:
            return kind, _recv_exact(self.sock, value).decode()
        if kind in (_HELLO, _READY, _LAYER, _OUT):
            return kind, value
        raise ConnectionError(f"unexpected frame {kind!r}")

    def close(self) -> None:
        self.sock.close()


HELLO_FRAME, READY_FRAME, STEP_FRAME, LAYER_FRAME, OUT_FRAME, ERROR_FRAME = _HELLO, _READY, _STEP, _LAYER, _OUT, _ERROR


# --- flags on the GPU -----------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _signal_kernel(ctrl_ptr, index):
        # release at system scope: the exchange data written before (earlier kernels of this
        # stream) is visible to the other GPU before the flag is
        epoch = tl.load(ctrl_ptr)
        tl.atomic_xchg(ctrl_ptr + index, epoch, sem="release", scope="sys")

    @triton.jit
    def _globaltimer():
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                         pack=1)

    @triton.jit
    def _wait_kernel(ctrl_ptr, index, waited_ptr, TIMED: tl.constexpr):
        epoch = tl.load(ctrl_ptr)
        started = _globaltimer()
        seen = tl.atomic_add(ctrl_ptr + index, 0, sem="acquire", scope="sys")
        while seen != epoch:
            seen = tl.atomic_add(ctrl_ptr + index, 0, sem="acquire", scope="sys")
        tl.atomic_xchg(ctrl_ptr + index, 0, sem="relaxed", scope="sys")
        if TIMED:  # GPU time this stream sat waiting, for the metrics
            tl.atomic_add(waited_ptr, _globaltimer() - started, sem="relaxed", scope="sys")


def signal_flag(ctrl: torch.Tensor, index: int) -> None:
    """Set flag ``index`` to the epoch once this stream's earlier work is done (one warp)."""
    _signal_kernel[(1,)](ctrl, index, num_warps=1)


def wait_flag(ctrl: torch.Tensor, index: int, waited: torch.Tensor | None = None) -> None:
    """This stream's later work starts once flag ``index`` holds the epoch; the flag is reset to 0.
    ``waited`` (int64, one element): the nanoseconds spent waiting are added to it."""
    _wait_kernel[(1,)](ctrl, index, ctrl if waited is None else waited, TIMED=waited is not None, num_warps=1)


def warm_up_flag_kernels(device: torch.device) -> None:
    """Compile the flag kernels before any graph capture (compiling inside a capture is not allowed)."""
    scratch = torch.zeros(64, dtype=torch.int32, device=device)
    scratch[0] = 7
    counters = scratch[32:].view(torch.int64)
    for index in (1, 16, 17):  # Triton specializes integer arguments equal to 1 or divisible by 16,
        for waited in (None, counters[0:1], counters[1:2]):  # and pointers by 16-byte alignment
            signal_flag(scratch, index)
            wait_flag(scratch, index, waited)
    # this stream only: a device-wide sync would wait for a peer's spinning wait (one GPU, one process)
    torch.cuda.current_stream(device).synchronize()


def _new_epoch() -> int:
    return random.randrange(1, 2**31 - 1)


# --- decode's side --------------------------------------------------------------------------------

class OffloadTransport(ABC):
    """Decode's end of the data plane: one connection to the executor, the exchange buffers it owns."""

    #: whether `send`/`recv` only enqueue device work (and so can be captured in a CUDA graph)
    capturable = False

    def __init__(self, model: ModelConfig, engine: EngineConfig, dtype: torch.dtype, device: torch.device,
                 timeout_s: float = 60.0) -> None:
        self.model, self.engine, self.device = model, engine, device
        self.timeout_s = timeout_s
        self.buffers = ExchangeBuffers.create(model, engine, dtype, device)
        self.channel: Channel | None = None
        self.epoch = 0
        self._known: set[int] = set()
        self._step_id = 0
        self._dry = False

    # control ----------------------------------------------------------------------------------------
    def connect(self) -> None:
        if self.channel is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(str(socket_path(self.engine)))
        except OSError as e:
            sock.close()
            raise ExecutorGone(f"cannot reach the attention executor: {e}") from e
        self.epoch = _new_epoch()
        self._on_connect()
        self.channel = Channel(sock)
        try:
            self.channel.send_hello(self.epoch)
            # The executor answers once its set-up for our buffers (graph captures) is done: until
            # then no step of ours may spin on the GPU (the socket's timeout bounds the wait).
            kind, value = self.channel.read_frame()
        except (OSError, ConnectionError) as e:
            self.close()
            raise ExecutorGone(f"attention executor failed: {e}") from e
        if kind != _READY or value != self.epoch:
            self.close()
            detail = value if kind == _ERROR else f"frame {kind!r}"
            raise ExecutorGone(f"attention executor did not get ready: {detail}")
        self._known.clear()

    def _on_connect(self) -> None:
        """Prepare the exchange for a new connection (before HELLO is sent)."""
        return None

    def close(self) -> None:
        """End the connection (the next step connects anew, with a new epoch)."""
        if self.channel is not None:
            self.channel.close()
        self.channel = None

    def shutdown(self) -> None:
        """For good (server stop)."""
        self.close()

    def begin_step(self, seq_ids: list[int], block_tables: dict[int, list[int]], seq_lens: list[int],
                   split: int = 0) -> None:
        """Send this step's schedule: rows in order; new sequences carry their block table; ``split``:
        the step runs as two batches, rows [0, split) and the rest (0: one batch)."""
        try:
            self.connect()
            current = set(seq_ids)
            step = OffloadStep(
                step_id=self._step_id,
                joined={s: block_tables[s] for s in seq_ids if s not in self._known},
                left=sorted(self._known - current),
                seq_ids=seq_ids,
                seq_lens=seq_lens,
                split=split,
            )
            self.channel.send_step(step)
        except (OSError, ConnectionError) as e:
            self.close()
            raise ExecutorGone(f"attention executor failed: {e}") from e
        self._known = current
        self._step_id += 1

    def step_launched(self) -> None:
        """A step with offloaded rows has all its device work enqueued (watch it until it lands)."""
        return None

    def step_landed(self) -> None:
        """The oldest launched step's device work is done (the caller waited for it); raise
        `ExecutorGone` if its offloaded rows must be redone."""
        return None

    def step_dropped(self) -> None:
        """The oldest launched step's device work is done and its result is thrown away."""
        return None

    # data -------------------------------------------------------------------------------------------
    @abstractmethod
    def send(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: int = 0,
             row0: int = 0) -> None:
        """Ship the offloaded rows' post-RoPE q [n, Hq, D], k and v [n, Hkv, D] of ``layer`` (of batch
        ``part``, into exchange rows from ``row0``, in a two-batch step)."""

    @abstractmethod
    def recv(self, layer: int, out: torch.Tensor, part: int = 0, row0: int = 0) -> None:
        """Fill ``out`` [n, Hq, D] with the executor's attention output of ``layer`` (batch ``part``)."""

    def wait_seconds(self) -> tuple[float, float, float] | None:
        """GPU seconds spent in the exchange's flag waits, summed since this transport was made
        (`ExchangeBuffers.wait_seconds`); None where waits are not on the GPU."""
        return None

    @contextmanager
    def dry_run(self) -> Iterator[None]:
        """Warm-up before a capture: `send`/`recv` move no data and wait for nobody."""
        self._dry = True
        try:
            yield
        finally:
            self._dry = False


class HostTransport(OffloadTransport):
    """CPU: exchange buffers in host shared memory, a LAYER/OUT byte per layer on the socket."""

    def send(self, layer, q, k, v, part=0, row0=0) -> None:
        if self._dry:
            return
        self.buffers.store_rows(q, k, v, row0)
        try:
            self.channel.send_layer(ExchangeBuffers.slot(layer, part))
        except (OSError, AttributeError) as e:
            self.close()
            raise ExecutorGone(f"attention executor failed: {e}") from e

    def recv(self, layer, out, part=0, row0=0) -> None:
        if self._dry:
            return
        slot = ExchangeBuffers.slot(layer, part)
        try:
            kind, value = self.channel.read_frame()
        except (OSError, ConnectionError, AttributeError) as e:
            self.close()
            raise ExecutorGone(f"attention executor failed: {e}") from e
        if kind == _ERROR:
            self.close()
            raise ExecutorGone(f"attention executor error: {value}")
        if kind != _OUT or value != slot:
            self.close()
            raise ExecutorGone(f"offload protocol out of step: got {kind!r}{value}, expected OUT{slot}")
        out.copy_(self.buffers.out[row0:row0 + out.shape[0]])


class DeviceTransport(OffloadTransport):
    """CUDA: decode's GPU memory holds the exchange; per layer one copy and one signal kernel before
    local attention, one wait kernel and one copy after it. Capturable.

    A step is watched while it runs: if the executor's connection ends (an error or its death),
    its process is gone, or the step outlasts ``timeout_s`` (then the executor is killed: its
    supervisor starts a new one), the watchdog releases decode's waits from the host and
    `step_landed` raises `ExecutorGone` once the GPU has finished the step.
    """

    capturable = True

    def __init__(self, model, engine, dtype, device, timeout_s: float = 60.0,
                 executor_pid: Callable[[], int | None] | None = None) -> None:
        super().__init__(model, engine, dtype, device, timeout_s)
        warm_up_flag_kernels(device)
        self._executor_pid = executor_pid or (lambda: None)
        self._release_stream = private_stream(device, "offload-release-decode")
        self._failure: str | None = None
        self._watch = threading.Condition()
        self._launched: collections.deque[float] = collections.deque()  # launch times of steps in flight
        self._stop = False
        self._watchdog = threading.Thread(target=self._watch_loop, name="offload-watchdog", daemon=True)
        self._watchdog.start()

    def _on_connect(self) -> None:
        self.buffers.ctrl[0] = self.epoch  # ordered before any later kernel on this stream
        torch.cuda.current_stream(self.device).synchronize()

    def send(self, layer, q, k, v, part=0, row0=0) -> None:
        if self._dry:
            return
        self.buffers.store_rows(q, k, v, row0)
        signal_flag(self.buffers.ctrl, self.buffers.q_flags + ExchangeBuffers.slot(layer, part))

    def recv(self, layer, out, part=0, row0=0) -> None:
        b = self.buffers
        if not self._dry:
            wait_flag(b.ctrl, b.o_flags + b.slot(layer, part), b.waits(b.WAIT_DECODE))
        out.copy_(b.out[row0:row0 + out.shape[0]])

    def wait_seconds(self) -> tuple[float, float, float] | None:
        with torch.cuda.stream(self._release_stream):  # not behind the steps in flight on decode's stream
            return self.buffers.wait_seconds()

    # Steps are watched from launch to landing; up to two are in flight when decode overlaps steps.
    def step_launched(self) -> None:
        with self._watch:
            if not self._launched:  # a new run of steps: an old failure was already reported
                self._failure = None
            self._launched.append(time.monotonic())
            self._watch.notify_all()

    def step_landed(self) -> None:
        with self._watch:
            self._launched.popleft()
            failure = self._failure
        if failure is not None:
            self.close()
            raise ExecutorGone(failure)

    def step_dropped(self) -> None:
        with self._watch:
            self._launched.popleft()

    def _watch_loop(self) -> None:
        bind(self.device)
        while True:
            with self._watch:
                while not self._launched and not self._stop:
                    self._watch.wait()
                if self._stop:
                    return
                channel, started = self.channel, self._launched[0]
            failure = self._check(channel, started)
            if failure is None:
                continue
            with self._watch:
                if not self._launched:
                    continue
                self._failure = failure
            log.error("offloaded step failed: %s; releasing decode's waits", failure)
            # Until every launched step has landed: a step queued behind the failed one waits on
            # the flags again, so they are set again (10 ms apart).
            while True:
                self._release()
                with self._watch:
                    if not self._launched or self._stop:
                        break
                    self._watch.wait(0.01)

    def _check(self, channel: Channel | None, started: float) -> str | None:
        """Why the in-flight step cannot complete, or None (returns after at most ~10 ms)."""
        if channel is None:
            return "no connection to the attention executor"
        try:
            readable, _, _ = select.select([channel.sock], [], [], 0.01)
        except (OSError, ValueError):
            return "the attention executor's connection closed"
        if readable:
            try:
                kind, value = channel.read_frame()
                return f"attention executor error: {value}" if kind == _ERROR else f"unexpected frame {kind!r}"
            except (OSError, ConnectionError) as e:
                return f"attention executor failed: {e}"
        pid = self._executor_pid()
        if pid is not None and not _alive(pid):
            return f"the attention executor (pid {pid}) died"
        if time.monotonic() - started > self.timeout_s:
            if pid is not None and pid != os.getpid():  # an in-process executor (LocalEngine) is not killed
                try:
                    os.kill(pid, signal.SIGKILL)  # stalled: its supervisor starts a fresh one
                except OSError:
                    pass
            return f"offloaded step stalled for {self.timeout_s:.0f}s; executor (pid {pid}) killed"
        return None

    def _release(self) -> None:
        """Let every wait of the step pass (its offloaded rows are garbage and get recomputed)."""
        b = self.buffers
        with torch.cuda.stream(self._release_stream):
            b.ctrl[b.o_flags: b.o_flags + 2 * self.model.num_hidden_layers].fill_(self.epoch)
        self._release_stream.synchronize()

    def shutdown(self) -> None:
        with self._watch:
            self._stop = True
            self._watch.notify_all()
        self.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def make_transport(model: ModelConfig, engine: EngineConfig, dtype: torch.dtype, device: torch.device,
                   executor_pid: Callable[[], int | None] | None = None) -> OffloadTransport:
    """The transport for decode's device: device flags on CUDA, socket doorbells on CPU."""
    if device.type == "cuda":
        return DeviceTransport(model, engine, dtype, device, timeout_s=engine.offload_timeout_s,
                               executor_pid=executor_pid)
    return HostTransport(model, engine, dtype, device, timeout_s=engine.offload_timeout_s)


# --- the executor's side --------------------------------------------------------------------------

#: attend(layer, q [n, Hq, D], k, v [n, Hkv, D], out [n, Hq, D]): store k/v, attention into ``out``
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class Batch:
    """One batch of a step on the executor's side: exchange rows [row0, row0 + rows), their attention."""

    row0: int
    rows: int
    attend: Attend


def batch_cuts(rows: int, split: int) -> list[tuple[int, int]]:
    """The (start, end) rows of a step's batches: two when ``split`` cuts it, else one."""
    return [(0, split), (split, rows)] if 0 < split < rows else [(0, rows)]


class ExecutorEndpoint(ABC):
    """The executor's end of one decode connection: decode's exchange buffers, attached on HELLO."""

    def __init__(self, model: ModelConfig, engine: EngineConfig, dtype: torch.dtype, device: torch.device,
                 channel: Channel, epoch: int) -> None:
        self.model, self.device, self.channel, self.epoch = model, device, channel, epoch
        self.buffers = ExchangeBuffers.attach(model, engine, dtype, device)

    @abstractmethod
    def run_step(self, batches: list[Batch]) -> None:
        """Serve one step's layers for its batches (one, or two in a two-batch step)."""

    def abort(self) -> None:
        """The connection ended: make sure no device work of this connection is left waiting."""
        return None


class HostEndpoint(ExecutorEndpoint):
    def run_step(self, batches) -> None:
        views = [self.buffers.views(b) for b in batches]
        for _ in range(self.model.num_hidden_layers * len(batches)):
            kind, slot = self.channel.read_frame()
            if kind != _LAYER:
                raise ConnectionError(f"expected a LAYER frame, got {kind!r}")
            layer, part = divmod(slot, 2)
            if part >= len(batches):
                raise ConnectionError(f"LAYER frame {slot} names batch {part} of a {len(batches)}-batch step")
            batches[part].attend(layer, *views[part])
            self.channel.send_out(slot)


class DeviceEndpoint(ExecutorEndpoint):
    """Enqueues a whole step at once: per layer wait for decode's flag, attend (reading q/k/v from and
    writing the output to decode's GPU through NVLink), signal decode's flag."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        warm_up_flag_kernels(self.device)  # compiled before any capture of a step
        self._release_stream = private_stream(self.device, "offload-release-executor")

    def run_step(self, batches) -> None:
        self.enqueue_layers(batches)

    def enqueue_layers(self, batches: list[Batch], dry: bool = False) -> None:
        """The step's device work (also what a captured step records); ``dry``: no waits or signals."""
        enqueue_step(self.buffers, self.model.num_hidden_layers, batches, dry)

    def abort(self) -> None:
        # decode is gone mid-step (or never sent the rest): let this connection's waits pass, again
        # every 10 ms while its layers run (a second step, queued behind the first, waits anew)
        b = self.buffers
        work = torch.cuda.current_stream(self.device)
        while True:
            with torch.cuda.stream(self._release_stream):
                b.ctrl[b.q_flags: b.q_flags + 2 * self.model.num_hidden_layers].fill_(self.epoch)
            self._release_stream.synchronize()
            if work.query():  # this connection's layers have run
                return
            time.sleep(0.01)


def enqueue_step(buffers: ExchangeBuffers, num_layers: int, batches: list[Batch], dry: bool = False) -> None:
    """The executor's device work of one step over ``buffers``: layer by layer, batch by batch (the
    order decode sends them in), wait for decode's flag, attend, signal; ``dry``: no waits or signals."""
    b = buffers
    views = [b.views(batch) for batch in batches]
    for layer in range(num_layers):
        for part, batch in enumerate(batches):
            slot = b.slot(layer, part)
            if not dry:
                wait_flag(b.ctrl, b.q_flags + slot, b.waits(b.WAIT_EXECUTOR if slot else b.WAIT_EXECUTOR_FIRST))
            batch.attend(layer, *views[part])
            if not dry:
                signal_flag(b.ctrl, b.o_flags + slot)


def make_endpoint(model: ModelConfig, engine: EngineConfig, dtype: torch.dtype, device: torch.device,
                  channel: Channel, epoch: int) -> ExecutorEndpoint:
    cls = DeviceEndpoint if device.type == "cuda" else HostEndpoint
    return cls(model, engine, dtype, device, channel, epoch)


class OffloadServer:
    """The executor's listening socket; one decode connection at a time."""

    def __init__(self, engine: EngineConfig) -> None:
        path = socket_path(engine)
        path.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        os.chmod(path, 0o600)
        self._listener.listen(4)
        self._path = path

    def close(self) -> None:
        self._listener.close()
        self._path.unlink(missing_ok=True)

    def accept(self) -> tuple[Channel, int]:
        """The next decode connection and its epoch (from its HELLO frame)."""
        while True:
            conn, _ = self._listener.accept()
            channel = Channel(conn)
            try:
                kind, epoch = channel.read_frame()
            except (OSError, ConnectionError):
                channel.close()
                continue
            if kind != _HELLO:
                channel.close()
                continue
            return channel, int(epoch)
