"""`adrenaline bench engine`: decode speed of the engine next to the memory-bandwidth roofline.

For each model shape (dummy weights of the real shape, drawn on the GPU) this measures:

- the device-to-device copy bandwidth (bytes read + written by a large ``copy_``): the ceiling;
- decode attention alone (the paged kernel the engine uses) at batch 64-256, context 1K-4K: bytes
  it must read (each context token's K and V once, plus q and out) / median time, next to copy;
- one decode step (all layers, LM head and greedy sampling, as the decode loop runs it: host-side
  inputs, CUDA-graph replay, logits, argmax, tokens back on the host) at batch 1-256, context 1K
  and 4K, next to its roofline: (weight bytes read + KV bytes read) / copy bandwidth. Weight bytes
  are every matrix the step reads (the embedding table is excluded: a step gathers only B rows
  of it); KV bytes are batch × context × per-token K+V bytes over all layers; and next to the
  per-kernel roofline: each kernel of the step (`step_kernels`) at the slower of bytes / copy
  bandwidth and FLOPs / the measured matmul rate, summed;
- the same step with sampling (temperature 0.8, top-p 0.95, the engine's sampler) next to greedy;
- the step overlapped as the decode loop runs it by default: step N+1 is launched (its inputs
  prepared, its graph replayed, its token copy queued) before step N's tokens are read on the host,
  so the host's work hides behind the GPU's (`overlapped_step_ms`);
- output tokens/s = batch / step time.

Shapes whose KV cache does not fit next to the weights are listed as such, not skipped silently.
On CPU (``--device cpu``) the same code runs eagerly with the torch backend: a smoke test only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from adrenaline_py.attention import make_attention_backend
from adrenaline_py.attention.triton_decode import paged_decode_attention_triton
from adrenaline_py.config import ModelConfig
from adrenaline_py.engine.cuda_graphs import DecodeGraphs
from adrenaline_py.loader import build_model, load_checkpoint
from adrenaline_py.models.llama import LlamaForCausalLM
from adrenaline_py.request import SamplingParams
from adrenaline_py.sampler import SamplingRow, sample

DEFAULT_SHAPES = ("llama-3.1-8b", "llama-2-7b", "llama-2-13b")
DEFAULT_BATCHES = (1, 16, 64, 128, 256)
DEFAULT_CONTEXTS = (1024, 4096)
ATTENTION_BATCHES = (64, 128, 256)
ATTENTION_CONTEXTS = (1024, 2048, 4096)
PAGE = 16
HEADROOM_BYTES = 6 << 30  # activations, logits, graphs and allocator slack beside weights + KV


@dataclass
class StepResult:
    shape: str
    batch: int
    context: int
    step_ms: float | None = None      # full step, host to host
    graph_ms: float | None = None     # the captured layers alone (GPU time)
    roofline_ms: float | None = None
    flop_floor_ms: float | None = None  # matrix + attention FLOPs / measured bf16 matmul rate
    kernel_floor_ms: float | None = None  # per-kernel roofline: sum of max(bytes / copy, FLOPs / matmul rate)
    sampled_ms: float | None = None   # the same step with temperature 0.8, top-p 0.95 on every row
    overlapped_ms: float | None = None  # per step, each launched before the last one's tokens are read
    weight_gb: float = 0.0
    kv_gb: float = 0.0
    tokens_per_s: float | None = None
    note: str = ""
    profile: str = ""                 # per-kernel GPU time of the layers (--profile)


@dataclass
class AttentionResult:
    shape: str
    batch: int
    context: int
    us: float
    gbs: float


def _timer(device: torch.device):
    """Median milliseconds of a function: CUDA events through triton's do_bench, or a host clock."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn, rep_ms=200: triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")

    def host(fn, rep_ms=200):
        fn()
        times, deadline = [], time.perf_counter() + rep_ms / 1e3
        while time.perf_counter() < deadline or len(times) < 3:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return host


