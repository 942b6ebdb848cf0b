"""Benchmark the sampler's CUDA path (radix-search threshold + one-pass Gumbel-max) against the
sort-based threshold + the same draw, and against greedy argmax, on bf16 logits.

For each vocabulary, batch and logit spread: median CUDA-event times (after warm-up) of greedy
argmax, the sort path, the radix path with top-p (its threshold and draw also alone) and with
top-k + top-p, and the share of rows where both paths draw the same token. Temperature 0.8, top-p
0.95, top-k 50, as `adrenaline bench engine`'s sampled step.

    python3 tools/bench_sampler.py                       # vocabularies 128256 and 32000, 64-256 rows
    python3 tools/bench_sampler.py --sweep               # also the radix kernels' CHUNK / BLOCK
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adrenaline_py import sampler  # noqa: E402
from adrenaline_py import sampler_kernels as sk  # noqa: E402


def timed(fn, n: int = 20) -> float:
    """Median milliseconds of ``fn`` by CUDA events, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[n // 2]


def batch(rows: int, vocab: int, spread: float, dev: torch.device):
    logits = (torch.randn(rows, vocab, device=dev) * spread).to(torch.bfloat16)
    temps = torch.full((rows,), 0.8, device=dev)
    top_p = torch.full((rows,), 0.95, device=dev)
    keys = sampler._row_keys(list(range(rows)), [1] * rows).to(dev)
    return logits, temps, top_p, keys


def table_row(vocab: int, rows: int, spread: float, dev: torch.device) -> str:
    logits, temps, top_p, keys = batch(rows, vocab, spread, dev)
    no_k = torch.full((rows,), vocab, device=dev, dtype=torch.int64)
    k50 = torch.full((rows,), 50, device=dev, dtype=torch.int64)

    def sort_path():
        s = logits.float() / temps[:, None]
        return sk.gumbel_argmax(s, keys, sampler.sort_threshold(s, no_k, top_p))

    def radix(k=None):
        return sk.gumbel_argmax(logits, keys, sk.cut_threshold(logits, temps, None, k, top_p), temps)

    threshold = sk.cut_threshold(logits, temps, None, None, top_p)
    same = (sort_path() == radix()).float().mean().item()
    t_sort, t_radix = timed(sort_path), timed(radix)
    t_cut = timed(lambda: sk.cut_threshold(logits, temps, None, None, top_p))
    t_draw = timed(lambda: sk.gumbel_argmax(logits, keys, threshold, temps))
    return (f"| {vocab} | {rows} | {spread:g} | {timed(lambda: logits.argmax(-1)):.3f} | {t_sort:.3f} | "
            f"{t_radix:.3f} | ({t_cut:.3f}, {t_draw:.3f}) | {timed(lambda: radix(k50)):.3f} | "
            f"{t_radix / t_sort:.2f} | {same:.3f} |")


def sweep(dev: torch.device) -> None:
    logits, temps, top_p, keys = batch(256, 128_256, 3.0, dev)

    def radix():
        return sk.gumbel_argmax(logits, keys, sk.cut_threshold(logits, temps, None, None, top_p), temps)
    for chunk, block in itertools.product((2048, 4096, 8192), (64, 128, 256)):
        sk.CHUNK, sk.BLOCK = chunk, block
        print(f"sweep, 256 rows x 128256: CHUNK {chunk} BLOCK {block}: {timed(radix):.3f} ms", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[128_256, 32_000])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--spreads", type=float, nargs="+", default=[3.0, 8.0], help="logits ~ N(0, spread²)")
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_sampler: needs a CUDA GPU")
        return 2
    dev = torch.device("cuda")
    print(f"# sampler on {torch.cuda.get_device_name(dev)}: bf16 logits, temperature 0.8, top-p 0.95 (top-k 50); "
          f"radix kernels CHUNK {sk.CHUNK} BLOCK {sk.BLOCK}; medians, ms")
    print("| vocab | rows | spread | greedy | sort path | radix top-p | (threshold, draw) | radix top-k + top-p "
          "| radix / sort | same tokens |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for vocab, rows, spread in itertools.product(a.vocabs, a.rows, a.spreads):
        print(table_row(vocab, rows, spread, dev), flush=True)
    if a.sweep:
        sweep(dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
