# decode kernel launch configurations at large batch, short context (graph-sized grid)
NAME=g5; source .gpu_carry/calls/common.sh
timeout 500 $PY docs/gpu_runs/2026-12-01-h200-thirteenth/short_context_sweep.py 2>&1 | tee "$W/short_context_sweep.md"