def overlapped_step_ms(launch: Callable[[Any], Any], collect: Callable[[Any], object], steps: int = 30,
                       repeats: int = 5, drop: Callable[[Any], object] | None = None) -> float:
    """Milliseconds per step when each step is launched before the previous one's tokens reach the
    host, as the decode loop runs them (`DecodeEngine._step_overlapped`): ``launch(pending)`` enqueues
    step N+1 (``pending`` = step N, None for the first) and returns it, then ``collect(N)`` waits for
    N's tokens. The median over ``repeats`` runs of ``steps`` steps, after one run of warm-up; each
    run ends by collecting its last step, so it pays one step's host work that nothing hides.
    If a launch or a collect raises, ``drop`` (if given) waits out the steps still in flight, so
    that nothing stays registered with the transport, and the error is raised."""
    def one_run() -> float:
        t0 = time.perf_counter()
        in_flight: list[Any] = []  # launched, not yet collected, oldest first
        try:
            for _ in range(steps):
                in_flight.append(launch(in_flight[-1] if in_flight else None))
                if len(in_flight) == 2:
                    collect(in_flight[0])
                    in_flight.pop(0)
            collect(in_flight[0])
            in_flight.pop(0)
        except BaseException:
            for step in in_flight if drop is not None else ():
                with contextlib.suppress(Exception):
                    drop(step)
            raise
        return (time.perf_counter() - t0) * 1e3 / steps

    one_run()
    return statistics.median(one_run() for _ in range(repeats))


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 4 << 30) -> float:
    n = nbytes // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = _timer(device)(lambda: dst.copy_(src))
    return 2 * n * 2 / ms / 1e6


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """Measured dense matmul rate: the compute ceiling (decode GEMMs at batch >= 128 approach it)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _timer(device)(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def kv_bytes_per_token(cfg: ModelConfig, elem: int) -> int:
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * elem


def weight_bytes_read(model: LlamaForCausalLM) -> int:
    """Bytes of the parameters one decode step reads (all but the embedding table, unless tied)."""
    seen, total = set(), 0
    embed = model.model.embed_tokens.weight
    for p in model.parameters():
        if id(p) in seen or (p is embed and p is not model.lm_head.weight):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def step_kernels(cfg: ModelConfig, batch: int, ctx: int, elem: int) -> list[tuple[str, float, float]]:
    """(kernel, bytes, FLOPs) of one decode step, kernel by kernel as the step runs them.

    Bytes are what each kernel must move at least (weights once, activations in and out, the
    context's K/V once); FLOPs are its multiply-adds x 2. Norms, RoPE, the KV store and the
    activation count bytes only.
    """
    h, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    b = batch
    qkv = (hq + 2 * hkv) * d

    def gemm(name: str, k: int, n: int) -> tuple[str, float, float]:
        return name, (k * n + b * k + b * n) * elem, 2 * b * k * n

    layer = [
        ("input norm", 2 * b * h * elem + h * elem, 0.0),
        gemm("qkv projection", h, qkv),
        ("rope", 2 * b * (hq + hkv) * d * elem, 0.0),
        ("kv store", 2 * b * 2 * hkv * d * elem, 0.0),
        ("attention", (b * ctx * 2 * hkv * d + 2 * b * hq * d) * elem, 4 * b * ctx * hq * d),
        gemm("output projection", hq * d, h),
        ("post-attention norm (fused add)", 3 * b * h * elem + h * elem, 0.0),
        gemm("gate/up projection", h, 2 * inter),
        ("silu and mul", 3 * b * inter * elem, 0.0),
        gemm("down projection", inter, h),
    ]
    kernels = [(f"{name} (x{cfg.num_hidden_layers})", nbytes * cfg.num_hidden_layers, flops * cfg.num_hidden_layers)
               for name, nbytes, flops in layer]
    kernels += [("final norm", 2 * b * h * elem + h * elem, 0.0), gemm("LM head", h, vocab),
                ("token choice", b * vocab * elem, 0.0)]
    return kernels


def kernel_floor_ms(cfg: ModelConfig, batch: int, ctx: int, elem: int, copy_gbs: float, tflops: float) -> float:
    """Per-kernel roofline: each kernel at the slower of its byte and FLOP floors, summed."""
    return sum(max(nbytes / copy_gbs / 1e6, flops / tflops / 1e9) for _, nbytes, flops in
               step_kernels(cfg, batch, ctx, elem))


def _random_pool(cfg: ModelConfig, num_blocks: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    shape = (cfg.num_hidden_layers, 2, num_blocks, PAGE, cfg.num_key_value_heads, cfg.head_dim)
    kv = torch.empty(shape, dtype=dtype, device=device)
    for layer in kv:  # layer by layer: normal_ on 60 GB at once would need a temporary copy
        layer.normal_()
    return kv


def bench_attention(shape: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                    batches=ATTENTION_BATCHES, contexts=ATTENTION_CONTEXTS) -> list[AttentionResult]:
    """The decode kernel alone on one layer's worth of random paged K/V (random non-contiguous pages)."""
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    elem = torch.finfo(dtype).bits // 8
    num_blocks = max(batches) * math.ceil(max(contexts) / PAGE) + 1
    k = torch.randn(num_blocks, PAGE, hkv, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    gen = torch.Generator(device=device).manual_seed(0)
    timer = _timer(device)
    out = []
    for batch in batches:
        for ctx in contexts:
            nb = math.ceil(ctx / PAGE)
            tables = torch.randperm(num_blocks, generator=gen, device=device)[: batch * nb].view(batch, nb)
            lens = torch.full((batch,), ctx, dtype=torch.long, device=device)
            q = torch.randn(batch, hq, d, generator=gen, device=device, dtype=dtype)
            ms = timer(lambda q=q, t=tables, n=lens, c=ctx: paged_decode_attention_triton(q, k, v, t, n, c))
            nbytes = batch * ctx * hkv * d * 2 * elem + 2 * batch * hq * d * elem
            out.append(AttentionResult(shape, batch, ctx, ms * 1e3, nbytes / ms / 1e6))
    return out


def kernel_profile(fn, device: torch.device, reps: int = 5, top: int = 12) -> str:
    """GPU time per kernel over ``reps`` calls (torch.profiler / CUPTI), as a markdown table."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize(device)
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in rows)
    lines = ["| kernel | calls/step | µs/step | share |", "|---|---:|---:|---:|"]
    for e in rows[:top]:
        lines.append(f"| `{e.key[:90]}` | {e.count / reps:.0f} | {e.device_time_total / reps:.0f} | "
                     f"{e.device_time_total / total:.1%} |")
    lines.append(f"| all kernels | {sum(e.count for e in rows) / reps:.0f} | {total / reps:.0f} | 100% |")
    return "\n".join(lines)


def bench_decode_step(
    shape: str, model: LlamaForCausalLM, dtype: torch.dtype, device: torch.device, batch: int, ctx: int,
    copy_gbs: float, use_graphs: bool, profile: bool = False, tflops: float | None = None,
) -> StepResult:
    cfg = model.config
    elem = torch.finfo(dtype).bits // 8
    weights = weight_bytes_read(model)
    kv_read = batch * ctx * kv_bytes_per_token(cfg, elem)
    res = StepResult(shape, batch, ctx, weight_gb=weights / 1e9, kv_gb=kv_read / 1e9,
                     roofline_ms=(weights + kv_read) / copy_gbs / 1e6)
    if tflops:
        # 2 FLOPs per weight per row, plus QK^T and PV over the context (4 * ctx * Hq * D per row and layer).
        flops = 2 * batch * weights / elem + 4 * batch * ctx * cfg.num_attention_heads * cfg.head_dim * \
            cfg.num_hidden_layers
        res.flop_floor_ms = flops / tflops / 1e9
        res.kernel_floor_ms = kernel_floor_ms(cfg, batch, ctx, elem, copy_gbs, tflops)
    nb = math.ceil(ctx / PAGE)
    num_blocks = batch * nb + 1
    pool_bytes = num_blocks * PAGE * kv_bytes_per_token(cfg, elem)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if pool_bytes + HEADROOM_BYTES > free:
            res.note = f"does not fit: KV needs {pool_bytes / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
            return res
    kv = _random_pool(cfg, num_blocks, dtype, device)
    gen = torch.Generator().manual_seed(batch * 100_003 + ctx)
    perm = torch.randperm(num_blocks - 1, generator=gen)[: batch * nb] + 1  # block 0 stays spare
    tables = perm.view(batch, nb).tolist()
    input_ids = torch.randint(0, cfg.vocab_size, (batch,), generator=gen).tolist()
    positions, lens, keys = [ctx - 1] * batch, [ctx] * batch, list(range(batch))
    backend = make_attention_backend(device)
    timer = _timer(device)
    if use_graphs:
        graphs = DecodeGraphs(model, backend, kv, max_batch=batch, max_model_len=ctx)

        def forward():
            return graphs.run(keys, input_ids, positions, tables, lens)

        forward()
        graph, _ = graphs.graph(graphs.buckets_for(batch, 0))  # all rows local
        res.graph_ms = timer(graph.replay, rep_ms=500)
        if profile:
            res.profile = kernel_profile(graph.replay, device)
    else:
        from adrenaline_py.attention import build_decode_metadata

        def forward():
            meta = build_decode_metadata(kv, tables, lens, device)
            ids = torch.tensor(input_ids, device=device)
            return model(ids, torch.tensor(positions, device=device), backend, meta)

    def step():
        hidden = forward()
        return model.compute_logits(hidden).argmax(-1).tolist()  # tokens back on the host: a full step

    if use_graphs:
        rows = list(range(batch))

        def launch(pending):
            # as DecodeRunner.launch: inputs from the previous step's tokens still on the device, the
            # tokens of this one copied to pinned memory behind it, an event to wait for them
            prev = pending[0] if pending is not None else None
            hidden = graphs.run(keys, input_ids, positions, tables, lens, token_rows=rows if prev is not None
                                else None, prev_tokens=prev)
            tokens = model.compute_logits(hidden).argmax(-1)
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return tokens, host, ready

        def collect(launched):
            launched[2].synchronize()
            return launched[1].tolist()

        res.overlapped_ms = overlapped_step_ms(launch, collect)

    rows = [SamplingRow(SamplingParams(max_tokens=ctx, temperature=0.8, top_p=0.95, seed=i), [7] * (i % 5))
            for i in range(batch)]

    def sampled_step():
        return sample(model.compute_logits(forward()), rows)  # the engine's one sampler

    step()
    res.step_ms = timer(step, rep_ms=500)
    res.tokens_per_s = batch / res.step_ms * 1e3
    sampled_step()
    res.sampled_ms = timer(sampled_step, rep_ms=500)
    return res


def run(shapes, batches, contexts, device: torch.device, dtype: torch.dtype, use_graphs: bool,
        attention: bool = True, profile: tuple[int, int] | None = None) -> tuple[str, dict]:
    copy_gbs = copy_bandwidth_gbs(device, 4 << 30 if device.type == "cuda" else 256 << 20)
    tflops = matmul_tflops(device, dtype) if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"# adrenaline bench engine — {name}, {datetime.date.today().isoformat()}",
        "",
        f"torch {torch.__version__}; {str(dtype).removeprefix('torch.')}; page {PAGE}; CUDA graphs "
        f"{'on' if use_graphs else 'off'}; dummy weights of the real shapes; random K/V and tokens; "
        "medians. Device-to-device copy (read + write bytes): "
        f"**{copy_gbs:.0f} GB/s**." + (f" Dense {str(dtype).removeprefix('torch.')} matmul (8192³): "
                                         f"**{tflops:.0f} TFLOP/s**." if tflops else ""),
        "Roofline = (weight bytes + KV bytes read) / copy bandwidth; per-kernel roofline = the sum over the "
        "step's kernels (bench.step_kernels) of max(bytes / copy bandwidth, FLOPs / matmul rate); FLOP floor = "
        "the step's matrix and attention FLOPs / the matmul rate. Sampled step = the same step with the "
        "engine's sampler at temperature 0.8, top-p 0.95 on every row (greedy: argmax).",
    ]
    report: dict = {"device": name, "copy_gbs": copy_gbs, "matmul_tflops": tflops, "steps": [], "attention": []}
    profiles: list[str] = []
    for shape in shapes:
        ckpt = load_checkpoint(f"dummy:{shape}")
        cfg = ckpt.config
        if attention and device.type == "cuda":
            att = bench_attention(shape, cfg, dtype, device)
            report["attention"] += [asdict(a) for a in att]
            lines += ["", f"## {shape}: decode attention (Hq {cfg.num_attention_heads}, Hkv "
                          f"{cfg.num_key_value_heads}, D {cfg.head_dim}), one layer", "",
                      "| batch | context | µs | GB/s | of copy |", "|---:|---:|---:|---:|---:|"]
            lines += [f"| {a.batch} | {a.context} | {a.us:.1f} | {a.gbs:.0f} | {a.gbs / copy_gbs:.2f} |" for a in att]
            print("\n".join(lines[-len(att) - 4:]), flush=True)
        model = build_model(ckpt, dtype, device, max_positions=max(contexts) + 16)
        lines += ["", f"## {shape}: decode step", "",
                  "| batch | context | step ms | layers (graph) ms | roofline ms | step / roofline | "
                  "per-kernel roofline ms | step / per-kernel | overlapped step ms | overlapped / roofline | "
                  "overlapped / per-kernel | sampled step ms | sampled / greedy | "
                  "FLOP floor ms | weights GB | KV GB | tokens/s |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for ctx in contexts:
            for batch in batches:
                r = bench_decode_step(shape, model, dtype, device, batch, ctx, copy_gbs, use_graphs,
                                      profile=use_graphs and profile == (batch, ctx), tflops=tflops)
                floor = f"{r.flop_floor_ms:.2f}" if r.flop_floor_ms is not None else "—"
                kfloor = f"{r.kernel_floor_ms:.2f}" if r.kernel_floor_ms is not None else "—"
                if r.profile:
                    profiles.append(f"### {shape}, batch {batch}, context {ctx}: kernels of one step's layers"
                                    f"\n\n{r.profile}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the pool and graphs of this shape are gone: give back
                report["steps"].append(asdict(r))
                if r.step_ms is None:
                    lines.append(f"| {batch} | {ctx} | — | — | {r.roofline_ms:.2f} | — | {kfloor} | — | — | — | — | "
                                 f"— | — | {floor} | {r.weight_gb:.1f} | {r.kv_gb:.1f} | {r.note} |")
                else:
                    graph = f"{r.graph_ms:.2f}" if r.graph_ms is not None else "—"
                    per_kernel = f"{r.step_ms / r.kernel_floor_ms:.2f}" if r.kernel_floor_ms else "—"
                    ov = r.overlapped_ms
                    ov_kernel = f"{ov / r.kernel_floor_ms:.2f}" if ov and r.kernel_floor_ms else "—"
                    overlapped = f"{ov:.2f} | {ov / r.roofline_ms:.2f} | {ov_kernel}" if ov else "— | — | —"
                    lines.append(f"| {batch} | {ctx} | {r.step_ms:.2f} | {graph} | {r.roofline_ms:.2f} | "
                                 f"{r.step_ms / r.roofline_ms:.2f} | {kfloor} | {per_kernel} | {overlapped} | "
                                 f"{r.sampled_ms:.2f} | "
                                 f"{r.sampled_ms / r.step_ms:.2f} | {floor} | {r.weight_gb:.1f} | {r.kv_gb:.1f} | "
                                 f"{r.tokens_per_s:.0f} |")
                print(lines[-1], flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if profiles:
        lines += ["", "## Profiles", "", *profiles]
    return "\n".join(lines) + "\n", report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="dummy model shapes")
    p.add_argument("--batches", nargs="+", type=int, default=list(DEFAULT_BATCHES))
    p.add_argument("--contexts", nargs="+", type=int, default=list(DEFAULT_CONTEXTS))
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke test)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the layers eagerly")
    p.add_argument("--no-attention", action="store_true", help="skip the attention-kernel table")
    p.add_argument("--profile", nargs=2, type=int, metavar=("BATCH", "CONTEXT"), default=None,
                   help="also profile the kernels of this (batch, context) step (CUDA graphs on)")
    p.add_argument("--out", default=None, help="write the table (.md) and raw numbers (.json) here "
                                               "(default: $OUT when set)")


def main(a: argparse.Namespace) -> int:
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    use_graphs = device.type == "cuda" and not a.no_cuda_graphs
    text, report = run(a.shapes, a.batches, a.contexts, device, dtype, use_graphs,
                       attention=not a.no_attention, profile=tuple(a.profile) if a.profile else None)
    print("\n" + text)
    out = a.out or os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "engine_bench.md").write_text(text)
        Path(out, "engine_bench.json").write_text(json.dumps(report, indent=1))
    return 0
