#!/usr/bin/env bash
# Bring Adrenaline up on the GPU machine from the offline bundle (.bundle/, built here by
# `python tools/gpu_bundle.py build` and carried with the working tree), then exercise it.
#
#   bash tools/gpu_bringup.sh                          # all steps
#   STEPS="setup serve" bash tools/gpu_bringup.sh       # a subset (setup is needed once per fresh machine)
#
# Steps (each logged to $LOG_DIR/<step>.log; a failing step does not stop the others):
#   setup  venv $VENV from the torch venv's base Python; bundle wheels (numpy 1.26, gguf) and the
#          trimmed tritonserver unpacked into it; this repo and then the torch venv's site-packages
#          on its sys.path (.pth files); checks numpy/torch/triton and TritonRuntime.locate()
#   tests  pytest of the GPU tests (tests/test_triton_attention.py, tests/test_*triton*.py, tests/test_gpu_*.py)
#   bench  tools/bench_attention.py, and `adrenaline bench engine` when the CLI has it
#   serve  `adrenaline serve` in the background, one /v2/models/ensemble/generate request, SIGTERM,
#          and a check that no tritonserver or stub process is left
#   offload  (two GPUs) `adrenaline bench offload --handoff`: hand-off primitives, then decode steps with
#          0 / half / all rows offloaded next to the all-local step (BENCH_OFFLOAD_ARGS)
#   serve1p1d  (two GPUs) tools/serve_1p1d.py: tritonserver with prefill + executor on GPU 0 and decode
#          on GPU 1 in each offload mode: answers, closed-loop throughput, executor kill (SERVE1P1D_ARGS)
#
# Environment (defaults in brackets): STEPS [setup tests bench serve], VENV [/tmp/adrenaline-venv],
# TORCH_PYTHON [/opt/torch/.venv/bin/python3], BASE_PYTHON [the torch Python's base interpreter],
# BUNDLE [.bundle], LOG_DIR [$OUT, else /tmp/adrenaline-bringup], DEVICE [cuda], DTYPE [bfloat16 on
# cuda, float32 on cpu], MODEL [dummy:tiny], OFFLOAD [never], SERVE_ARGS [], HTTP_PORT [8000],
# PYTEST_ARGS [], BENCH_ARGS [] (bench_attention.py), BENCH_ENGINE_ARGS [--device $DEVICE --out $LOG_DIR],
# TOTAL_BUDGET_S [460], SETUP_/TESTS_/BENCH_/BENCH_ENGINE_/SERVE_READY_/REQUEST_/STOP_TIMEOUT_S.
# The whole run stays within TOTAL_BUDGET_S: each step gets its timeout, capped by the time left
# minus a minimum kept for the later steps that were asked for (if a step gets starved, run the
# steps in separate calls: the venv in /tmp is reused while the machine stays warm).

set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$(pwd)
STARTED=$(date +%s)

STEPS=${STEPS:-"setup tests bench serve"}
BENCH_OFFLOAD_ARGS=${BENCH_OFFLOAD_ARGS:-}
SERVE1P1D_ARGS=${SERVE1P1D_ARGS:-}
BENCH_OFFLOAD_TIMEOUT_S=${BENCH_OFFLOAD_TIMEOUT_S:-420}
SERVE1P1D_TIMEOUT_S=${SERVE1P1D_TIMEOUT_S:-480}
VENV=${VENV:-/tmp/adrenaline-venv}
TORCH_PYTHON=${TORCH_PYTHON:-/opt/torch/.venv/bin/python3}
BASE_PYTHON=${BASE_PYTHON:-}
BUNDLE=${BUNDLE:-$REPO/.bundle}
LOG_DIR=${LOG_DIR:-${OUT:-/tmp/adrenaline-bringup}}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then DTYPE=${DTYPE:-bfloat16}; else DTYPE=${DTYPE:-float32}; fi
MODEL=${MODEL:-dummy:tiny}
OFFLOAD=${OFFLOAD:-never}
SERVE_ARGS=${SERVE_ARGS:-}
HTTP_PORT=${HTTP_PORT:-8000}
GRPC_PORT=${GRPC_PORT:-$((HTTP_PORT + 1))}
METRICS_PORT=${METRICS_PORT:-$((HTTP_PORT + 2))}
PYTEST_ARGS=${PYTEST_ARGS:-}
BENCH_ARGS=${BENCH_ARGS:-}
BENCH_ENGINE_ARGS=${BENCH_ENGINE_ARGS:-}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-460}   # the device tool allows 600 s per command; this leaves slack
SETUP_TIMEOUT_S=${SETUP_TIMEOUT_S:-120}
TESTS_TIMEOUT_S=${TESTS_TIMEOUT_S:-180}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-90}
BENCH_ENGINE_TIMEOUT_S=${BENCH_ENGINE_TIMEOUT_S:-180}
SERVE_READY_TIMEOUT_S=${SERVE_READY_TIMEOUT_S:-150}
REQUEST_TIMEOUT_S=${REQUEST_TIMEOUT_S:-60}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-60}
VPY=$VENV/bin/python
export DEVICE  # read by the setup check

