"""Experiment: which cuBLASLt algorithm serves the decode step's matrix products best, L2-cold.

For each product of the llama-3.1-8b and llama-2-7b layers at 64 / 128 / 256 rows: 32 distinct
weight matrices (one per layer, so nothing is reused from L2, as in the step) multiplied back to back
inside one CUDA graph. Microseconds per product for torch.mm (cuBLAS's own choice), torch.mm with
cuBLASLt preferred, and each of the first LIMIT algorithms cuBLASLt's heuristic offers (through
nvmath-python), the best one reported with its tile / split-K. Every algorithm's result is checked
against torch.mm before it is timed.

    PYTHONPATH=<nvmath-python and cuda-bindings> python3 gemm_algos.py
"""

import sys

import torch
import triton.testing

SHAPES = {  # name: (K, N) of y[M, N] = x[M, K] @ W[N, K]^T
    "llama-3.1-8b qkv": (4096, 6144), "llama-3.1-8b o": (4096, 4096),
    "llama-3.1-8b gate_up": (4096, 28672), "llama-3.1-8b down": (14336, 4096),
    "llama-2-7b qkv": (4096, 12288), "llama-2-7b gate_up": (4096, 22016), "llama-2-7b down": (11008, 4096),
}
ROWS = (64, 128, 256)
LAYERS = 32
LIMIT = 24


def graph_us(calls) -> float:
    """µs per product: ``calls`` (LAYERS products) replayed from one CUDA graph, median."""
    calls()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        calls()
    return triton.testing.do_bench(g.replay, rep=60, return_mode="median") * 1e3 / LAYERS


def copy_bandwidth_gbs(dev: torch.device) -> float:
    src = torch.randn(1 << 30, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=200, return_mode="median")
    return 2 * src.numel() * 2 / (copy_ms * 1e-3) / 1e9


def describe(a) -> str:
    return (f"id {a.algorithm_id} tile {a.tile} split_k {a.split_k} stages {a.stages} "
            f"cluster {a.cluster_shape} swizzle {a.cta_swizzling} reduction {a.reduction_scheme}")


def main() -> None:
    dev = torch.device("cuda")
    copy_gbs = copy_bandwidth_gbs(dev)
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; copy {copy_gbs:.0f} GB/s", flush=True)
    try:
        import nvmath
        from nvmath.linalg.advanced import Matmul
        print(f"nvmath-python {nvmath.__version__}", flush=True)
    except Exception as e:  # report and go on with the cuBLAS columns
        print(f"nvmath-python unavailable: {e!r}", flush=True)
        Matmul = None
    print("| product | M | floor µs | cuBLAS µs | of copy | cuBLASLt-preferred µs | best of heuristic µs | of copy "
          "| heuristic #0 µs | algorithms tried | best algorithm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, (k, n) in SHAPES.items():
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k**-0.5 for _ in range(LAYERS)]
        for m in ROWS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ys = [torch.empty(m, n, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
            ref = torch.mm(x, ws[0].t()).float()
            floor_us = (n * k + m * k + m * n) * 2 / copy_gbs / 1e3

            def torch_calls(x=x, ws=ws, ys=ys):
                for w, y in zip(ws, ys):
                    torch.mm(x, w.t(), out=y)
            torch.backends.cuda.preferred_blas_library("cublas")
            t_default = graph_us(torch_calls)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            t_lt = graph_us(torch_calls)
            torch.backends.cuda.preferred_blas_library("cublas")
            best, first, tried = None, None, 0
            if Matmul is not None:
                try:
                    mms = [Matmul(x, w.t(), c=y, beta=0.0, options={"inplace": True}) for w, y in zip(ws, ys)]
                    algos = mms[0].plan(preferences={"limit": LIMIT})
                    for mm in mms[1:]:
                        mm.plan(preferences={"limit": LIMIT})
                    for j in range(len(algos)):
                        try:
                            if any(len(mm.algorithms) <= j for mm in mms):
                                break
                            ys[0].zero_()
                            for mm in mms:
                                mm.execute(algorithm=mm.algorithms[j])
                            torch.cuda.synchronize()
                            err = ((ys[0].float() - ref).abs().max() / ref.abs().max()).item()
                            if err > 2e-2:
                                print(f"  {name} M={m} algorithm {j}: wrong result ({err:.1e}), skipped", flush=True)
                                continue

                            def nv_calls(j=j, mms=mms):
                                for mm in mms:
                                    mm.execute(algorithm=mm.algorithms[j])
                            us = graph_us(nv_calls)
                            tried += 1
                            if j == 0:
                                first = us
                            if best is None or us < best[0]:
                                best = (us, describe(algos[j]))
                        except Exception as e:
                            print(f"  {name} M={m} algorithm {j}: {e!r}"[:300], flush=True)
                    for mm in mms:
                        mm.free()
                except Exception as e:
                    print(f"  {name} M={m}: nvmath failed: {e!r}"[:300], flush=True)
            b_us = f"{best[0]:.1f}" if best else "—"
            b_of = f"{floor_us / best[0]:.2f}" if best else "—"
            f_us = f"{first:.1f}" if first else "—"
            print(f"| {name} | {m} | {floor_us:.1f} | {t_default:.1f} | {floor_us / t_default:.2f} | {t_lt:.1f} | "
                  f"{b_us} | {b_of} | {f_us} | {tried} | {best[1] if best else '—'} |", flush=True)
        del ws
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
