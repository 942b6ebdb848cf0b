# programmatic dependent launch of the step's Triton kernels: bench engine with it on and off; GPU tests
NAME=g2; source .gpu_carry/calls/common.sh
timeout 250 $PY -m adrenaline_py.cli bench engine --shapes llama-3.1-8b llama-2-7b --batches 64 128 256 \
  --contexts 1024 4096 --no-attention --profile 64 1024 --out $W/engine_pdl 2>&1 | tail -n 60 | tee "$W/engine_pdl.txt"
ADRENALINE_PDL=0 timeout 150 $PY -m adrenaline_py.cli bench engine --shapes llama-3.1-8b --batches 64 128 \
  --contexts 1024 4096 --no-attention --out $W/engine_nopdl 2>&1 | tail -n 30 | tee "$W/engine_nopdl.txt"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_triton_attention.py \
  tests/test_gpu_engine.py -k "not local_engine and not smollm2 and not two_gpus and not ipc and not placement" 2>&1 \
  | tail -n 8 | tee "$W/gpu_tests.txt"
