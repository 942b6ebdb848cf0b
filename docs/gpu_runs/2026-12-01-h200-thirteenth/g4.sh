# the dense (short-context) step's profile at the served knee's rows; GPU tests on main (system python: numpy 2)
NAME=g4; source .gpu_carry/calls/common.sh
timeout 200 $PY -m adrenaline_py.cli bench engine --shapes llama-2-7b --batches 544 --contexts 16 128 \
  --no-attention --profile 544 16 --out $W/engine_dense 2>&1 | tail -n 40 | tee "$W/engine_dense.txt"
timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py tests/test_triton_attention.py \
  tests/test_triton_prefill.py tests/test_sampler_kernels.py -k "not smollm2" 2>&1 | tail -n 12 | tee "$W/gpu_tests.txt"
