# start-up with a bucket every 32 rows from 128 to 768 against the earlier buckets (one GPU, in-process engine)
NAME=g9; source .gpu_carry/calls/common.sh
for v in coarse fine; do
  timeout 200 $PY docs/gpu_runs/2026-12-01-h200-thirteenth/graph_capture.py $v 2>&1 | grep -v "^torch\|Warning\|warn(" | tail -n 12 | tee "$W/graph_capture_$v.txt"
done
