"""The attention executor: decode attention of offloaded requests, on the prefill GPU.

It holds no weights. It owns the ``executor`` KV pool (prefill writes offloaded prompts into it)
and serves the decode instance's per-layer frames (see adrenaline_py/transport.py).

Under Triton it runs in a worker process that the ``attention`` role supervises and restarts when
it dies (backends/adrenaline/supervisor.py). Each start is a new *generation*: the worker creates a
fresh pool (all blocks free) and buffers and publishes ``executor.pid`` = {pid, generation} last.
Executor block ids handed to decode carry their generation in their high bits, so blocks of a pool
that died with its worker are never freed into, nor served from, the pool of a later generation.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from adrenaline_py.attention import DecodeMetadata, build_decode_metadata, make_attention_backend
from adrenaline_py.config import EngineConfig, ModelConfig
from adrenaline_py.kv_cache import KVPool
from adrenaline_py.transport import LAYER_FRAME, OffloadBuffers, OffloadServer, OffloadStep

log = logging.getLogger(__name__)


#: bits of an executor block id below its generation (block ids are far below 2**32)
GENERATION_SHIFT = 32
_BLOCK_MASK = (1 << GENERATION_SHIFT) - 1
#: prefill's answer for a request whose executor blocks belong to a generation that is gone
STALE_POOL_ERROR = "stale executor pool"
_STATE_FILE = "executor.pid"


class StaleBlocks(RuntimeError):
    """A request's executor blocks belong to another generation of the executor pool."""


def tag_blocks(blocks: list[int], generation: int) -> list[int]:
    """Executor block ids as decode holds them: the pool generation in the high bits."""
    return [generation << GENERATION_SHIFT | b for b in blocks] if generation else list(blocks)


def split_blocks(blocks: list[int]) -> tuple[int, list[int]]:
    """(generation, pool block ids) of a tagged block table (all ids of one table share it)."""
    if not blocks or blocks[0] <= _BLOCK_MASK:
        return 0, list(blocks)
    return blocks[0] >> GENERATION_SHIFT, [b & _BLOCK_MASK for b in blocks]


def pool_label(pool: str, generation: int) -> str:
    """The kv_pool string passed between scheduler, prefill and decode: ``executor@<generation>``."""
    return f"{pool}@{generation}" if pool == "executor" and generation else pool


def parse_pool_label(label: str) -> tuple[str, int]:
    pool, _, generation = label.partition("@")
    return pool, int(generation) if generation else 0


class AttentionExecutor:
    def __init__(self, model: ModelConfig, engine: EngineConfig, dtype: torch.dtype, device: torch.device,
                 generation: int = 0) -> None:
        self.model, self.engine = model, engine
        self.device = device
        self.generation = generation
        self.pool = KVPool.create("executor", model, engine, dtype)
        self.buffers = OffloadBuffers.create(model, engine, dtype)
        self.backend = make_attention_backend(device)
        self.block_tables: dict[int, list[int]] = {}
        self.num_steps = 0
        self._server = OffloadServer(engine, self.buffers)
        # Liveness for admission (while this process lives, requests may be offloaded); written last,
        # so that a reader of this generation finds its pool and buffers in place.
        write_executor_state(engine.run_dir, ExecutorState(os.getpid(), generation))
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
                except StaleBlocks as e:  # expected once after a restart: decode recomputes those requests
                    log.warning("refusing a decode step: %s", e)
                    try:
                        OffloadServer.send_error(conn, f"{type(e).__name__}: {e}")
                    except OSError:
                        pass
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
        for seq_id, table in step.joined.items():  # once per request, not per step
            generation, blocks = split_blocks(table)
            if generation != self.generation:  # its KV died with an earlier executor: decode recomputes it
                raise StaleBlocks(f"request {seq_id} holds blocks of executor generation {generation}, "
                                  f"this is generation {self.generation}")
            self.block_tables[seq_id] = blocks
        self.num_steps += 1
        tables = [self.block_tables[s] for s in step.seq_ids]
        return build_decode_metadata(self.pool.kv, tables, step.seq_lens, self.device)

    def attend(self, layer: int, meta: DecodeMetadata, conn) -> None:
        n = meta.seq_lens.shape[0]
        b = self.buffers
        out = self.backend.decode(layer, b.q[layer, :n], b.k[layer, :n], b.v[layer, :n], meta)
        b.out[layer, :n].copy_(out)
        self._server.send_out(conn, layer)


@dataclass(frozen=True)
class ExecutorState:
    """Which process serves the executor pool now, and which generation of the pool it owns."""

    pid: int
    generation: int


def write_executor_state(run_dir: str | Path, state: ExecutorState) -> None:
    path = Path(run_dir) / _STATE_FILE
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"pid": state.pid, "generation": state.generation}))
    tmp.replace(path)  # readers see the old or the new state, never half of one


def clear_executor_state(run_dir: str | Path, pid: int | None = None) -> None:
    """Withdraw the state (only if it names ``pid``, when given): admission stops offloading."""
    path = Path(run_dir) / _STATE_FILE
    if pid is not None:
        state = _read_state(path)
        if state is None or state.pid != pid:
            return
    path.unlink(missing_ok=True)


def _read_state(path: Path) -> ExecutorState | None:
    try:
        d = json.loads(path.read_text())
        return ExecutorState(int(d["pid"]), int(d["generation"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def executor_state(run_dir: str | Path) -> ExecutorState | None:
    """The live executor's pid and generation; None while no executor process is running."""
    state = _read_state(Path(run_dir) / _STATE_FILE)
    if state is None:
        return None
    try:
        # A killed process stays a zombie until its parent reaps it: read its state, not just its pid.
        proc = Path(f"/proc/{state.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if proc in ("Z", "X") else state


def executor_alive(run_dir: str | Path) -> bool:
    """Whether the attention executor's process is running (it publishes its state at start)."""
    return executor_state(run_dir) is not None
