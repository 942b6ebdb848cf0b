"""`adrenaline bench offload`: offloaded decode on the real layout, next to the all-local step.

Decode runs in this process on ``--decode-gpu`` with the engine's own `DecodeRunner` (CUDA graphs,
the device transport); the attention executor runs in a child process on ``--prefill-gpu`` under
its MPS share (``--executor-sm-share``), the engine's own `AttentionExecutor`. Dummy weights of the
real shapes; both KV pools full of random K/V; random non-contiguous blocks.

For each shape, batch and context it times one decode step (host to host: inputs, graph replay,
LM head, greedy sampling, tokens back) with no rows offloaded (``never``), half of them (``half``)
and all of them (``always``; ``two-batch``: all of them with the step cut in two batches whose
layers interleave, `LlamaForCausalLM.forward_two_batches`; ``half-two-batch``: half of them, the
local rows and the offloaded rows as the two batches), and prints the ratios to the all-local
step next to the byte roofline of the all-local step: (weight bytes + every row's K/V bytes) / the
decode GPU's copy bandwidth.
A case whose KV does not fit its pool is listed as such.

``--handoff`` first runs adrenaline_py/bench_handoff.py on the same two GPUs: the per-layer
hand-off of the chosen primitive (spin flags, NVLink reads and writes by the executor's kernels)
next to the alternatives that were tried.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from adrenaline_py.config import DEFAULT_EXECUTOR_SM_SHARE, EngineConfig, ModelConfig
from adrenaline_py.request import GenerationParams, OutputOptions, SamplingParams

# share of the rows offloaded; "two-batch": all of them, the step cut in two interleaved batches;
# "half-two-batch": half of them, the local rows and the offloaded rows as the two batches
MODES = {"never": 0.0, "half": 0.5, "half-two-batch": 0.5, "always": 1.0, "two-batch": 1.0}
CUT_MODES = ("two-batch", "half-two-batch")
PAGE = 16
HEADROOM_BYTES = 8 << 30      # activations, graphs, logits and allocator slack beside weights + pool
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class Case:
    shape: str
    batch: int
    context: int
    mode: str
    num_local: int
    num_offloaded: int
    step_ms: float | None = None
    overlapped_ms: float | None = None  # per step, each launched before the last one's tokens are read
    note: str = ""
    profile: str = ""  # decode's kernels per step (--profile)


def _kv_bytes_per_token(cfg: ModelConfig, elem: int) -> int:
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * elem


def _fill_random(kv: torch.Tensor) -> None:
    for layer in kv:  # layer by layer: normal_ on the whole pool at once would need a temporary copy
        layer.normal_()


def _executor_main(conn, engine: EngineConfig, sm_share: int | None) -> None:
    """The executor child: an `AttentionExecutor` whose pool fills the GPU's free memory (minus headroom)."""
    os.environ.update(NCCL_ENV)
    if sm_share:
        os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(sm_share)  # before CUDA starts
    try:
        from adrenaline_py.engine.executor import AttentionExecutor
        from adrenaline_py.loader import load_checkpoint
        from adrenaline_py.placement import bind_role

        device = bind_role("executor", engine)
        cfg = load_checkpoint(engine.model, with_weights=False).config
        dtype = getattr(torch, engine.dtype)
        free, _ = torch.cuda.mem_get_info(device)
        block_bytes = PAGE * _kv_bytes_per_token(cfg, torch.finfo(dtype).bits // 8)
        blocks = int((free - HEADROOM_BYTES) // block_bytes)
        engine = replace(engine, num_executor_blocks=blocks)
        executor = AttentionExecutor(cfg, engine, dtype, device)
        _fill_random(executor.pool.kv)
        torch.cuda.synchronize(device)
        executor.start()
        conn.send(("ready", {"blocks": blocks, "pid": os.getpid(), "sms": torch.cuda.get_device_properties(
            device).multi_processor_count}))
        conn.recv()  # until the parent is done
        executor.stop()
    except Exception as e:  # report instead of leaving the parent waiting
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))


def _decode_main(conn, shape, batches, contexts, modes, engine, sm_share, steps, profile=None) -> None:
    """One shape, in a child process of its own (its GPU memory goes back when it exits)."""
    os.environ.update(NCCL_ENV)
    try:
        from adrenaline_py.bench import copy_bandwidth_gbs

        torch.cuda.set_device(engine.decode_gpu)
        copy_gbs = copy_bandwidth_gbs(torch.device("cuda", engine.decode_gpu))
        torch.cuda.empty_cache()  # the copy's buffers: free memory sizes the pool
        cases, info = run_shape(shape, batches, contexts, modes, engine, copy_gbs, sm_share, steps, profile)
        info["copy_gbs"] = copy_gbs
        info["device"] = torch.cuda.get_device_name(engine.decode_gpu)
        conn.send(("ok", (cases, info)))
    except Exception as e:
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))


