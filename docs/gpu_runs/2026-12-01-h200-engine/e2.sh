# the page layout of the KV pool: token-major (now) against head-major pages, same kernel
NAME=e2; source .gpu_carry/calls/common.sh
timeout 400 $PY tools/bench_attention.py --layouts --no-table 2>&1 | tail -n 40 | tee "$W/layouts.txt"
