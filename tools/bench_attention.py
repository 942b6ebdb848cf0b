"""Benchmark the Triton paged decode attention kernel against the GPU's copy bandwidth.

Decode attention reads each context token's K and V once: its floor is bytes / bandwidth. For each
shape this prints the kernel's median time, the bytes it must move (K+V context + q + out), the
achieved GB/s, and the ratio to a measured device-to-device copy (bytes read + written).

    python3 tools/bench_attention.py            # the table (and $OUT/attention_bench.md if OUT is set)
    python3 tools/bench_attention.py --sweep    # also sweep launch configurations on a few shapes
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adrenaline_py.attention.base import DecodeMetadata  # noqa: E402
from adrenaline_py.attention.torch_backend import paged_decode_attention  # noqa: E402
from adrenaline_py.attention.triton_decode import (  # noqa: E402
    DecodeKernelConfig,
    default_config,
    paged_decode_attention_triton,
)

MODELS = {"llama-3.1-8b": (32, 8, 128), "llama-2-7b": (32, 32, 128)}
BATCHES = (16, 64, 128, 256)
CONTEXTS = (1024, 2048, 4096, 8192)
BASELINE_SHAPES = ((16, 1024), (64, 2048))  # (batch, context) timed through the torch reference too
PAGE = 16
DTYPE = torch.bfloat16
COPY_ELEMS = 1 << 30  # 2 GiB of bf16 each way: far beyond L2
DEVICE = "cuda"  # a smoke test may point this at "cpu" under TRITON_INTERPRET=1


def bench_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def copy_bandwidth_gbs() -> float:
    n = COPY_ELEMS
    src = torch.randn(n, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep_ms=200)
    return 2 * n * src.element_size() / ms / 1e6


class Pool:
    """One big random KV pool per model; each shape takes a random (non-contiguous) set of blocks."""

    def __init__(self, hkv: int, d: int, num_blocks: int) -> None:
        self.k = torch.randn(num_blocks, PAGE, hkv, d, device=DEVICE, dtype=DTYPE)
        self.v = torch.randn(num_blocks, PAGE, hkv, d, device=DEVICE, dtype=DTYPE)
        self.num_blocks = num_blocks

    def case(self, batch: int, ctx: int, hq: int, gen: torch.Generator):
        nb = math.ceil(ctx / PAGE)
        tables = torch.randperm(self.num_blocks, generator=gen, device=DEVICE)[: batch * nb].view(batch, nb)
        seq_lens = torch.full((batch,), ctx, dtype=torch.int64, device=DEVICE)
        q = torch.randn(batch, hq, self.k.shape[-1], generator=gen, device=DEVICE, dtype=DTYPE)
        return q, tables, seq_lens


def shape_bytes(batch: int, ctx: int, hq: int, hkv: int, d: int) -> int:
    elem = torch.finfo(DTYPE).bits // 8
    return batch * ctx * hkv * d * 2 * elem + 2 * batch * hq * d * elem


def time_kernel(
    pool: Pool, batch: int, ctx: int, hq: int, gen, config=None, rep_ms: int = 100, l2_bytes: int = 50 << 20
) -> float:
    hkv, d = pool.k.shape[2], pool.k.shape[3]
    # Rotate over several block sets when one set could sit in L2 (only the smallest shapes).
    nsets = min(8, max(1, math.ceil(4 * l2_bytes / shape_bytes(batch, ctx, hq, hkv, d))))
    if nsets * batch * math.ceil(ctx / PAGE) > pool.num_blocks:
        nsets = 1
    cases = [pool.case(batch, ctx, hq, gen) for _ in range(nsets)]
    it = itertools.cycle(cases)

    def run():
        q, tables, seq_lens = next(it)
        paged_decode_attention_triton(q, pool.k, pool.v, tables, seq_lens, ctx, config=config)

    return bench_ms(run, warmup_ms=min(25, rep_ms), rep_ms=rep_ms)


def time_torch_reference(pool: Pool, batch: int, ctx: int, hq: int, gen) -> tuple[float, float]:
    q, tables, seq_lens = pool.case(batch, ctx, hq, gen)
    meta = DecodeMetadata(kv=pool.k, block_tables=tables, seq_lens=seq_lens, slots=seq_lens, max_seq_len=ctx)
    ref = paged_decode_attention(q, pool.k, pool.v, meta)
    out = paged_decode_attention_triton(q, pool.k, pool.v, tables, seq_lens, ctx)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    return bench_ms(lambda: paged_decode_attention(q, pool.k, pool.v, meta)), err


SWEEP_SHAPES = [  # (model, batch, ctx)
    ("llama-3.1-8b", 16, 1024), ("llama-3.1-8b", 64, 1024), ("llama-3.1-8b", 256, 1024),
    ("llama-3.1-8b", 64, 2048), ("llama-3.1-8b", 64, 4096), ("llama-3.1-8b", 256, 4096),
    ("llama-2-7b", 16, 2048), ("llama-2-7b", 64, 1024), ("llama-2-7b", 64, 4096),
    ("llama-3.1-8b", 1, 1024), ("llama-3.1-8b", 1, 4096), ("llama-3.1-8b", 4, 4096), ("llama-3.1-8b", 16, 4096),
]


def sweep_configs(group: int) -> list[DecodeKernelConfig]:
    out = []
    for partition, block_n, warps, stages in itertools.product((256, 512, 1024, 8192), (32, 64), (4, 8), (2, 3, 4)):
        for use_dot in ((True,) if group > 1 else (True, False)):
            if not use_dot and (block_n > 64 or stages > 2):
                continue  # broadcast-and-sum: BLOCK_N x D fp32 products in registers, loads not pipelined
            out.append(DecodeKernelConfig(partition, block_n, warps, stages, use_dot))
    return out


def run_sweep(copy_gbs: float, lines: list[str], max_batch: int = 0) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    lines += ["", "## Sweep (GB/s; top 5 per shape)", ""]
    for model in dict.fromkeys(m for m, _, _ in SWEEP_SHAPES):
        hq, hkv, d = MODELS[model]
        shapes = [(b, c) for m, b, c in SWEEP_SHAPES if m == model and (not max_batch or b <= max_batch)]
        if not shapes:
            continue
        pool = Pool(hkv, d, max(b * math.ceil(c / PAGE) for b, c in shapes) + 1)
        for batch, ctx in shapes:
            nbytes = shape_bytes(batch, ctx, hq, hkv, d)
            results = []
            for cfg in sweep_configs(hq // hkv):
                try:
                    ms = time_kernel(pool, batch, ctx, hq, gen, cfg, rep_ms=40)
                except Exception as exc:  # out of resources etc.: record and go on
                    print(f"  {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                results.append((nbytes / ms / 1e6, cfg))
            results.sort(key=lambda r: -r[0])
            dflt = default_config(batch, hkv, hq // hkv, d, PAGE, ctx)
            dflt_gbs = next((g for g, c in results if c == dflt), float("nan"))
            first = len(lines)
            lines.append(f"- {model} B={batch} ctx={ctx}: default {dflt} → {dflt_gbs:.0f} GB/s")
            for gbs, cfg in results[:5]:
                lines.append(f"  - {gbs:.0f} GB/s ({gbs / copy_gbs:.2f} of copy): {cfg}")
            print("\n".join(lines[first:]), flush=True)
        del pool
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


LAYOUT_SHAPES = [(b, c) for c in (1024, 4096) for b in (64, 128, 256)]


def run_layouts(copy_gbs: float, lines: list[str]) -> None:
    """The pool as it is ([blocks, page, Hkv, D]: a token's heads side by side) against head-major
    pages ([blocks, Hkv, page, D], passed to the same kernel as a permuted view: a page of one head is
    one contiguous run of page x D elements). Same K/V values; outputs must be equal."""
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    lines += ["", "## Page layout: token-major (the pool) against head-major pages (GB/s, of copy)", "",
              "| model | batch | context | token-major µs | head-major µs | token-major of copy | head-major of copy | "
              "head-major / token-major time | outputs equal |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for model, (hq, hkv, d) in MODELS.items():
        blocks = max(b * math.ceil(c / PAGE) for b, c in LAYOUT_SHAPES) + 1
        nhd = Pool(hkv, d, blocks)
        hnd = Pool.__new__(Pool)
        hnd.num_blocks = blocks
        hnd.k = nhd.k.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        hnd.v = nhd.v.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        for batch, ctx in LAYOUT_SHAPES:
            nbytes = shape_bytes(batch, ctx, hq, hkv, d)
            ms = [time_kernel(pool, batch, ctx, hq, gen) for pool in (nhd, hnd)]
            q, tables, seq_lens = nhd.case(batch, ctx, hq, gen)
            a = paged_decode_attention_triton(q, nhd.k, nhd.v, tables, seq_lens, ctx)
            b = paged_decode_attention_triton(q, hnd.k, hnd.v, tables, seq_lens, ctx)
            gbs = [nbytes / t / 1e6 for t in ms]
            lines.append(f"| {model} | {batch} | {ctx} | {ms[0] * 1e3:.1f} | {ms[1] * 1e3:.1f} | "
                         f"{gbs[0] / copy_gbs:.2f} | {gbs[1] / copy_gbs:.2f} | {ms[1] / ms[0]:.2f} | "
                         f"{bool(torch.equal(a, b))} |")
            print(lines[-1], flush=True)
        del nhd, hnd
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="sweep launch configurations on a few shapes first")
    ap.add_argument("--no-table", action="store_true", help="skip the main table")
    ap.add_argument("--sweep-max-batch", type=int, default=0, help="sweep only shapes with batch <= this")
    ap.add_argument("--layouts", action="store_true", help="compare the pool's page layout with head-major pages")
    args = ap.parse_args()

    props = torch.cuda.get_device_properties(0) if DEVICE == "cuda" else None
    name, sms = (props.name, props.multi_processor_count) if props else ("cpu (smoke test)", 0)
    copy_gbs = copy_bandwidth_gbs()
    import triton

    lines = [
        f"# Paged decode attention (Triton) — {name}, {sms} SMs, "
        f"{datetime.date.today().isoformat()}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}; {str(DTYPE).removeprefix('torch.')}, page {PAGE}, "
        f"uniform context per batch, random non-contiguous pages; "
        f"median of triton.testing.do_bench.",
        f"Device-to-device copy (torch copy_, read+write bytes): **{copy_gbs:.0f} GB/s**.",
    ]
    print("\n".join(lines), flush=True)
    if args.sweep:
        run_sweep(copy_gbs, lines, args.sweep_max_batch)
    if args.layouts:
        run_layouts(copy_gbs, lines)

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    if not args.no_table:
        lines += ["", "| model (Hq/Hkv/D) | batch | context | kernel µs | MB read | GB/s | of copy |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        baselines = []
        for model, (hq, hkv, d) in MODELS.items():
            pool = Pool(hkv, d, max(BATCHES) * math.ceil(max(CONTEXTS) / PAGE) + 1)
            for batch, ctx in itertools.product(BATCHES, CONTEXTS):
                ms = time_kernel(pool, batch, ctx, hq, gen)
                nbytes = shape_bytes(batch, ctx, hq, hkv, d)
                gbs = nbytes / ms / 1e6
                lines.append(f"| {model} ({hq}/{hkv}/{d}) | {batch} | {ctx} | {ms * 1e3:.1f} | "
                             f"{nbytes / 1e6:.1f} | {gbs:.0f} | {gbs / copy_gbs:.2f} |")
                print(lines[-1], flush=True)
            for batch, ctx in BASELINE_SHAPES:
                ref_ms, err = time_torch_reference(pool, batch, ctx, hq, gen)
                tri_ms = time_kernel(pool, batch, ctx, hq, gen)
                baselines.append(f"| {model} | {batch} | {ctx} | {ref_ms * 1e3:.0f} | {tri_ms * 1e3:.1f} | "
                                 f"{ref_ms / tri_ms:.1f}x | {err:.1e} |")
            del pool
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        lines += ["", "Torch reference (`paged_decode_attention`: gather + SDPA) as a baseline:", "",
                  "| model | batch | context | torch µs | triton µs | speed-up | rel diff |",
                  "|---|---:|---:|---:|---:|---:|---:|", *baselines]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "attention_bench.md").write_text(text)


if __name__ == "__main__":
    main()
