# issue 9: the PD baseline again with this session's decode kernel and buckets: never at 48 and 50 req/s, 120 s of arrivals
NAME=b1; source .gpu_carry/calls/common.sh
CONFIGS="never:--offload never@48 50" PY=$PY OUT=$W SERVE_ARGS="$SA" \
  BENCH_ARGS="$BA" timeout 560 bash tools/serve_bench.sh 2>&1 | tail -n 60 | tee "$W/serve_bench.txt"
