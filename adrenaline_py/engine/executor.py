"""The attention executor: decode attention of offloaded requests, on the prefill GPU.

It holds no weights. It owns the ``executor`` KV pool (prefill writes offloaded prompts into it)
and serves the decode instance's per-layer frames (see adrenaline_py/transport.py).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from adrenaline_py.attention import DecodeMetadata, build_decode_metadata, make_attention_backend
from adrenaline_py.config import EngineConfig, ModelConfig
from adrenaline_py.kv_cache import KVPool
from adrenaline_py.transport import LAYER_FRAME, OffloadBuffers, OffloadServer, OffloadStep

log = logging.getLogger(__name__)


class AttentionExecutor:
    def __init__(self, model: ModelConfig, engine: EngineConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.model, self.engine = model, engine
        self.device = device
        self.pool = KVPool.create("executor", model, engine, dtype)
        self.buffers = OffloadBuffers.create(model, engine, dtype)
        self.backend = make_attention_backend(device)
        self.block_tables: dict[int, list[int]] = {}
        self.num_steps = 0
        self._server = OffloadServer(engine, self.buffers)
        # Liveness for admission: while this process lives, requests may be offloaded.
        (Path(engine.run_dir) / "executor.pid").write_text(str(os.getpid()))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="attention-executor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._server.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self._server.accept()
            except OSError:
                return  # listener closed
            self.block_tables.clear()  # a new decode connection starts from an empty set
            with conn:
                try:
                    self._serve_connection(conn)
                except ConnectionError as e:
                    log.info("decode connection closed: %s", e)
                except Exception as e:  # report to decode, keep serving later connections
                    log.exception("attention executor failed a step")
                    try:
                        OffloadServer.send_error(conn, f"{type(e).__name__}: {e}")
                    except OSError:
                        pass

    def _serve_connection(self, conn) -> None:
        meta: DecodeMetadata | None = None
        while True:
            kind, value = OffloadServer.read_frame(conn)
            if kind == LAYER_FRAME:
                self.attend(value, meta, conn)
            else:
                meta = self.apply_step(value)

    def apply_step(self, step: OffloadStep) -> DecodeMetadata:
        for seq_id in step.left:
            self.block_tables.pop(seq_id, None)
        self.block_tables.update(step.joined)
        self.num_steps += 1
        tables = [self.block_tables[s] for s in step.seq_ids]
        return build_decode_metadata(self.pool.kv, tables, step.seq_lens, self.device)

    def attend(self, layer: int, meta: DecodeMetadata, conn) -> None:
        n = meta.seq_lens.shape[0]
        b = self.buffers
        out = self.backend.decode(layer, b.q[layer, :n], b.k[layer, :n], b.v[layer, :n], meta)
        b.out[layer, :n].copy_(out)
        self._server.send_out(conn, layer)


def executor_alive(run_dir: str) -> bool:
    """Whether the attention executor's process is running (it writes its pid at start)."""
    try:
        pid = int((Path(run_dir) / "executor.pid").read_text())
        # A killed stub stays a zombie until Triton reaps it: read its state, not just its pid.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return False
    return state not in ("Z", "X")
