# the served-like offloaded step at 544 rows with its kernels, and steps overlapped as the loop runs them
NAME=a1; source .gpu_carry/calls/common.sh
timeout 400 $PY -m adrenaline_py.cli bench offload --shapes llama-2-7b --batches 256 544 --contexts 384 \
  --modes never half always --executor-sm-share 80 --profile 544 384 half --out $W/offload 2>&1 | tail -n 80 | tee "$W/offload.txt"
