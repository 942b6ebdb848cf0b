#!/usr/bin/env bash
# One served-workload point per configuration: start `adrenaline serve` with the configuration's
# flags, wait until it is ready, run `adrenaline bench serve` against it, stop it, next.
#
#   CONFIGS="never:--offload never;auto:--offload auto" \
#   SERVE_ARGS="--device cuda --model dummy:llama-2-7b --prefill-gpu 0 --decode-gpu 1" \
#   BENCH_ARGS="--dataset fixed --input-len 512 --output-len 512 --concurrency 400 --duration 90" \
#   bash tools/serve_bench.sh
#
# A configuration may end with "@RATES" ("auto:--offload auto@55 65 75"): its own --request-rates,
# after BENCH_ARGS (so one server start covers the rates that matter for that configuration).
#
# Environment: CONFIGS ("label:flags;label:flags"), SERVE_ARGS (flags of every server), BENCH_ARGS
# (flags of every `bench serve`; --model is taken from SERVE_ARGS), PY [python3], OUT [/tmp/serve-bench]
# (bench JSONs under $OUT/bench, server logs $OUT/serve_<label>.log), READY_TIMEOUT_S [300], BENCH_PY
# [$PY] (the Python of `bench serve`, which needs aiohttp and tqdm). PYSPY (a py-spy binary, or "auto": the
# one next to $PY, which `make venv` and the GPU bundle install): record the
# decode process's Python stacks while each run goes on, PYSPY_AFTER_S [20] s after it starts, for
# PYSPY_S [8] s: once only the thread holding the GIL ($OUT/pyspy_<label>_gil.txt), once every
# thread that is running ($OUT/pyspy_<label>_cpu.txt); collapsed stacks, one count per line
# (summarize them with tools/pyspy_summary.py).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PY:-python3}
BENCH_PY=${BENCH_PY:-$PY}
OUT=${OUT:-/tmp/serve-bench}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-300}
PORT=${PORT:-18000}
mkdir -p "$OUT/bench"
MODEL=$(sed -n 's/.*--model \([^ ]*\).*/\1/p' <<<"$SERVE_ARGS")
if [ "${PYSPY:-}" = auto ]; then
    PYSPY="$(dirname "$(command -v "$PY")")/py-spy"
    [ -x "$PYSPY" ] || { echo "[serve-bench] PYSPY=auto: no py-spy next to $PY"; PYSPY=; }
fi
rc_all=0
IFS=';' read -r -a configs <<<"$CONFIGS"
for config in "${configs[@]}"; do
    label=${config%%:*}
    flags=${config#*:}
    bench_args=$BENCH_ARGS
    if [[ $flags == *@* ]]; then
        bench_args="$BENCH_ARGS --request-rates ${flags##*@}"
        flags=${flags%@*}
    fi
    log="$OUT/serve_$label.log"
    echo "[serve-bench] $label: adrenaline serve $SERVE_ARGS $flags"
    # shellcheck disable=SC2086
    $PY -m adrenaline_py.cli serve $SERVE_ARGS $flags --http-port "$PORT" --grpc-port $((PORT + 1)) \
        --metrics-port $((PORT + 2)) >"$log" 2>&1 &
    pid=$!
    t0=$(date +%s)
    until curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null || [ $(($(date +%s) - t0)) -gt "$READY_TIMEOUT_S" ]; then
            echo "[serve-bench] $label: the server did not become ready; last log lines:"
            tail -n 30 "$log"
            kill -TERM "$pid" 2>/dev/null
            wait "$pid"
            rc_all=1
            continue 2
        fi
        sleep 2
    done
    echo "[serve-bench] $label: ready after $(($(date +%s) - t0)) s"
    grep -E "SM shares|offload bound|KV pools|profile" "$log" | head -n 8
    # shellcheck disable=SC2086
    $BENCH_PY -m adrenaline_py.cli bench serve --url "http://127.0.0.1:$PORT" \
        --metrics-url "http://127.0.0.1:$((PORT + 2))/metrics" --model "$MODEL" --label "$label" \
        --result-dir "$OUT/bench" --no-progress $bench_args &
    bench=$!
    if [ -n "${PYSPY:-}" ]; then
        sleep "${PYSPY_AFTER_S:-20}"
        stub=$(pgrep -f "triton_python_backend_stub .* ensemble_0_0 " | head -n 1)
        if [ -n "$stub" ]; then
            "$PYSPY" record --pid "$stub" --duration "${PYSPY_S:-8}" --rate 250 --format raw --threads --gil \
                --nonblocking -o "$OUT/pyspy_${label}_gil.txt" >/dev/null 2>&1 || echo "[serve-bench] py-spy failed"
            "$PYSPY" record --pid "$stub" --duration "${PYSPY_S:-8}" --rate 250 --format raw --threads \
                --nonblocking -o "$OUT/pyspy_${label}_cpu.txt" >/dev/null 2>&1 || echo "[serve-bench] py-spy failed"
        else
            echo "[serve-bench] no decode stub process found for py-spy"
        fi
    fi
    wait "$bench" || rc_all=1
    kill -TERM "$pid"
    wait "$pid"
done
exit $rc_all