def run_shape(shape: str, batches: list[int], contexts: list[int], modes: list[str], engine: EngineConfig,
              copy_gbs: float, sm_share: int | None, steps: int,
              profile: tuple[int, int, str] | None = None) -> tuple[list[Case], dict]:
    from adrenaline_py.attention import make_attention_backend
    from adrenaline_py.bench import kernel_profile, overlapped_step_ms
    from adrenaline_py.engine.decode import DecodePlan, DecodeRunner, Sequence
    from adrenaline_py.kv_cache import BlockAllocator, KVPool, blocks_needed
    from adrenaline_py.loader import build_model, load_checkpoint
    from adrenaline_py.placement import bind_role
    from adrenaline_py.transport import make_transport

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_executor_main, args=(child, engine, sm_share), daemon=True)
    proc.start()
    cases: list[Case] = []
    info: dict = {}
    try:
        if not parent.poll(600):
            raise TimeoutError("the executor did not start within 600 s")
        kind, payload = parent.recv()
        if kind != "ready":
            raise RuntimeError(f"executor: {payload}")
        info["executor_blocks"], info["executor_sms"] = payload["blocks"], payload["sms"]
        engine = replace(engine, num_executor_blocks=payload["blocks"])
        device = bind_role("decode", engine)
        dtype = getattr(torch, engine.dtype)
        ckpt = load_checkpoint(engine.model)
        cfg = ckpt.config
        model = build_model(ckpt, dtype, device, engine.max_model_len, engine.seed)
        elem = torch.finfo(dtype).bits // 8
        free, _ = torch.cuda.mem_get_info(device)
        decode_blocks = int((free - HEADROOM_BYTES) // (PAGE * _kv_bytes_per_token(cfg, elem)))
        engine = replace(engine, num_decode_blocks=decode_blocks)
        info["decode_blocks"] = decode_blocks
        pool = KVPool.create("decode", cfg, engine, dtype)
        _fill_random(pool.kv)
        executor_alloc = BlockAllocator.attach(engine.run_dir, "executor", engine.num_executor_blocks)
        allocators = {"decode": pool.allocator, "executor": executor_alloc}
        transport = make_transport(cfg, engine, dtype, device, executor_pid=lambda: payload["pid"])
        runner = DecodeRunner(model, make_attention_backend(device), pool, transport, cuda_graphs=engine.cuda_graphs,
                              max_model_len=engine.max_model_len, max_batch=engine.max_decode_batch,
                              two_batch="on", two_batch_min_rows=1)  # graphs captured on first use
        weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if "embed_tokens" not in n or cfg.tie_word_embeddings)
        info["weight_gb"] = weights / 1e9
        ids = itertools.count(1)
        gen = torch.Generator().manual_seed(0)
        params = GenerationParams(SamplingParams(max_tokens=engine.max_tokens_limit), OutputOptions())
        for c in contexts:
            for b in batches:
                for mode in modes:
                    n = round(b * MODES[mode])
                    case = Case(shape, b, c, mode, b - n, n)
                    runner.two_batch = "on" if mode in CUT_MODES else "off"
                    cases.append(case)
                    tables: dict[str, list[list[int]]] = {"decode": [], "executor": []}
                    need = blocks_needed(c + 1, PAGE)  # an overlapped step writes position c
                    for pool_name, count in (("decode", b - n), ("executor", n)):
                        for _ in range(count):
                            t = allocators[pool_name].allocate(need, c)
                            if t is None:
                                blocks = allocators[pool_name].num_blocks
                                case.note = f"does not fit: the {pool_name} pool holds {blocks} blocks"
                                break
                            tables[pool_name].append(t)
                    try:
                        if not case.note:
                            seqs = [Sequence(next(ids), [1] * (c - 1), [int(torch.randint(3, cfg.vocab_size, (1,),
                                             generator=gen))], t, pool_name, params)
                                    for pool_name in ("decode", "executor") for t in tables[pool_name]]
                            plan = DecodePlan(local=seqs[: b - n], offloaded=seqs[b - n:])
                            for _ in range(3):  # warm-up: captures the decode graph and the executor's
                                runner.run(plan)
                            times, cut = [], runner.two_batch_steps
                            for _ in range(steps):
                                t0 = time.perf_counter()
                                runner.run(plan)
                                times.append((time.perf_counter() - t0) * 1e3)
                            case.step_ms = statistics.median(times)
                            # as the decode loop runs them: step N+1 launched before N's tokens are read
                            case.overlapped_ms = overlapped_step_ms(
                                lambda pending, plan=plan: runner.launch(plan, pending), runner.collect, steps=steps,
                                drop=runner.drop)
                            if profile == (b, c, mode):  # decode's kernels, the exchange's waits among them
                                case.profile = kernel_profile(lambda plan=plan: runner.run(plan), device, top=25)
                            if (runner.two_batch_steps > cut) != (mode in CUT_MODES):
                                raise RuntimeError("the step was not cut as the mode says")
                    except Exception as e:
                        case.note = f"failed: {type(e).__name__}: {e}"
                    finally:
                        for pool_name, ts in tables.items():
                            for t in ts:
                                allocators[pool_name].free(t, c)
                    print(_case_line(case), flush=True)
        info["decode_graphs"] = runner.graphs.num_graphs if runner.graphs else 0
        info["roofline_ms"] = {f"{b}x{c}": (weights + b * c * _kv_bytes_per_token(cfg, elem)) / copy_gbs / 1e6
                               for b in batches for c in contexts}
        transport.shutdown()
    finally:
        try:
            parent.send("stop")
        except OSError:
            pass
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return cases, info


