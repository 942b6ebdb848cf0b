"""Experiment: the decode kernel's launch configuration at large batch and short context.

At the served knee's sizes (llama-2-7b, ~540 rows) a step whose rows have 16 tokens of context
spends 5.5 ms in the decode kernel for 4.6 GB of K/V (1.1 ms at copy bandwidth): 17,408 programs
per layer, each too short to hide its chain of dependent loads. The graph sizes the kernel's grid
for the longest context the server allows, so one configuration serves every context. This sweeps
tile size, warps, pipeline stages and tensor-core dots against broadcast-and-sum, with the kernel
launched as a captured step launches it (max_seq_len = 2048), at contexts 16-1024; GB/s of the
K/V each shape must read, and the ratio to the default configuration's time.

    python3 docs/gpu_runs/2026-12-01-h200-thirteenth/short_context_sweep.py
"""

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from bench_attention import PAGE, Pool, copy_bandwidth_gbs, shape_bytes  # noqa: E402

from adrenaline_py.attention.triton_decode import (  # noqa: E402
    DecodeKernelConfig,
    default_config,
    paged_decode_attention_triton,
)

MAX_SEQ = 2048
SHAPES = {"llama-2-7b": (32, 32, 128, (544, 272)), "llama-3.1-8b": (32, 8, 128, (544,))}
CONTEXTS = (16, 64, 128, 384, 1024)
# --long: the candidates of the first sweep at long contexts and the batches of issue 12's table
LONG_SHAPES = {"llama-2-7b": (32, 32, 128, (64, 128, 272)), "llama-3.1-8b": (32, 8, 128, (128, 256, 544))}
LONG_CONTEXTS = (1024, 2048, 4096)
LONG_CONFIGS = ((64, 4, 3), (32, 4, 3), (32, 2, 3), (16, 2, 3), (16, 4, 3))
# --band: two to four programs per SM (32-token tiles, 4 warps since the twelfth session) with 2 warps
BAND_SHAPES = {"llama-2-7b": (32, 32, 128, (12, 16)), "llama-3.1-8b": (32, 8, 128, (40, 64))}
BAND_CONTEXTS = (128, 1024, 2048, 4096)


def configs(group: int, long: bool = False) -> list[DecodeKernelConfig]:
    if long:  # also --band
        return [DecodeKernelConfig(MAX_SEQ, n, w, st, True) for n, w, st in LONG_CONFIGS]
    out = []
    for block_n, warps, stages in itertools.product((16, 32, 64), (2, 4, 8), (1, 2, 3)):
        out.append(DecodeKernelConfig(MAX_SEQ, block_n, warps, stages, True))
        if group == 1 and block_n <= 32 and stages <= 2:
            out.append(DecodeKernelConfig(MAX_SEQ, block_n, warps, stages, False))
    return out


def time_ms(pool: Pool, cases: list, cfg: DecodeKernelConfig) -> float:
    """Median ms of the kernel over rotating cases (block sets): a small shape's K/V stays out of L2."""
    import triton.testing

    it = itertools.cycle(cases)

    def run() -> None:
        q, tables, seq_lens = next(it)
        paged_decode_attention_triton(q, pool.k, pool.v, tables, seq_lens, MAX_SEQ, config=cfg)

    return triton.testing.do_bench(run, warmup=10, rep=30, return_mode="median")


def main() -> None:
    global MAX_SEQ
    ap = argparse.ArgumentParser()
    ap.add_argument("--long", action="store_true", help="the first sweep's candidates at contexts 1K-4K")
    ap.add_argument("--band", action="store_true", help="the candidates at two to four programs per SM")
    args = ap.parse_args()
    shapes, contexts = (LONG_SHAPES, LONG_CONTEXTS) if args.long else (SHAPES, CONTEXTS)
    if args.band:
        shapes, contexts, args.long = BAND_SHAPES, BAND_CONTEXTS, True
    if args.long:
        MAX_SEQ = max(contexts)

    copy_gbs = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}; copy {copy_gbs:.0f} GB/s; kernel launched with max_seq_len {MAX_SEQ}")
    gen = torch.Generator(device="cuda").manual_seed(3)
    for model, (hq, hkv, d, batches) in shapes.items():
        pool = Pool(hkv, d, max(batches) * math.ceil(max(contexts) / PAGE) + 1)
        group = hq // hkv
        cands = configs(group, args.long)
        table: dict[DecodeKernelConfig, dict[tuple[int, int], float]] = {c: {} for c in cands}
        for batch in batches:
            dflt = default_config(batch, hkv, group, d, PAGE, MAX_SEQ)
            if dflt not in table:
                table[dflt] = {}
            for ctx in contexts:
                cases = [pool.case(batch, ctx, hq, gen) for _ in range(4)]
                for cfg in table:
                    try:
                        ms = time_ms(pool, cases, cfg)
                    except Exception as exc:  # out of resources
                        print(f"  {cfg}: {type(exc).__name__}", flush=True)
                        continue
                    table[cfg][batch, ctx] = ms
            keys = [(batch, c) for c in contexts]
            print(f"\n## {model}, batch {batch}: µs per layer (GB/s of copy) — default {dflt}\n")
            print("| config | " + " | ".join(f"ctx {c}" for c in contexts) + " | max time / default |")
            print("|---|" + "---:|" * (len(contexts) + 1))
            rows = []
            for cfg, times in table.items():
                if not all(k in times for k in keys) or not all(k in table[dflt] for k in keys):
                    continue
                worst = max(times[k] / table[dflt][k] for k in keys)
                cells = []
                for k in keys:
                    gbs = shape_bytes(batch, k[1], hq, hkv, d) / times[k] / 1e6
                    cells.append(f"{times[k] * 1e3:.0f} ({gbs / copy_gbs:.2f})")
                name = f"n{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages} {'dot' if cfg.use_dot else 'sum'}"
                rows.append((sum(times[k] for k in keys), f"| {name}{' (default)' if cfg == dflt else ''} | "
                             + " | ".join(cells) + f" | {worst:.2f} |"))
            for _, line in sorted(rows)[:12]:
                print(line)
            print(next(line for _, line in rows if "(default)" in line), flush=True)
        pool = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
