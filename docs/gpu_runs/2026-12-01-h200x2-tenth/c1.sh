# auto with the prompt-load rule at 65 and 70 req/s, 120 s of arrivals each
NAME=c1; source .gpu_carry/calls/common.sh
CONFIGS="load5500:--offload auto --prompt-tokens-per-s 5500@65 70" PY=$PY OUT=$W SERVE_ARGS="$SA" \
  BENCH_ARGS="$BA" timeout 500 bash tools/serve_bench.sh 2>&1 | tee "$W/serve_bench.txt"
