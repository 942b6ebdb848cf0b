# the short-context sweep's candidates at contexts 1K-4K
NAME=g6; source .gpu_carry/calls/common.sh
timeout 400 $PY docs/gpu_runs/2026-12-01-h200-thirteenth/short_context_sweep.py --long 2>&1 | tee "$W/long_context_sweep.md"