mkdir -p "$LOG_DIR"
SUMMARY=$LOG_DIR/summary.txt
: >"$SUMMARY"

log() { echo "[bringup +$(($(date +%s) - STARTED))s] $*" | tee -a "$SUMMARY"; }
left_s() { echo $((TOTAL_BUDGET_S - ($(date +%s) - STARTED))); }
# time kept for the steps after STEP that were asked for, so a slow step cannot starve them
declare -A MIN_S=([setup]=20 [tests]=60 [bench]=60 [serve]=210 [offload]=120 [serve1p1d]=240)
ORDER="setup tests bench serve offload serve1p1d"
reserve_after() {
    local after=0 s total=0
    for s in $ORDER; do
        [ "$after" = 1 ] && want "$s" && total=$((total + MIN_S[$s]))
        [ "$s" = "$1" ] && after=1
    done
    echo "$total"
}
CURRENT_STEP=setup
# step_timeout WANT [RESERVE]: WANT capped by the time left minus RESERVE and minus what later
# steps need (at least 5 s)
step_timeout() {
    local t=$1 reserve=${2:-0} left
    left=$(($(left_s) - reserve - $(reserve_after "$CURRENT_STEP")))
    [ "$left" -lt "$t" ] && t=$left
    [ "$t" -lt 5 ] && t=5
    echo "$t"
}
# run_logged NAME TIMEOUT CMD...: run with a time limit, output to $LOG_DIR/NAME.log, tail on failure
run_logged() {
    local name=$1 limit=$2 rc
    shift 2
    log "$name: $* (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        log "$name: ok"
    else
        [ $rc -eq 124 ] && log "$name: TIMED OUT after ${limit}s" || log "$name: FAILED (exit $rc)"
        echo "---- last lines of $LOG_DIR/$name.log ----"
        tail -n 40 "$LOG_DIR/$name.log"
        echo "----"
    fi
    return $rc
}

declare -A RESULT=()
want() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# ------------------------------------------------------------------------------------------ setup
step_setup() {
    if [ ! -x "$TORCH_PYTHON" ]; then
        log "setup: TORCH_PYTHON=$TORCH_PYTHON is not executable (set TORCH_PYTHON to the Python that has torch)"
        return 1
    fi
    if [ ! -f "$BUNDLE/manifest.json" ]; then
        log "setup: $BUNDLE/manifest.json missing: build it with 'python tools/gpu_bundle.py build' and carry .bundle"
        return 1
    fi
    local args=(install --bundle "$BUNDLE" --venv "$VENV" --extra-python "$TORCH_PYTHON")
    [ -n "$BASE_PYTHON" ] && args+=(--base-python "$BASE_PYTHON")
    run_logged setup-install "$(step_timeout "$SETUP_TIMEOUT_S")" "$TORCH_PYTHON" tools/gpu_bundle.py "${args[@]}" \
        || return 1
    # the checks run in the new venv: numpy 1.26 from it, torch from the torch venv, the runtime
    # from the bundle, and every library of the server and the stub resolvable
    run_logged setup-check "$(step_timeout 90)" "$VPY" - <<'EOF'
import os, subprocess, sys
import numpy, torch
print("python", sys.version.split()[0], sys.executable)
print("numpy", numpy.__version__, numpy.__file__)
print("torch", torch.__version__, torch.__file__, "cuda available:", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__, triton.__file__)
except ImportError as e:
    print("triton: not importable:", e)
    if os.environ["DEVICE"] == "cuda":
        sys.exit("triton is needed on cuda")
import gguf, jinja2, safetensors, tokenizers  # noqa: F401  (runtime deps of pyproject.toml)
assert numpy.__version__.startswith("1.26"), "numpy 1.26 must come first (the 2.51 stub corrupts numpy 2)"
assert numpy.__file__.startswith(sys.prefix), f"numpy from {numpy.__file__}, not from {sys.prefix}"
t = torch.from_numpy(numpy.arange(6, dtype=numpy.float32)).reshape(2, 3)
assert t.sum().item() == 15.0 and t.numpy().tolist() == [[0, 1, 2], [3, 4, 5]], "torch <-> numpy 1.26"
if os.environ["DEVICE"] == "cuda":
    assert torch.cuda.is_available(), "DEVICE=cuda but torch sees no GPU"
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.device_count(), "device(s)")
from adrenaline_py.serving.triton_runtime import TritonRuntime
rt = TritonRuntime.locate()
for k, v in rt.__dict__.items():
    print(f"runtime.{k}: {v}")
