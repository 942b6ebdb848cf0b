"""The attention executor: decode attention of offloaded requests, on the prefill GPU.

It holds no weights. It owns the ``executor`` KV pool (prefill writes offloaded prompts into it)
and serves decode's offloaded rows, one step at a time (adrenaline_py/transport.py): on CUDA a
STEP message enqueues (or replays, `ExecutorGraphs`) the whole step's layers, each waiting on
decode's flag and reading q/k/v from decode's GPU through NVLink; on CPU it answers per-layer frames.

Under Triton it runs in a worker process that the ``attention`` role supervises and restarts when
it dies (backends/adrenaline/supervisor.py). Each start is a new *generation*: the worker creates a
fresh pool (all blocks free) and publishes ``executor.pid`` = {pid, generation} last.
Executor block ids handed to decode carry their generation in their high bits, so blocks of a pool
that died with its worker are never freed into, nor served from, the pool of a later generation.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adrenaline_py.attention import DecodeMetadata, build_decode_metadata, make_attention_backend
from adrenaline_py.config import EngineConfig, ModelConfig
from adrenaline_py.engine.cuda_graphs import ExecutorGraphs
from adrenaline_py.kv_cache import KVPool
from adrenaline_py.placement import bind
from adrenaline_py.transport import (
    STEP_FRAME,
    Batch,
    Channel,
    ExecutorEndpoint,
    OffloadServer,
    OffloadStep,
    batch_cuts,
    make_endpoint,
)

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
        bind(device)
        self.model, self.engine, self.dtype = model, engine, dtype
        self.device = device
        self.generation = generation
        self.pool = KVPool.create("executor", model, engine, dtype)
        self.backend = make_attention_backend(device)
        self.graphs = None
        if device.type == "cuda" and engine.cuda_graphs:
            self.graphs = ExecutorGraphs(self._attend_with, self.pool.kv, engine.max_decode_batch, engine.max_model_len,
                                         two_batch=engine.two_batch_overlap != "off")
        self.block_tables: dict[int, list[int]] = {}
        self.num_steps = 0
        self.host_s = 0.0  # summed over steps: from a step's schedule in hand to its layers launched
        self._server = OffloadServer(engine)
        # Liveness for admission (while this process lives, requests may be offloaded); written last,
        # so that a reader of this generation finds its pool in place.
        write_executor_state(engine.run_dir, ExecutorState(os.getpid(), generation))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="attention-executor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._server.close()

    def _serve(self) -> None:
        bind(self.device, own_stream=True)
        while not self._stop.is_set():
            try:
                channel, epoch = self._server.accept()
            except OSError:
                return  # listener closed
            self.block_tables.clear()  # a new decode connection starts from an empty set
            endpoint = None
            try:
                endpoint = make_endpoint(self.model, self.engine, self.dtype, self.device, channel, epoch)
                if self.graphs is not None:
                    started = time.perf_counter()
                    self.graphs.capture_all(endpoint)  # before READY: decode spins on nothing yet
                    log.info("attention executor: %d step graphs ready in %.2f s", self.graphs.num_graphs,
                             time.perf_counter() - started)
                channel.send_ready(epoch)
                self._serve_connection(endpoint)
            except ConnectionError as e:
                log.info("decode connection closed: %s", e)
            except StaleBlocks as e:  # expected once after a restart: decode recomputes those requests
                log.warning("refusing a decode step: %s", e)
                _send_error(channel, f"{type(e).__name__}: {e}")
            except Exception as e:  # report to decode, keep serving later connections
                log.exception("attention executor failed a step")
                _send_error(channel, f"{type(e).__name__}: {e}")
            finally:
                if endpoint is not None:
                    endpoint.abort()
                channel.close()

    def _serve_connection(self, endpoint: ExecutorEndpoint) -> None:
        while True:
            kind, step = endpoint.channel.read_frame()
            if kind != STEP_FRAME:
                raise ConnectionError(f"expected a STEP frame, got {kind!r}")
            started = time.perf_counter()
            tables = self.apply_step(step)
            if self.graphs is None or not self.graphs.replay(endpoint, step.seq_ids, tables, step.seq_lens,
                                                             step.split):
                endpoint.run_step(self._batches(tables, step.seq_lens, step.split))
            self.host_s += time.perf_counter() - started

    def apply_step(self, step: OffloadStep) -> list[list[int]]:
        """Update the block tables from the step's changes; returns the tables of its rows, in order."""
        for seq_id in step.left:
            self.block_tables.pop(seq_id, None)
        for seq_id, table in step.joined.items():  # once per request, not per step
            generation, blocks = split_blocks(table)
            if generation != self.generation:  # its KV died with an earlier executor: decode recomputes it
                raise StaleBlocks(f"request {seq_id} holds blocks of executor generation {generation}, "
                                  f"this is generation {self.generation}")
            self.block_tables[seq_id] = blocks
        self.num_steps += 1
        return [self.block_tables[s] for s in step.seq_ids]

    def _batches(self, tables: list[list[int]], seq_lens: list[int], split: int) -> list[Batch]:
        """The step's rows as one batch, or two (rows [0, split) and the rest) in a two-batch step."""
        return [Batch(a, b - a, self._attend_with(build_decode_metadata(self.pool.kv, tables[a:b], seq_lens[a:b],
                                                                          self.device)))
                for a, b in batch_cuts(len(seq_lens), split)]

    def _attend_with(self, meta: DecodeMetadata):
        """The per-layer work for rows described by ``meta``: store their k/v in this pool, attention into out."""
        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
            self.backend.forward(layer, q, k, v, meta, out)
        return attend


def _send_error(channel: Channel, message: str) -> None:
    try:
        channel.send_error(message)
    except OSError:
        pass


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
