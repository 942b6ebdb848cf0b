"""Decode ↔ attention-executor data plane: per-layer q/k/v out, attention output back.

Protocol (one decode step with N offloaded rows):
  1. decode → executor: one STEP frame (`OffloadStep`: which sequences joined or left, the order
     of the N rows and their context lengths). Block allocation is not on this path: blocks were
     reserved by the scheduler at admission.
  2. per layer l: decode writes the N rows' post-RoPE q/k/v into layer l's slot of the shared
     buffers and sends a LAYER(l) doorbell; it then runs local attention for its own M rows.
  3. the executor appends k/v to its paged pool, runs attention, writes the output into the
     shared buffer and answers OUT(l); decode waits for it only when it needs the rows.
No Triton request is on this path. On CPU the buffers are POSIX shared memory and the doorbells
are bytes on a Unix socket; on GPUs the buffers are CUDA IPC memory (same framing).
"""

from __future__ import annotations

import pickle
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adrenaline_py.config import EngineConfig, ModelConfig
from adrenaline_py.kv_cache import pool_device
from adrenaline_py.shm import attach_shared_tensor, create_shared_tensor

_STEP, _LAYER, _OUT, _ERROR = b"S", b"L", b"O", b"E"
_INT = struct.Struct("<i")


@dataclass
class OffloadStep:
    """The one per-step schedule message; carries only what changed plus this step's row order."""

    step_id: int
    joined: dict[int, list[int]] = field(default_factory=dict)  # seq id → block table
    left: list[int] = field(default_factory=list)              # seq ids that finished
    seq_ids: list[int] = field(default_factory=list)           # the N rows, in batch order
    seq_lens: list[int] = field(default_factory=list)          # [N] context incl. the new token


class ExecutorGone(RuntimeError):
    """The attention executor is unreachable or failed; offloaded rows cannot be served."""


@dataclass
class OffloadBuffers:
    """Shared per-layer slots: q/out [L, max_rows, Hq, D], k/v [L, max_rows, Hkv, D]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor

    @staticmethod
    def _shapes(model: ModelConfig, max_rows: int) -> dict[str, tuple[int, ...]]:
        L, hq, hkv, d = model.num_hidden_layers, model.num_attention_heads, model.num_key_value_heads, model.head_dim
        return {"q": (L, max_rows, hq, d), "k": (L, max_rows, hkv, d), "v": (L, max_rows, hkv, d),
                "out": (L, max_rows, hq, d)}

    @classmethod
    def create(cls, model: ModelConfig, engine: EngineConfig, dtype: torch.dtype) -> OffloadBuffers:
        shapes = cls._shapes(model, engine.max_decode_batch)
        # On GPUs the buffers live with the executor (GPU P): it reads q/k/v and writes out there.
        device = pool_device("executor", engine)
        return cls(**{n: create_shared_tensor(engine.run_dir, f"offload.{n}", s, dtype, device)
                      for n, s in shapes.items()})

    @classmethod
    def attach(cls, model: ModelConfig, engine: EngineConfig, dtype: torch.dtype) -> OffloadBuffers:
        shapes = cls._shapes(model, engine.max_decode_batch)
        return cls(**{n: attach_shared_tensor(engine.run_dir, f"offload.{n}", s, dtype) for n, s in shapes.items()})


def socket_path(engine: EngineConfig) -> Path:
    return Path(engine.run_dir) / "executor.sock"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the offload channel")
        buf += chunk
    return bytes(buf)


class OffloadClient:
    """Decode side: one connection to the executor."""

    def __init__(self, model: ModelConfig, engine: EngineConfig, dtype: torch.dtype,
                 timeout_s: float = 60.0) -> None:
        self._model, self._engine, self._dtype = model, engine, dtype
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buffers: OffloadBuffers | None = None
        self._num_rows = 0
        self._known: set[int] = set()
        self._step_id = 0

    def _connect(self) -> None:
        if self._sock is not None:
            return
        self._buffers = OffloadBuffers.attach(self._model, self._engine, self._dtype)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._timeout_s)
        try:
            sock.connect(str(socket_path(self._engine)))
        except OSError as e:
            sock.close()
            raise ExecutorGone(f"cannot reach the attention executor: {e}") from e
        self._sock = sock
        self._known.clear()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None

    def begin_step(self, seq_ids: list[int], block_tables: dict[int, list[int]], seq_lens: list[int]) -> None:
        """Send this step's schedule: rows in order; new sequences carry their block table."""
        try:
            self._connect()
            current = set(seq_ids)
            step = OffloadStep(
                step_id=self._step_id,
                joined={s: block_tables[s] for s in seq_ids if s not in self._known},
                left=sorted(self._known - current),
                seq_ids=seq_ids,
                seq_lens=seq_lens,
            )
            payload = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
            self._sock.sendall(_STEP + _INT.pack(len(payload)) + payload)
        except (OSError, ConnectionError) as e:
            self.close()
            raise ExecutorGone(f"attention executor failed: {e}") from e
        self._known = current
        self._num_rows = len(seq_ids)
        self._step_id += 1

    def send_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        n = self._num_rows
        b = self._buffers
        b.q[layer, :n].copy_(q)
        b.k[layer, :n].copy_(k)
        b.v[layer, :n].copy_(v)
        _wait_for_device(b.q)  # the executor reads these as soon as the doorbell rings
        try:
            self._sock.sendall(_LAYER + _INT.pack(layer))
        except OSError as e:
            self.close()
            raise ExecutorGone(f"attention executor failed: {e}") from e

    def recv_layer(self, layer: int) -> torch.Tensor:
        try:
            kind = _recv_exact(self._sock, 1)
            value = _INT.unpack(_recv_exact(self._sock, _INT.size))[0]
            if kind == _ERROR:
                message = _recv_exact(self._sock, value).decode()
                raise ExecutorGone(f"attention executor error: {message}")
        except (OSError, ConnectionError) as e:
            self.close()
            raise ExecutorGone(f"attention executor failed: {e}") from e
        if kind != _OUT or value != layer:
            self.close()
            raise ExecutorGone(f"offload protocol out of step: got {kind!r}{value}, expected OUT{layer}")
        return self._buffers.out[layer, : self._num_rows]


def _wait_for_device(t: torch.Tensor) -> None:
    """Make device writes visible to the other process before a doorbell (a no-op on CPU)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


class OffloadServer:
    """Executor side: accepts one decode connection at a time and serves its frames."""

    def __init__(self, engine: EngineConfig, buffers: OffloadBuffers) -> None:
        self._buffers = buffers
        path = socket_path(engine)
        path.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._path = path

    def close(self) -> None:
        self._listener.close()
        self._path.unlink(missing_ok=True)

    def accept(self) -> socket.socket:
        conn, _ = self._listener.accept()
        return conn

    @staticmethod
    def read_frame(conn: socket.socket) -> tuple[bytes, int | OffloadStep]:
        kind = _recv_exact(conn, 1)
        value = _INT.unpack(_recv_exact(conn, _INT.size))[0]
        if kind == _STEP:
            return kind, pickle.loads(_recv_exact(conn, value))
        if kind == _LAYER:
            return kind, value
        raise ConnectionError(f"unexpected frame {kind!r}")

    def send_out(self, conn: socket.socket, layer: int) -> None:
        _wait_for_device(self._buffers.out)
        conn.sendall(_OUT + _INT.pack(layer))

    @staticmethod
    def send_error(conn: socket.socket, message: str) -> None:
        data = message.encode()
        conn.sendall(_ERROR + _INT.pack(len(data)) + data)


STEP_FRAME, LAYER_FRAME = _STEP, _LAYER
