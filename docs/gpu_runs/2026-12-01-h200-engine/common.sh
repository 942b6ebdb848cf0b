# sourced by the call scripts: results in $W, packed into $OUT/<name>.tgz on exit
set -u
export NCCL_NVLS_ENABLE=0
W=/tmp/w/$NAME
mkdir -p "$W"
pack() { tar czf "$OUT/$NAME.tgz" -C /tmp/w "$NAME" 2>/dev/null; cp "$W"/*.txt "$OUT/" 2>/dev/null; true; }
trap pack EXIT
PY=/tmp/adrenaline-venv/bin/python
if [ ! -x "$PY" ]; then
    STEPS=setup LOG_DIR=$W/setup bash tools/gpu_bringup.sh | tail -n 5
fi
nvidia-smi --query-gpu=index,name,memory.used --format=csv | tee "$W/gpus.txt"
git log --oneline -1 2>/dev/null | tee "$W/commit.txt"
SA="--device cuda --model dummy:llama-2-7b --prefill-gpu 0 --decode-gpu 1 --max-model-len 2048 \
  --max-tokens-limit 1024 --max-decode-batch 768 --admission-timeout 300 --max-queued-requests 4000"
BA="--dataset sharegpt-lengths --max-input-len 1024 --max-output-len 1024 --duration 120 --tpot-slo 50 \
  --ttft-slo 3000 --request-timeout 300"
