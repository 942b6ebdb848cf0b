# 32-token tiles at 2 warps from four programs per SM: kernel tests, the step (issue 12's table, the served sizes), GPU tests
NAME=g8; source .gpu_carry/calls/common.sh
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_triton_attention.py tests/test_decode_kernel_config.py 2>&1 | tail -n 4 | tee "$W/attention_tests.txt"
timeout 220 $PY -m adrenaline_py.cli bench engine --shapes llama-3.1-8b llama-2-7b --batches 64 128 256 \
  --contexts 1024 4096 --no-attention --profile 128 1024 --out $W/engine 2>&1 | tail -n 50 | tee "$W/engine.txt"
timeout 150 $PY -m adrenaline_py.cli bench engine --shapes llama-2-7b --batches 272 544 --contexts 16 128 384 \
  --no-attention --profile 544 16 --out $W/engine_served_sizes 2>&1 | tail -n 30 | tee "$W/engine_served_sizes.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py -k "not smollm2" 2>&1 | tail -n 4 | tee "$W/gpu_tests.txt"
