# the candidates at two to four programs per SM
NAME=g7; source .gpu_carry/calls/common.sh
timeout 300 $PY docs/gpu_runs/2026-12-01-h200-thirteenth/short_context_sweep.py --band 2>&1 | tee "$W/band_sweep.md"
