# the served step's sizes on one GPU, all local: llama-2-7b at 272 and 544 rows, context 16 (dense work) and 384; kernels at 544 x 384
NAME=e8; source .gpu_carry/calls/common.sh
timeout 400 $PY -m adrenaline_py.cli bench engine --shapes llama-2-7b --batches 272 544 --contexts 16 384 \
  --no-attention --profile 544 384 --out $W/engine 2>&1 | grep -v Warning | tail -n 40 | tee "$W/engine.txt"