assert str(rt.tritonserver).startswith(sys.prefix), "the runtime must be the one unpacked into the venv"
env = rt.environment()
missing = []
for f in (rt.tritonserver, rt.stub, rt.python_backend_dir / "libtriton_python.so"):
    try:
        out = subprocess.run(["ldd", str(f)], env=env, capture_output=True, text=True).stdout
    except FileNotFoundError:
        print("ldd not installed: library check skipped (the serve step will tell)")
        break
    missing += [f"{f.name}: {line.strip()}" for line in out.splitlines() if "not found" in line]
assert not missing, "unresolved libraries:\n" + "\n".join(missing)
print("libraries of tritonserver, the stub and libtriton_python.so: all resolved")
print("setup check: ok")
EOF
}

# ------------------------------------------------------------------------------------------ tests
step_tests() {
    # Kernel and engine tests run under the machine's torch Python: their references come from
    # transformers, which needs that Python's numpy 2 (the venv's numpy 1.26 is for the Triton stubs).
    # The bundle test runs in the venv it checks.
    local files=() f rc=0
    for f in tests/test_triton_attention.py tests/test_*triton*.py tests/test_gpu_*.py; do
        [ "$f" = tests/test_gpu_bundle.py ] && continue
        [ -f "$f" ] && case " ${files[*]-} " in *" $f "*) ;; *) files+=("$f") ;; esac
    done
    if [ ${#files[@]} -eq 0 ]; then log "tests: no GPU test files found"; return 1; fi
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" run_logged tests "$(step_timeout "$TESTS_TIMEOUT_S")" \
        "$TORCH_PYTHON" -m pytest -q -rs -p no:cacheprovider "${files[@]}" $PYTEST_ARGS || rc=1
    grep -E "passed|failed|skipped|error" "$LOG_DIR/tests.log" | tail -n 1 | sed 's/^/  /' | tee -a "$SUMMARY"
    if [ -f tests/test_gpu_bundle.py ]; then
        # shellcheck disable=SC2086
        run_logged tests-bundle "$(step_timeout 120)" "$VPY" -m pytest -q -rs -p no:cacheprovider \
            tests/test_gpu_bundle.py $PYTEST_ARGS || rc=1
        grep -E "passed|failed|skipped|error" "$LOG_DIR/tests-bundle.log" | tail -n 1 | sed 's/^/  /' | tee -a "$SUMMARY"
    fi
    return $rc
}

# ------------------------------------------------------------------------------------------ bench
step_bench() {
    local rc=0
    if [ -f tools/bench_attention.py ]; then
        # shellcheck disable=SC2086
        run_logged bench-attention "$(step_timeout "$BENCH_TIMEOUT_S")" "$VPY" tools/bench_attention.py $BENCH_ARGS \
            || rc=1
        tail -n 30 "$LOG_DIR/bench-attention.log"
    fi
    local help
    if help=$(timeout 30 "$VENV/bin/adrenaline" bench engine --help 2>&1); then
        local args=($BENCH_ENGINE_ARGS)
        if [ ${#args[@]} -eq 0 ]; then
            grep -q -- "--device" <<<"$help" && args+=(--device "$DEVICE")
            grep -q -- "--out" <<<"$help" && args+=(--out "$LOG_DIR")
        fi
        run_logged bench-engine "$(step_timeout "$BENCH_ENGINE_TIMEOUT_S")" "$VENV/bin/adrenaline" bench engine \
            "${args[@]}" || rc=1
        tail -n 30 "$LOG_DIR/bench-engine.log"
    else
        log "bench: 'adrenaline bench engine' not available yet; skipped"
    fi
    return $rc
}

# ------------------------------------------------------------------------------------------ serve
http_get_ok() {  # URL -> exit 0 on HTTP 200
    if command -v curl >/dev/null; then
        curl -sf -o /dev/null --max-time 3 "$1"
    else
        "$VPY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)" "$1" 2>/dev/null
    fi
}
http_post() {  # URL JSON -> prints the body
    if command -v curl >/dev/null; then
        curl -sS --max-time "$REQUEST_TIMEOUT_S" -X POST "$1" -d "$2"
    else
        "$VPY" -c "import sys, urllib.request
r = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method='POST')
print(urllib.request.urlopen(r, timeout=float(sys.argv[3])).read().decode())" "$1" "$2" "$REQUEST_TIMEOUT_S"
    fi
}
# processes of the given sessions, as pid:name (the launcher leads one; it starts tritonserver in a
# session of its own, which the stubs share)
session_procs() {
    ps -e -o pid=,sid=,comm= | awk -v s=" $* " 'index(s, " " $2 " ") {print $1 ":" $3}' | tr '\n' ' '
}

step_serve() {
    local url=http://127.0.0.1:$HTTP_PORT rc=0 pid t0 ts_pids=""
    if http_get_ok "$url/v2/health/live"; then
        log "serve: something already answers on port $HTTP_PORT; set HTTP_PORT"
        return 1
    fi
    # shellcheck disable=SC2206
    local front_args=()
    # bundles built before aiohttp was shipped: without it, serve without the HTTP front (loopback, curl only)
    "$VENV/bin/python" -c "import aiohttp" 2>/dev/null || front_args=(--no-front)
    local cmd=("$VENV/bin/adrenaline" serve --device "$DEVICE" --dtype "$DTYPE" --model "$MODEL" --offload "$OFFLOAD"
               --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" "${front_args[@]}" $SERVE_ARGS)
    log "serve: ${cmd[*]}"
    # its own session, so that whatever it leaves behind can be found (and only that is killed)
    setsid "${cmd[@]}" >"$LOG_DIR/serve.log" 2>&1 </dev/null &
    pid=$!
    t0=$(date +%s)
    local limit
    limit=$(step_timeout "$SERVE_READY_TIMEOUT_S" $((REQUEST_TIMEOUT_S + STOP_TIMEOUT_S + 10)))
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid"
            log "serve: the launcher exited (code $?) before the server was ready"
            tail -n 60 "$LOG_DIR/serve.log"
            return 1
        fi
        http_get_ok "$url/v2/health/ready" && break
        if [ $(($(date +%s) - t0)) -ge "$limit" ]; then
            log "serve: not ready within ${limit}s"
            rc=1
            break
        fi
        sleep 1
    done
    if [ $rc -eq 0 ]; then
        ts_pids=$(ps -e -o pid=,ppid=,comm= | awk -v p="$pid" '$2 == p && $3 == "tritonserver" {print $1}')
        log "serve: ready after $(($(date +%s) - t0))s; tritonserver pid(s) $ts_pids:" \
            "$(for p in $ts_pids; do readlink "/proc/$p/exe"; done)"
        local body='{"text_input": "The capital of France is", "max_tokens": 16}' answer
        answer=$(http_post "$url/v2/models/ensemble/generate" "$body")
        echo "$answer" >"$LOG_DIR/serve-answer.json"
        log "serve: answer: $answer"
        if ! grep -q '"text_output"' <<<"$answer"; then
            log "serve: the answer has no text_output"
            rc=1
        fi
    fi
    log "serve: SIGTERM to the launcher ($pid)"
    kill -TERM "$pid" 2>/dev/null
    t0=$(date +%s)
    while kill -0 "$pid" 2>/dev/null && [ $(($(date +%s) - t0)) -lt "$STOP_TIMEOUT_S" ]; do sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
        log "serve: the launcher did not exit within ${STOP_TIMEOUT_S}s; killing its session"
        kill -KILL "$pid" 2>/dev/null
        rc=1
    fi
    wait "$pid" 2>/dev/null
    log "serve: launcher exit code $? after $(($(date +%s) - t0))s"
    sleep 1
    local left
    left=$(session_procs "$pid" $ts_pids)
    if [ -n "$left" ]; then
        log "serve: processes left in the server's session: $left; killing them"
        # shellcheck disable=SC2086
        kill -KILL $(echo "$left" | tr ' ' '\n' | cut -d: -f1) 2>/dev/null
        rc=1
    fi
    if [ -z "$left" ]; then
        log "serve: no process of the server's session left"
    fi
    # machine-wide: on the GPU machine nothing else runs tritonserver, so this must be empty too
    local others
    # pid:name only (command lines carry API keys); comm is cut to 15 characters
    others=$(ps -e -o pid=,comm= | awk '$2 == "tritonserver" || $2 ~ /^triton_python_b/ {print $1 ":" $2}' | tr '\n' ' ')
    if [ -n "$others" ]; then
        log "serve: tritonserver/stub processes outside this run's sessions: $others"
        [ "$DEVICE" = cuda ] && rc=1  # the GPU machine is ours alone: nothing may be left
    else
        log "serve: no tritonserver or stub process on this machine"
    fi
    if [ "$DEVICE" = cuda ] && pgrep -x nvidia-cuda-mps-server >/dev/null; then
        log "serve: note: an MPS server is still running"
    fi
    tail -n 15 "$LOG_DIR/serve.log"
    return $rc
}

# ---------------------------------------------------------------------------- two-GPU layout (1P1D)
step_offload() {
    # shellcheck disable=SC2086
    run_logged bench-offload "$(step_timeout "$BENCH_OFFLOAD_TIMEOUT_S")" "$VPY" -m adrenaline_py.cli bench offload \
        --handoff --out "$LOG_DIR" $BENCH_OFFLOAD_ARGS
    local rc=$?
    tail -n 40 "$LOG_DIR/bench-offload.log"
    return $rc
}

step_serve1p1d() {
    # shellcheck disable=SC2086
    run_logged serve-1p1d "$(step_timeout "$SERVE1P1D_TIMEOUT_S")" "$VPY" tools/serve_1p1d.py --out "$LOG_DIR" \
        $SERVE1P1D_ARGS
    local rc=$?
    tail -n 40 "$LOG_DIR/serve-1p1d.log"
    return $rc
}

# ------------------------------------------------------------------------------------------- main
log "repo $REPO, steps: $STEPS, venv $VENV, logs in $LOG_DIR, budget ${TOTAL_BUDGET_S}s"
for step in $ORDER; do
    want "$step" || continue
    CURRENT_STEP=$step
    if [ "$step" != setup ] && [ ! -x "$VPY" ] && [ -z "${RESULT[setup]-}" ]; then
        log "$step: $VPY does not exist (a fresh machine?): running setup first"
        CURRENT_STEP=setup
        if step_setup; then RESULT[setup]=ok; else RESULT[setup]=FAILED; fi
        CURRENT_STEP=$step
    fi
    if [ "$step" != setup ] && [ ! -x "$VPY" ]; then
        log "$step: skipped: $VPY does not exist"
        RESULT[$step]=skipped
        continue
    fi
    if [ "$(left_s)" -lt 15 ]; then
        log "$step: skipped: the time budget is spent"
        RESULT[$step]=skipped
        continue
    fi
    if "step_$step"; then RESULT[$step]=ok; else RESULT[$step]=FAILED; fi
done
status=0
summary=""
for step in $ORDER; do
    [ -n "${RESULT[$step]-}" ] || continue
    summary+=" $step=${RESULT[$step]}"
    [ "${RESULT[$step]}" = FAILED ] && status=1
done
log "done in $(($(date +%s) - STARTED))s:$summary"
exit $status
