# GPU tests after the review's mends (--offload never: local buckets only; page > 32 keeps 4 warps)
NAME=g12; source .gpu_carry/calls/common.sh
timeout 250 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py tests/test_triton_attention.py \
  tests/test_decode_kernel_config.py -k "not smollm2" 2>&1 | tail -n 6 | tee "$W/gpu_tests.txt"
