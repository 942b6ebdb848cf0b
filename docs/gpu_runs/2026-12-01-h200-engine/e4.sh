# 32-token tiles at two to four programs per SM: the kernel tests, then the step again
NAME=e4; source .gpu_carry/calls/common.sh
timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_triton_attention.py 2>&1 | tail -n 5 | tee "$W/attention_tests.txt"
timeout 300 $PY -m adrenaline_py.cli bench engine --shapes llama-3.1-8b llama-2-7b --batches 64 128 256 \
  --contexts 1024 4096 --no-attention --profile 64 1024 --out $W/engine 2>&1 | tail -n 50 | tee "$W/engine.txt"
