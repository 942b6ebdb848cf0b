# issue 9: auto with the prompt-load rule at 60 and 63 req/s, 120 s of arrivals, ends sent first (since the tenth run)
NAME=a3; source .gpu_carry/calls/common.sh
CONFIGS="load4700:--offload auto --prompt-tokens-per-s 4700@60 63" PY=$PY OUT=$W SERVE_ARGS="$SA" \
  BENCH_ARGS="$BA" timeout 560 bash tools/serve_bench.sh 2>&1 | tail -n 60 | tee "$W/serve_bench.txt"
