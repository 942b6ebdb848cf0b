"""Worker process of a supervised role (see supervisor.py): the attention executor or prefill.

    python worker.py attention|prefill <engine.json> <generation> <channel fd> [<heartbeat fd>]

It first reads its init message from the channel, reports ("ready", info) once it can serve, then
answers one reply per request until the channel closes (its stub finalized or died), and exits.

attention: init = the model's ModelConfig. Creates the executor's KV pool (every block free),
  publishes ``executor.pid`` = {pid, generation} last and serves decode over its socket and
  decode's exchange buffers; requests: ("stats",).
prefill: init = None. Loads the model (and drops its mapping of a dead executor's pool at once);
  requests: ("prefill", [(input_ids, kv_pool label, block_table,
  SamplingParams), ...]) → ("ok", [first token | error message per item]) or ("error", message).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from supervisor import HEARTBEAT_PERIOD_S, Channel  # noqa: E402

from adrenaline_py.config import EngineConfig  # noqa: E402
from adrenaline_py.engine.executor import (  # noqa: E402
    STALE_POOL_ERROR,
    AttentionExecutor,
    clear_executor_state,
    executor_state,
    parse_pool_label,
)
from adrenaline_py.placement import bind, bind_role  # noqa: E402

log = logging.getLogger("adrenaline.worker")


def discard_previous_regions(run_dir: str | Path) -> None:
    """Unlink the regions of the previous executor before creating new ones (its pool; the exchange
    buffers belong to decode).

    Prefill and decode may still map them; unlinked, their memory stays valid until they let go,
    whereas re-creating a region in place would truncate it under them (SIGBUS on CPU). A process
    that attaches later finds only the new regions (kv_cache.py and transport.py name them).
    """
    for pattern in ("executor.*.shm", "executor.*.ready"):
        for path in Path(run_dir).glob(pattern):
            path.unlink(missing_ok=True)


def serve_attention(engine: EngineConfig, generation: int, chan: Channel, config) -> None:
    torch.set_num_threads(int(os.environ.get("ADRENALINE_TORCH_THREADS", "0")) or 1)
    device = bind_role("executor", engine)
    discard_previous_regions(engine.run_dir)
    executor = AttentionExecutor(config, engine, getattr(torch, engine.dtype), device, generation=generation)
    executor.start()
    chan.send(("ready", {"pid": os.getpid(), "generation": generation}))
    try:
        while True:
            kind = chan.recv()[0]
            if kind == "stats":
                a = executor.pool.allocator
                chan.send({"steps": executor.num_steps, "host_seconds": executor.host_s,
                           "num_free_blocks": a.num_free, "num_blocks": a.num_blocks,
                           "num_seqs": a.num_seqs, "generation": generation})
            else:
                chan.send({"error": f"unknown request {kind!r}"})
    except OSError:  # the stub closed the channel (ConnectionError): stop
        pass
    finally:
        clear_executor_state(engine.run_dir, os.getpid())
        executor.stop()


class PrefillWorker:
    """The prefill model and the pools it writes into; the executor's pool of the live generation."""

    def __init__(self, engine: EngineConfig) -> None:
        from adrenaline_py.attention import make_attention_backend
        from adrenaline_py.loader import build_model, load_checkpoint

        self.engine = engine
        self.dtype = getattr(torch, engine.dtype)
        self.device = bind_role("prefill", engine)
        ckpt = load_checkpoint(engine.model)
        self.config = ckpt.config
        self.model = build_model(ckpt, self.dtype, self.device, engine.max_model_len, engine.seed)
        ckpt.state_dict = None  # the model holds the weights now
        self.backend = make_attention_backend(self.device)
        self.pools: dict = {}
        self.executor_generation = -1
        # A dead executor's pool stays allocated while any process maps it (CUDA IPC): let go of it at
        # once, or its successor cannot allocate a pool of the same size on the same GPU.
        self._lock = threading.Lock()
        threading.Thread(target=self._release_dead_executor_pool, name="executor-pool-watch", daemon=True).start()

    def _release_dead_executor_pool(self, period_s: float = 0.2) -> None:
        bind(self.device)
        while True:
            time.sleep(period_s)
            if self.executor_generation < 0:
                continue
            state = executor_state(self.engine.run_dir)
            if state is not None and state.generation == self.executor_generation:
                continue
            with self._lock:
                if self.pools.pop("executor", None) is not None:
                    log.info("executor generation %d is gone: its pool is released here", self.executor_generation)
                self.executor_generation = -1

    def _executor_pool_error(self, generation: int) -> str | None:
        """None when the executor pool of ``generation`` is the live one (attached), else why not."""
        from adrenaline_py.kv_cache import KVPool

        state = executor_state(self.engine.run_dir)
        if state is None or state.generation != generation:
            now = f"generation {state.generation} runs now" if state else "no executor runs now"
            return f"{STALE_POOL_ERROR}: the request's blocks are in executor generation {generation}; {now}"
        if self.executor_generation != generation:
            pool = KVPool.attach("executor", self.config, self.engine, self.dtype)
            if executor_state(self.engine.run_dir) != state:  # restarted while attaching
                return f"{STALE_POOL_ERROR}: executor generation {generation} stopped"
            self.pools["executor"], self.executor_generation = pool, generation
        return None

    def run(self, items: list[tuple]) -> list[int | str]:
        with self._lock:
            return self._run(items)

    def _run(self, items: list[tuple]) -> list[int | str]:
        from adrenaline_py.engine.prefill import PrefillItem, PrefillRunner
        from adrenaline_py.kv_cache import KVPool

        # Decode creates its pool while it loads: attach on first use (model load order is free).
        if "decode" not in self.pools:
            self.pools["decode"] = KVPool.attach("decode", self.config, self.engine, self.dtype)
        results: list[int | str] = [""] * len(items)
        batch, index = [], []
        for i, (input_ids, label, block_table, sampling) in enumerate(items):
            pool, generation = parse_pool_label(label)
            if pool == "executor" and (error := self._executor_pool_error(generation)):
                results[i] = error
                continue
            batch.append(PrefillItem(input_ids, pool, block_table, sampling))
            index.append(i)
        if batch:
            runner = PrefillRunner(self.model, self.backend, self.pools, self.engine.max_prefill_tokens)
            for i, token in zip(index, runner.run(batch)):
                results[i] = int(token)
        return results


