# never at 48 req/s (the baseline's knee) and ratio:0.6 with the prompt-load shares at 60 req/s, 120 s
NAME=c4; source .gpu_carry/calls/common.sh
CONFIGS="never:--offload never@48;ratio06:--offload ratio:0.6 --prompt-tokens-per-s 4700@60" PY=$PY OUT=$W SERVE_ARGS="$SA" \
  BENCH_ARGS="$BA" timeout 520 bash tools/serve_bench.sh 2>&1 | tee "$W/serve_bench.txt"
