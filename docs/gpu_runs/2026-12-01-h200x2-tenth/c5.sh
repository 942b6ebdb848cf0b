# ratio:0.4 and ratio:0.8 with the prompt-load shares at 60 req/s, 120 s
NAME=c5; source .gpu_carry/calls/common.sh
CONFIGS="ratio04:--offload ratio:0.4 --prompt-tokens-per-s 4700@60;ratio08:--offload ratio:0.8 --prompt-tokens-per-s 4700@60" PY=$PY OUT=$W SERVE_ARGS="$SA" \
  BENCH_ARGS="$BA" timeout 380 bash tools/serve_bench.sh 2>&1 | tee "$W/serve_bench.txt"
