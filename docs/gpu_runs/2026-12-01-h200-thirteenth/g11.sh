# served smoke test on one H200 (all roles under MPS): the new buckets at --max-decode-batch 768, offload auto
NAME=g11; source .gpu_carry/calls/common.sh
SA1="--device cuda --model dummy:llama-2-7b --prefill-gpu 0 --decode-gpu 0 --max-model-len 2048 \
  --max-tokens-limit 1024 --max-decode-batch 768 --admission-timeout 120"
BA1="--dataset sharegpt-lengths --max-input-len 1024 --max-output-len 256 --duration 20 --tpot-slo 100 --ttft-slo 3000 \
  --request-timeout 120"
CONFIGS="auto:--offload auto@8" PY=$PY OUT=$W SERVE_ARGS="$SA1" BENCH_ARGS="$BA1" timeout 400 bash tools/serve_bench.sh 2>&1 \
  | tail -n 40 | tee "$W/serve_bench.txt"
grep -h "CUDA graphs captured\|KV pools\|error\|Error" $W/serve_auto.log | head -n 12 | tee "$W/serve_log_lines.txt"
