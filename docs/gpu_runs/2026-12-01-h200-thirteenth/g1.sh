# nvmath-python cuBLASLt algorithm sweep of the decode step's products (no bundle needed)
set -u
mkdir -p /tmp/nvm_site
python3 -m pip install -q --no-index --no-deps --target /tmp/nvm_site .gpu_carry/nvm/*.whl 2>&1 | tail -3
python3 -c "import triton; print('triton', triton.__version__); import triton.language.extra.cuda as c; print('gdc', hasattr(c, 'gdc_wait'))" 2>&1 | tee $OUT/pdl.txt
nvidia-smi --query-gpu=name,driver_version --format=csv | tee -a $OUT/pdl.txt
PYTHONPATH=/tmp/nvm_site timeout 520 python3 docs/gpu_runs/2026-12-01-h200-thirteenth/gemm_algos.py 2>&1 | tee $OUT/gemm_algos.md
