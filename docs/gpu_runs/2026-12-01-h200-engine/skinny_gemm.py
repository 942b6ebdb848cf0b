"""Experiment: the decode step's matrix products at 64-128 rows with a Triton kernel of our own,
against cuBLAS (F.linear), both timed inside CUDA graphs of 20 back-to-back calls (no launch gaps,
as in the captured step). y = x @ W^T, x [M, K], W [N, K] as nn.Linear stores it, bf16, fp32
accumulation. Best of a small sweep of tile shapes per product; results checked against cuBLAS.

    python3 docs/gpu_runs/2026-12-01-h200-engine/skinny_gemm.py
"""

import itertools
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

SHAPES = {  # name: (K, N)
    "llama-3.1-8b qkv": (4096, 6144), "llama-3.1-8b o": (4096, 4096),
    "llama-3.1-8b gate_up": (4096, 28672), "llama-3.1-8b down": (14336, 4096),
}
REPS = 20


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    m_mask = offs_m[:, None] < M
    n_mask = offs_n[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K here
        x = tl.load(x_ptrs, mask=m_mask, other=0.0)
        w = tl.load(w_ptrs, mask=n_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask & (offs_n[None, :] < N))


def skinny(x, w, y, block_n, block_k, warps, stages):
    m, k = x.shape
    n = w.shape[0]
    block_m = max(16, triton.next_power_of_2(m))
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _skinny_kernel[grid](x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


def graph_us(fn) -> float:
    """µs per call of ``fn`` replayed REPS times back to back from one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn()
    return triton.testing.do_bench(g.replay, rep=200, return_mode="median") * 1e3 / REPS


def main() -> None:
    dev = torch.device("cuda")
    src = torch.randn(1 << 30, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(partial(dst.copy_, src), rep=200, return_mode="median")
    copy_gbs = 2 * src.numel() * 2 / (copy_ms * 1e-3) / 1e9
    print(f"copy {copy_gbs:.0f} GB/s")
    print("| product | M | cuBLAS µs | of copy | Triton µs | of copy | best tile (N, K, warps, stages) | "
          "max rel diff |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
        for m in (64, 128):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            floor_us = (n * k + m * k + m * n) * 2 / copy_gbs / 1e3
            ref = F.linear(x, w)
            cublas = graph_us(lambda x=x, w=w, y=y: torch.mm(x, w.t(), out=y))
            best = None
            for bn, bk, warps, stages in itertools.product((16, 32, 64), (128, 256), (4,), (3, 4, 5)):
                try:
                    us = graph_us(lambda x=x, w=w, y=y, c=(bn, bk, warps, stages): skinny(x, w, y, *c))
                except Exception:  # out of shared memory etc.
                    continue
                if best is None or us < best[0]:
                    best = (us, (bn, bk, warps, stages))
            skinny(x, w, y, *best[1])
            diff = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            print(f"| {name} | {m} | {cublas:.1f} | {floor_us / cublas:.2f} | {best[0]:.1f} | "
                  f"{floor_us / best[0]:.2f} | {best[1]} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
