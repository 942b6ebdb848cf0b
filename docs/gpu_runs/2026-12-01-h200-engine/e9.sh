# the small matrix products: a Triton kernel of our own against cuBLAS, inside CUDA graphs
NAME=e9; source .gpu_carry/calls/common.sh
timeout 400 $PY docs/gpu_runs/2026-12-01-h200-engine/skinny_gemm.py 2>&1 | grep -v Warning | tee "$W/skinny_gemm.md"
