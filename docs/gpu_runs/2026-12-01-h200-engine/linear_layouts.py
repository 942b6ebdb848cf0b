"""The decode step's matrix products at small batch: weight [N, K] (as nn.Linear stores it, x @ W^T)
against a transposed copy [K, N] (x @ W), per llama-3.1-8b / llama-2-7b projection, next to the
bytes / copy-bandwidth floor. Same values; results compared. Run on a GPU:

    python3 docs/gpu_runs/2026-12-01-h200-engine/linear_layouts.py
"""

from functools import partial

import torch
import torch.nn.functional as F
import triton.testing

SHAPES = {  # name: (K, N) of x [M, K] @ W^T [K, N]
    "llama-3.1-8b qkv": (4096, 6144), "llama-3.1-8b o": (4096, 4096),
    "llama-3.1-8b gate_up": (4096, 28672), "llama-3.1-8b down": (14336, 4096),
    "llama-2-7b qkv": (4096, 12288), "llama-2-7b gate_up": (4096, 22016), "llama-2-7b down": (11008, 4096),
}


def us(fn) -> float:
    return triton.testing.do_bench(fn, rep=100, return_mode="median") * 1e3


def main() -> None:
    dev = torch.device("cuda")
    src = torch.randn(1 << 30, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 2 / us(partial(dst.copy_, src)) / 1e3
    print(f"copy {copy_gbs:.0f} GB/s")
    print("| product | M | W [N,K] µs | of floor | W^T [K,N] µs | of floor | equal |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
        wt = w.t().contiguous()
        for m in (64, 128, 256, 512):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            floor_us = (n * k + m * k + m * n) * 2 / copy_gbs / 1e3
            a = us(lambda x=x, w=w: F.linear(x, w))
            b = us(lambda x=x, wt=wt: torch.matmul(x, wt))
            same = torch.allclose(F.linear(x, w).float(), torch.matmul(x, wt).float(), rtol=2e-2, atol=2e-2)
            print(f"| {name} | {m} | {a:.1f} | {floor_us / a:.2f} | {b:.1f} | {floor_us / b:.2f} | {same} |",
                  flush=True)


if __name__ == "__main__":
    main()
