# what padding rows cost at the served knee: the step at 544 / 576 / 640 rows, short context (padding rows hold 1 token)
NAME=g10; source .gpu_carry/calls/common.sh
timeout 200 $PY -m adrenaline_py.cli bench engine --shapes llama-2-7b --batches 544 576 640 --contexts 16 \
  --no-attention --out $W/engine_padding 2>&1 | tail -n 12 | tee "$W/engine_padding.txt"
