# the step's matrix products at small batch: weight as stored against a transposed copy
NAME=e5; source .gpu_carry/calls/common.sh
timeout 200 $PY docs/gpu_runs/2026-12-01-h200-engine/linear_layouts.py 2>&1 | tee "$W/linear_layouts.md"
