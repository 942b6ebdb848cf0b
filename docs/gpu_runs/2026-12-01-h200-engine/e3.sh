# launch-configuration sweep of the decode kernel on the H200 at batch <= 64 (8b at 64 rows: 0.69 of copy)
NAME=e3; source .gpu_carry/calls/common.sh
timeout 500 $PY tools/bench_attention.py --sweep --sweep-max-batch 64 --no-table 2>&1 | grep -v "^  DecodeKernelConfig" | tail -n 120 > "$W/sweep.txt"; tail -n 100 "$W/sweep.txt"