def _case_line(c: Case) -> str:
    ms = f"{c.step_ms:.2f} ms" if c.step_ms is not None else c.note
    if c.overlapped_ms is not None:
        ms += f", overlapped {c.overlapped_ms:.2f} ms"
    return f"{c.shape} batch {c.batch} context {c.context} {c.mode} ({c.num_local} local + {c.num_offloaded}): {ms}"


def _cell(case: Case | None, field: str = "step_ms") -> str:
    if case is None:
        return "—"
    if getattr(case, field) is not None:
        return f"{getattr(case, field):.2f}"
    return "does not fit" if case.note.startswith("does not") else "failed"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "—"


def table(cases: list[Case], infos: dict[str, dict]) -> str:
    lines = ["| shape | batch | context | never ms | half ms | half, two batches ms | always ms | "
             "always, two batches ms | half / never | half, two batches / never | always / never | "
             "two batches / never | roofline (all local) ms | never / roofline |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(c.shape, c.batch, c.context, c.mode): c for c in cases}
    for shape, b, ctx in sorted({(c.shape, c.batch, c.context) for c in cases}, key=lambda k: (k[0], k[2], k[1])):
        row = {m: by.get((shape, b, ctx, m)) for m in MODES}
        ms = {m: (c.step_ms if c else None) for m, c in row.items()}
        roof = infos.get(shape, {}).get("roofline_ms", {}).get(f"{b}x{ctx}")
        lines.append(f"| {shape} | {b} | {ctx} | {_cell(row['never'])} | {_cell(row['half'])} | "
                     f"{_cell(row['half-two-batch'])} | {_cell(row['always'])} | {_cell(row['two-batch'])} | "
                     f"{_ratio(ms['half'], ms['never'])} | {_ratio(ms['half-two-batch'], ms['never'])} | "
                     f"{_ratio(ms['always'], ms['never'])} | {_ratio(ms['two-batch'], ms['never'])} | "
                     f"{f'{roof:.2f}' if roof else '—'} | "
                     f"{_ratio(ms['never'], roof)} |")
    lines += ["", "Overlapped steps (as the decode loop runs them: step N+1 launched before N's tokens are read), "
              "ms per step:", "",
              "| shape | batch | context | never | half | half, two batches | always | always, two batches | "
              "half / never | always / never | never / roofline |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape, b, ctx in sorted({(c.shape, c.batch, c.context) for c in cases}, key=lambda k: (k[0], k[2], k[1])):
        row = {m: by.get((shape, b, ctx, m)) for m in MODES}
        ms = {m: (c.overlapped_ms if c else None) for m, c in row.items()}
        roof = infos.get(shape, {}).get("roofline_ms", {}).get(f"{b}x{ctx}")
        cells = " | ".join(_cell(row[m], "overlapped_ms") for m in ("never", "half", "half-two-batch", "always",
                                                                     "two-batch"))
        lines.append(f"| {shape} | {b} | {ctx} | {cells} | {_ratio(ms['half'], ms['never'])} | "
                     f"{_ratio(ms['always'], ms['never'])} | {_ratio(ms['never'], roof)} |")
    failures = [c for c in cases if c.note.startswith("failed")]
    if failures:
        lines += ["", *[f"- {_case_line(c)}" for c in failures]]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", nargs="+", default=["llama-2-7b", "llama-3.1-8b"])
    p.add_argument("--batches", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--prefill-gpu", type=int, default=0, help="GPU of the attention executor (and prefill)")
    p.add_argument("--decode-gpu", type=int, default=1)
    p.add_argument("--executor-sm-share", type=int, default=DEFAULT_EXECUTOR_SM_SHARE,
                   help="MPS percentage of the executor's GPU (0: no MPS)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case (median)")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--handoff", action="store_true", help="first measure the per-layer hand-off primitives")
    p.add_argument("--profile", nargs=3, metavar=("BATCH", "CONTEXT", "MODE"), default=None,
                   help="also list decode's kernels per step of this case (torch.profiler)")
    p.add_argument("--out", default=None, help="write offload_bench.md/.json here (default: $OUT when set)")


def main(a: argparse.Namespace) -> int:
    from adrenaline_py.serving.launcher import MPSDaemon

    os.environ.update(NCCL_ENV)
    if a.prefill_gpu == a.decode_gpu:
        raise ValueError("bench offload measures the two-GPU layout: --prefill-gpu and --decode-gpu must differ")
    profile = (int(a.profile[0]), int(a.profile[1]), a.profile[2]) if a.profile else None
    if profile and (profile[0] not in a.batches or profile[1] not in a.contexts or profile[2] not in a.modes):
        raise ValueError(f"--profile {' '.join(a.profile)}: not a case of --batches, --contexts and --modes")
    out = a.out or os.environ.get("OUT")
    text = [f"# adrenaline bench offload — {datetime.date.today().isoformat()}", ""]
    if a.handoff:  # its own processes and MPS daemon: before this process touches CUDA
        cmd = [sys.executable, "-m", "adrenaline_py.bench_handoff", "--layouts", "2gpu-mps",
               "--executor-sm-share", str(a.executor_sm_share or 100), "--variants", "socket", "memops-device-graph",
               "direct-memops-device-graph", "flags-spin-device-graph", "direct-spin-device-graph", "nccl"]
        if out:
            cmd += ["--out", out]
        subprocess.run(cmd, check=False, timeout=900)
        if out and Path(out, "handoff.md").exists():
            text += ["## Per-layer hand-off (bench_handoff)", "", Path(out, "handoff.md").read_text(), ""]
    with tempfile.TemporaryDirectory(prefix="bench-offload-", dir="/dev/shm") as run_dir:
        daemon = None
        if a.executor_sm_share:
            daemon = MPSDaemon(Path(run_dir))
            daemon.start()
            os.environ.update(daemon.env)  # the decode and executor children become MPS clients
        all_cases, infos = [], {}
        try:
            ctx = mp.get_context("spawn")
            for shape in a.shapes:
                engine = EngineConfig(
                    model=f"dummy:{shape}", device="cuda", prefill_gpu=a.prefill_gpu, decode_gpu=a.decode_gpu,
                    dtype="bfloat16", offload="always", max_model_len=max(a.contexts) + 16,
                    max_tokens_limit=max(a.contexts), max_decode_batch=max(a.batches), block_size=PAGE,
                    run_dir=str(Path(run_dir, shape)), executor_sm_share=a.executor_sm_share or 100,
                    cuda_graphs=not a.no_cuda_graphs,
                )
                Path(engine.run_dir).mkdir()
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_decode_main, args=(child, shape, a.batches, a.contexts, a.modes, engine,
                                                              a.executor_sm_share, a.steps, profile))
                proc.start()
                kind, payload = parent.recv() if parent.poll(1800) else ("error", "timed out")
                proc.join(60)
                if proc.is_alive():
                    proc.kill()
                if kind != "ok":
                    print(f"{shape}: {payload}", flush=True)
                    infos[shape] = {"error": payload}
                    continue
                cases, info = payload
                all_cases += cases
                infos[shape] = info
        finally:
            if daemon is not None:
                daemon.stop()
    first = next((i for i in infos.values() if "copy_gbs" in i), {})
    text += [f"{first.get('device', '?')}; decode on GPU {a.decode_gpu}, executor on GPU {a.prefill_gpu} (MPS "
             f"{a.executor_sm_share or 'off'}%); torch {torch.__version__}; bf16; page {PAGE}; CUDA graphs "
             f"{'off' if a.no_cuda_graphs else 'on'}; copy bandwidth (decode GPU) **{first.get('copy_gbs', 0):.0f} "
             f"GB/s**; step = median of {a.steps} host-to-host steps; overlapped = median of 5 runs of "
             f"{a.steps} overlapped steps, ms per step.", ""]
    text += [table(all_cases, infos), "", "```", json.dumps(infos, indent=1), "```"]
    for c in all_cases:
        if c.profile:
            text += ["", f"## {c.shape}, batch {c.batch}, context {c.context}, {c.mode}: decode's kernels per step "
                     "(one step at a time; flag waits are the exchange waiting for the executor)", "", c.profile]
    report = "\n".join(text) + "\n"
    print("\n" + report)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "offload_bench.md").write_text(report)
        Path(out, "offload_bench.json").write_text(json.dumps({"cases": [asdict(c) for c in all_cases],
                                                               "info": infos}, indent=1))
    return 0