def serve_prefill(engine: EngineConfig, generation: int, chan: Channel, init: None) -> None:
    torch.set_num_threads(int(os.environ.get("ADRENALINE_TORCH_THREADS", "0")) or max(1, (os.cpu_count() or 2) // 2))
    worker = PrefillWorker(engine)
    chan.send(("ready", {"pid": os.getpid(), "generation": generation}))
    while True:
        try:
            kind, items = chan.recv()
        except OSError:
            return  # the stub closed the channel (ConnectionError): stop
        if kind != "prefill":
            chan.send(("error", f"unknown request {kind!r}", 0.0))
            continue
        started = time.perf_counter()
        try:
            reply = ("ok", worker.run(items))
        except Exception as e:
            log.exception("prefill failed")
            reply = ("error", f"{type(e).__name__}: {e}")
        try:
            chan.send((*reply, time.perf_counter() - started))
        except OSError:
            return  # the stub went away while we computed


def _beat(sock: socket.socket) -> None:
    """The heartbeat the stub watches (supervisor.py): a thread of its own, so that only a stopped or
    wedged process goes silent, not one busy with a long batch."""
    while True:
        time.sleep(HEARTBEAT_PERIOD_S)
        try:
            sock.send(b".")
        except OSError:  # the stub is gone
            return


def main(argv: list[str]) -> int:
    role, config_path, generation, fd = argv[0], argv[1], int(argv[2]), int(argv[3])
    if len(argv) > 4:
        threading.Thread(target=_beat, args=(socket.socket(fileno=int(argv[4])),), name="heartbeat",
                         daemon=True).start()
    logging.basicConfig(level=os.environ.get("ADRENALINE_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {role}-worker[{generation}] %(levelname)s %(name)s: %(message)s")
    engine = EngineConfig.load(config_path)
    chan = Channel(socket.socket(fileno=fd))
    serve = {"attention": serve_attention, "prefill": serve_prefill}[role]
    try:
        init = chan.recv()
    except OSError:
        return 0  # the stub went away before we started
    serve(engine, generation, chan, init)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
