"""The decode side as one unit: the decode loop, its offload client and its output threads.

Both the `decode` Triton role and the in-process `LocalEngine` run exactly this.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from adrenaline_py import sampler
from adrenaline_py.attention import make_attention_backend
from adrenaline_py.config import EngineConfig
from adrenaline_py.engine.cuda_graphs import captures_offloaded_steps
from adrenaline_py.engine.decode import DecodeEngine, DecodeRunner, DecodeScheduler, Sequence
from adrenaline_py.engine.executor import executor_state
from adrenaline_py.engine.output import HostGate, OutputWorkers, ResponseChunk
from adrenaline_py.kv_cache import KVPool
from adrenaline_py.models.llama import LlamaForCausalLM
from adrenaline_py.placement import bind
from adrenaline_py.tokenizer import Tokenizer
from adrenaline_py.transport import make_transport

log = logging.getLogger(__name__)


class DecodeService:
    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: Tokenizer,
        engine: EngineConfig,
        dtype: torch.dtype,
        pools: Callable[[str], KVPool],
        send: Callable[[Any, ResponseChunk], None],
    ) -> None:
        device = model.lm_head.weight.device
        bind(device)
        self.transport = make_transport(model.config, engine, dtype, device,
                                        executor_pid=lambda: _executor_pid(engine.run_dir))
        self.scheduler = scheduler = DecodeScheduler(pools, engine.max_decode_batch)
        runner = DecodeRunner(model, make_attention_backend(device), pools("decode"), self.transport,
                              cuda_graphs=engine.cuda_graphs, max_model_len=engine.max_model_len,
                              max_batch=engine.max_decode_batch, two_batch=engine.two_batch_overlap,
                              two_batch_min_rows=engine.two_batch_min_rows,
                              offload=captures_offloaded_steps(engine))
        if runner.graphs is not None:
            t0, free0 = time.perf_counter(), torch.cuda.mem_get_info(device)[0]
            runner.graphs.capture()
            log.info("decode: %d CUDA graphs captured in %.1f s, %.2f GiB of GPU memory", runner.graphs.num_graphs,
                     time.perf_counter() - t0, (free0 - torch.cuda.mem_get_info(device)[0]) / 2**30)
        # the sampler's kernels built now, not under the first sampled request
        sampler.warm_up(model.lm_head.weight.shape[0], model.lm_head.weight.dtype, device)
        self.runner = runner
        # On a GPU the loop's host work gets the GIL to itself; the output threads run while it
        # waits for the GPU (on CPU the loop computes on the host: no gate).
        runner.gate = HostGate() if device.type == "cuda" else None
        self.outputs = OutputWorkers(tokenizer, send, lambda seq_id: scheduler.abort(seq_id, "stop"),
                                     engine.num_sender_threads, gate=runner.gate)
        self.loop = DecodeEngine(scheduler, runner, self.outputs.submit, overlap=engine.overlap_steps)
        self.outputs.start()
        self.loop.start()

    def add(self, seq: Sequence) -> None:
        self.loop.add(seq)

    def cancel(self, seq_id: int) -> None:
        """Stop a request the client gave up on; its blocks are freed at the next step."""
        self.scheduler.abort(seq_id, "cancelled")

    def check_cancelled(self, is_cancelled: Callable[[Any], bool]) -> None:
        """Poll the clients of all unfinished requests (from their output threads)."""
        self.outputs.check_cancelled(is_cancelled, self.cancel)

    def stop(self) -> None:
        self.loop.stop()
        self.outputs.stop()
        self.transport.shutdown()


def _executor_pid(run_dir: str) -> int | None:
    state = executor_state(run_dir)
    return state.pid if state is not None else None
