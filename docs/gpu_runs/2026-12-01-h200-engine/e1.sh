# issue 12 on one H200: the step overlapped as the decode loop runs it, next to the rooflines; kernels of one step
NAME=e1; source .gpu_carry/calls/common.sh
timeout 420 $PY -m adrenaline_py.cli bench engine --shapes llama-3.1-8b llama-2-7b --batches 64 128 256 \
  --contexts 1024 4096 --no-attention --profile 64 1024 --out $W/engine 2>&1 | tail -n 80 | tee "$W/engine.txt"
