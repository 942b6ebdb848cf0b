# never at 45 req/s and auto with the prompt-load rule at 60 req/s, 120 s of arrivals, this code
NAME=c2; source .gpu_carry/calls/common.sh
CONFIGS="never:--offload never@45;load4700:--offload auto --prompt-tokens-per-s 4700@60" PY=$PY OUT=$W SERVE_ARGS="$SA" \
  BENCH_ARGS="$BA" timeout 530 bash tools/serve_bench.sh 2>&1 | tee "$W/serve_bench.txt"
