"""All serving roles in one process: admission, prefill, decode and the attention executor.

The same classes the Triton models use, wired directly (the executor still runs on its own
thread behind the shared-memory transport). For tests, offline generation (`adrenaline
generate`) and as the reference the served output is compared with.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, replace

import torch

from adrenaline_py.attention import make_attention_backend
from adrenaline_py.config import EngineConfig
from adrenaline_py.engine.admission import Admission
from adrenaline_py.engine.decode import Sequence
from adrenaline_py.engine.executor import AttentionExecutor
from adrenaline_py.engine.output import ResponseChunk
from adrenaline_py.engine.prefill import PrefillItem, PrefillRunner
from adrenaline_py.engine.service import DecodeService
from adrenaline_py.kv_cache import KVPool
from adrenaline_py.loader import Checkpoint, build_model
from adrenaline_py.placement import Placement, bind
from adrenaline_py.policy import OffloadPolicy
from adrenaline_py.profile import measure_gpus, needs_gpus, resolve_engine
from adrenaline_py.request import GenerationParams

log = logging.getLogger(__name__)


@dataclass
class Completion:
    text: str
    output_ids: list[int]
    finish_reason: str
    offloaded: bool
    chunks: list[ResponseChunk]


def _load_kernels_eagerly() -> None:
    """Decode and the executor on one GPU in one process share a CUDA context. Loading a kernel may
    synchronize the context (CUDA's lazy loading, a Triton kernel's first launch), and while one of
    the exchange's flag waits spins, the context never drains: the process hangs (docs/performance.md,
    ninth run). With ``CUDA_MODULE_LOADING=EAGER`` torch's kernels load when CUDA starts, and the
    CUDA graphs' warm-ups load the Triton kernels of the steps before the first exchange (eager
    steps are refused), as `sampler.warm_up` does the sampler's. The variable only counts before CUDA
    starts in this process."""
    if os.environ.get("CUDA_MODULE_LOADING") == "EAGER":
        return
    if torch.cuda.is_initialized():
        log.warning("offloading on one GPU in one process with CUDA's lazy kernel loading may hang: set "
                    "CUDA_MODULE_LOADING=EAGER before CUDA starts (or serve: one process per role)")
        return
    os.environ["CUDA_MODULE_LOADING"] = "EAGER"


class LocalEngine:
    def __init__(self, ckpt: Checkpoint, engine: EngineConfig, dtype: torch.dtype = torch.float32) -> None:
        self.placement = placement = Placement.of(engine)
        # decode and the executor in one CUDA context (see _load_kernels_eagerly)
        shares_one_context = engine.device == "cuda" and not placement.is_two_gpus and engine.offload != "never"
        if shares_one_context and not engine.cuda_graphs:  # eager steps load kernels mid-exchange (ninth run)
            raise ValueError("offloading with decode and the executor on one GPU in one process needs CUDA graphs "
                             "(eager steps load kernels while the exchange's waits spin, which hangs); drop "
                             "--no-cuda-graphs, use two GPUs, or serve (one process per role)")
        if shares_one_context:
            _load_kernels_eagerly()  # before anything here starts CUDA
        self._tmp = None
        if engine.run_dir == EngineConfig().run_dir:
            self._tmp = tempfile.TemporaryDirectory(prefix="adrenaline-local-", dir="/dev/shm")
            engine = replace(engine, run_dir=self._tmp.name)
        # Shares, pool sizes (this process allocates both pools: its memory, measured here) and OB.
        gpus = measure_gpus({engine.prefill_gpu, engine.decode_gpu}) if needs_gpus(engine) else None
        engine = resolve_engine(engine, ckpt.config, gpus, one_process=True)
        for note in engine.extra["resolution"]:
            log.info("%s", note)
        self.engine = engine
        self.ckpt = ckpt
        # Each role on its device, as under Triton; each thread that launches work binds its device.
        self.executor = AttentionExecutor(ckpt.config, engine, dtype, placement.executor)
        self.executor.start()
        bind(placement.decode)
        model = build_model(ckpt, dtype, placement.decode, engine.max_model_len, engine.seed)
        self.pools = {"decode": KVPool.create("decode", ckpt.config, engine, dtype), "executor": self.executor.pool}
        bind(placement.prefill)
        prefill_model = model
        if placement.prefill != placement.decode:  # two GPUs: prefill has its own copy of the weights
            prefill_model = build_model(ckpt, dtype, placement.prefill, engine.max_model_len, engine.seed)
        # prefill writes both pools as tensors of its own device (through NVLink for decode's)
        prefill_pools = {name: KVPool.attach(name, ckpt.config, engine, dtype) for name in self.pools}
        self.prefill = PrefillRunner(prefill_model, make_attention_backend(placement.prefill), prefill_pools,
                                     engine.max_prefill_tokens)
        policy = OffloadPolicy(engine.offload, engine.offload_bound)
        self.admission = Admission(lambda n: self.pools[n].allocator, policy, engine.block_size,
                                   engine.admission_timeout_s,
                                   tpot_slo_s=engine.tpot_slo_ms / 1e3 if engine.tpot_slo_ms else None)
        self._results: dict[int, list[ResponseChunk]] = {}
        self._done: dict[int, threading.Event] = {}
        self.decode = DecodeService(model, ckpt.tokenizer, engine, dtype, lambda n: self.pools[n], self._collect)
        self._ids = itertools.count()

    def _collect(self, seq_id: int, chunk: ResponseChunk) -> None:
        self._results[seq_id].append(chunk)
        if chunk.is_final:
            self._done[seq_id].set()

    def generate(
        self, prompts: list[list[int]], params: list[GenerationParams], timeout: float = 600
    ) -> list[Completion]:
        """Admit all prompts, prefill them as one batch, decode them together."""
        tickets = [self.admission.admit(len(p), gp.sampling.max_tokens) for p, gp in zip(prompts, params)]
        items = [PrefillItem(p, t.pool, t.block_table, gp.sampling) for p, t, gp in zip(prompts, tickets, params)]
        bind(self.placement.prefill)
        first = self.prefill.run(items)
        seqs = []
        for p, t, gp, tok in zip(prompts, tickets, params, first):
            seq_id = next(self._ids)
            self._results[seq_id], self._done[seq_id] = [], threading.Event()
            seqs.append(Sequence(seq_id, list(p), [tok], t.block_table, t.pool, gp, handle=seq_id))
        for seq in seqs:
            self.decode.add(seq)
        out = []
        for seq in seqs:
            if not self._done[seq.seq_id].wait(timeout):
                raise TimeoutError(f"request {seq.seq_id} did not finish in {timeout}s")
            chunks = self._results.pop(seq.seq_id)
            final = chunks[-1]
            if final.error:
                raise RuntimeError(final.error)
            text = "".join(c.text for c in chunks) if seq.params.output.stream else final.text
            n_out = sum(c.num_output_tokens for c in chunks) if seq.params.output.stream else final.num_output_tokens
            out.append(Completion(text, seq.output_ids[:n_out], final.finish_reason, seq.is_offloaded, chunks))
        return out

    def close(self) -> None:
        self.decode.stop()
        self.executor.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
