"""Serve 1P1D through tritonserver on two GPUs in each offload mode, as a user would, and check it.

    python tools/serve_1p1d.py [--model dummy:llama-2-7b] [--modes never always] [--out DIR]

For each ``--offload`` mode a real ``tritonserver`` (the launcher's `Server`, so MPS, the model
repository and every role) serves with prefill + executor on ``--prefill-gpu`` and decode on
``--decode-gpu``; then, over HTTP only (the GPU machine has no tritonclient):

1. answers: ``--prompts`` fixed prompts, greedy, non-streaming; the texts of every mode are
   compared with the first mode's (random bf16 weights have near-ties, so this counts matches);
2. throughput: a closed loop of ``--concurrency`` clients, each sending ``--prompt-tokens``-token
   prompts for exactly ``--output-tokens`` tokens (``min_tokens`` = ``max_tokens``), non-streaming
   (so the engine, not the per-token sender, is measured), for ``--seconds`` after a warm-up;
   output tokens/s counted from ``num_output_tokens``;
3. with offloading on: the attention executor's worker is SIGKILLed while streaming requests are
   decoding; every request must still end with a finish reason (its offloaded KV recomputed on
   decode), and the recovery counter must move.

Prints a table and writes ``serve_1p1d.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adrenaline_py.config import DEFAULT_EXECUTOR_SM_SHARE, DEFAULT_PREFILL_SM_SHARE, EngineConfig  # noqa: E402
from adrenaline_py.engine.executor import executor_state  # noqa: E402
from adrenaline_py.serving.bench_serve import (  # noqa: E402
    MetricsSampler,
    decode_loop_breakdown,
    parse_prometheus,
    prefill_breakdown,
    series_name,
)
from adrenaline_py.serving.launcher import Server, ServerOptions  # noqa: E402
from adrenaline_py.serving.loadgen import stream_events  # noqa: E402

WORDS = "the river light stone market engine quiet window garden number story signal bread".split()


def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def stream(url: str, body: dict, timeout: float = 600) -> dict:
    text, reason, error, tokens = [], None, None, 0
    for event in stream_events(url, body, timeout):
        if "error" in event:
            error = event["error"]
            break
        text.append(event.get("text_output", ""))
        tokens += int(event.get("num_output_tokens", 0) or 0)
        reason = event.get("finish_reason") or reason
    return {"text": "".join(text), "finish_reason": reason, "error": error, "tokens": tokens}


def counters(port: int) -> dict[str, float]:
    """Every adrenaline_ series and Triton's prefill queue counters, by series name (labels included)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        samples, _ = parse_prometheus(r.read().decode())
    return {series_name(n, labels): v for (n, labels), v in samples.items() if n.startswith(MetricsSampler.PREFIXES)}


def window_breakdown(before: dict[str, float], after: dict[str, float], span_s: float) -> dict:
    """What the server did between two scrapes: prefill's busy fraction and passes, the decode step's
    phases (with decode's wait for the executor) and the decode batch; from counter increases."""
    inc = {k: v - before.get(k, 0.0) for k, v in after.items()}
    out = {"prefill": prefill_breakdown(inc, span_s), "decode_loop": decode_loop_breakdown(inc)}
    for rows in ("all", "offloaded"):
        n = inc.get(f'adrenaline_decode_batch_size_count{{rows="{rows}"}}', 0)
        if n > 0:
            out[f"decode_batch_{rows}"] = inc.get(f'adrenaline_decode_batch_size_sum{{rows="{rows}"}}', 0) / n
    return out


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        out = {}
        for line in r.read().decode().splitlines():
            if line.startswith("adrenaline_"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


def prompt_of(i: int, n_chars: int) -> str:
    words, k = [], i
    while len(" ".join(words)) < n_chars:
        words.append(WORDS[k % len(WORDS)])
        k = k * 7 + 3
    return " ".join(words)[:n_chars]


def closed_loop(url: str, concurrency: int, prompt_chars: int, out_tokens: int, seconds: float,
                warmup_s: float, metrics_port: int | None = None) -> dict:
    stop = threading.Event()
    done: list[tuple[float, int, float]] = []  # (finish time, output tokens, latency)
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        i = 0
        while not stop.is_set():
            body = {"text_input": prompt_of(c * 1000 + i, prompt_chars), "max_tokens": out_tokens,
                    "min_tokens": out_tokens}
            t0 = time.monotonic()
            try:
                r = post(f"{url}/v2/models/ensemble/generate", body)
                with lock:
                    done.append((time.monotonic(), int(r["num_output_tokens"]), time.monotonic() - t0))
            except Exception as e:  # count, keep the load on
                with lock:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
            i += 1

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(concurrency)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    server, before = None, None
    try:  # the server's view of the window is a diagnosis: failing to read it loses no measurement
        before = counters(metrics_port) if metrics_port else None
    except OSError as e:
        server = {"error": f"metrics: {e}"}
    time.sleep(seconds)
    if before is not None:
        try:
            server = window_breakdown(before, counters(metrics_port), seconds)
        except OSError as e:
            server = {"error": f"metrics: {e}"}
    stop.set()
    t_from, t_to = start + warmup_s, start + warmup_s + seconds
    window = [d for d in done if t_from <= d[0] <= t_to]
    for t in threads:
        t.join(600)
    tokens = sum(d[1] for d in window)
    return {"concurrency": concurrency, "seconds": seconds, "requests": len(window),
            "output_tokens_per_s": tokens / seconds, "errors": len(errors), "first_errors": errors[:3],
            "median_latency_s": statistics.median([d[2] for d in window]) if window else None,
            "tokens_each": sorted({d[1] for d in window}), "server": server}


def kill_executor_mid_decode(url: str, run_dir: str, metrics_port: int, prompts: list[str], out_tokens: int) -> dict:
    before = metrics(metrics_port).get("adrenaline_offload_recovered_total", 0.0)
    state = executor_state(run_dir)
    if state is None:
        return {"error": "no executor running"}
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream, url,
                               {"text_input": p, "max_tokens": out_tokens, "min_tokens": out_tokens}) for p in prompts]
        time.sleep(1.5)  # decoding by now
        os.kill(state.pid, signal.SIGKILL)
        killed = time.monotonic()
        results = [f.result() for f in futures]
    deadline = time.monotonic() + 120
    restarted = None
    while time.monotonic() < deadline:
        s = executor_state(run_dir)
        if s is not None and s.pid != state.pid:
            restarted = time.monotonic() - killed
            break
        time.sleep(0.25)
    time.sleep(1.0)  # metrics are sampled every 0.5 s
    m = metrics(metrics_port)
    after = m.get("adrenaline_offload_recovered_total", 0.0)
    # the new executor serves again: a few requests, and its step counter moves
    steps_before = m.get("adrenaline_executor_steps_total", 0.0)
    again = [post(f"{url}/v2/models/ensemble/generate", {"text_input": p, "max_tokens": 16}) for p in prompts[:4]]
    time.sleep(1.5)
    steps_after = metrics(metrics_port).get("adrenaline_executor_steps_total", 0.0)
    return {"requests": len(results), "finished": sum(r["finish_reason"] is not None for r in results),
            "offloaded_again": {"answers": len(again), "executor_steps": steps_after - steps_before},
            "errors": [r["error"] for r in results if r["error"]], "full_length": sum(r["tokens"] == out_tokens
                                                                                      for r in results),
            "recovered": after - before, "executor_restarted_after_s": restarted, "texts": [r["text"] for r in results]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:llama-2-7b")
    p.add_argument("--modes", nargs="+", default=["never", "always"],
                   help="--offload modes, each optionally with +two-batch=on|off|auto (default auto) and +overlap "
                        "or +no-overlap (--overlap-steps / --no-overlap-steps; default: the engine's, overlapped)")
    p.add_argument("--prefill-gpu", type=int, default=0)
    p.add_argument("--decode-gpu", type=int, default=1)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--blocks", type=int, default=8192, help="KV blocks per pool (room to spare)")
    p.add_argument("--no-kill", action="store_true")
    p.add_argument("--executor-sm-share", type=int, default=DEFAULT_EXECUTOR_SM_SHARE)
    p.add_argument("--prefill-sm-share", type=int, default=DEFAULT_PREFILL_SM_SHARE)
    p.add_argument("--out", default=os.environ.get("OUT"))
    a = p.parse_args()
    os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
    report: dict = {"model": a.model, "layout": f"prefill GPU {a.prefill_gpu}, decode GPU {a.decode_gpu}",
                    "executor_sm_share": a.executor_sm_share, "prefill_sm_share": a.prefill_sm_share, "modes": {}}
    answers: dict[str, list[str]] = {}
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)  # the servers' logs go there
    for mode in a.modes:
        offload, *opts = mode.split("+")  # e.g. always+two-batch=off, never+overlap (--overlap-steps)
        two_batch = next((o.split("=", 1)[1] for o in opts if o.startswith("two-batch=")), None)
        engine = EngineConfig(
            model=a.model, device="cuda", prefill_gpu=a.prefill_gpu, decode_gpu=a.decode_gpu, dtype="bfloat16",
            offload=offload, two_batch_overlap=two_batch or EngineConfig.two_batch_overlap,
            overlap_steps=False if "no-overlap" in opts else True if "overlap" in opts else EngineConfig.overlap_steps,
            max_model_len=a.prompt_tokens + a.output_tokens + 256, max_tokens_limit=a.output_tokens + 128,
            max_decode_batch=max(a.concurrency, a.prompts), num_decode_blocks=a.blocks, num_executor_blocks=a.blocks,
            run_dir="", executor_sm_share=a.executor_sm_share, prefill_sm_share=a.prefill_sm_share,
        )
        # A GPU bundle without aiohttp (older builds): tritonserver's HTTP directly (loopback, our own clients).
        options = ServerOptions(http_port=18000, grpc_port=18001, metrics_port=18002,
                                front=importlib.util.find_spec("aiohttp") is not None)
        log_path = Path(a.out or "/tmp", f"serve_{mode.replace('+', '_').replace('=', '-')}.log")
        t0 = time.monotonic()
        server = Server(engine, options, log_path=log_path)
        entry: dict = {}
        try:
            server.__enter__()
            entry["startup_s"] = time.monotonic() - t0
            url = "http://127.0.0.1:18000"
            texts = []
            for i in range(a.prompts):
                r = post(f"{url}/v2/models/ensemble/generate", {"text_input": prompt_of(i, 64), "max_tokens": 32})
                texts.append(r["text_output"])
            answers[mode] = texts
            entry["answers"] = len(texts)
            if answers and mode != a.modes[0] and a.modes[0] in answers:
                entry["answers_equal_to_" + a.modes[0]] = sum(x == y for x, y in zip(texts, answers[a.modes[0]]))
            entry["overlap_steps"] = engine.overlap_steps
            entry["throughput"] = closed_loop(url, a.concurrency, a.prompt_tokens, a.output_tokens, a.seconds,
                                              a.warmup, options.metrics_port)
            m = metrics(options.metrics_port)
            entry["offloaded_steps_share"] = m.get('adrenaline_decode_batch_size_sum{rows="offloaded"}', 0) / max(
                1.0, m.get('adrenaline_decode_batch_size_sum{rows="all"}', 0))
            if offload != "never" and not a.no_kill:
                entry["kill"] = kill_executor_mid_decode(url, str(server.run_dir), options.metrics_port,
                                                         [prompt_of(500 + i, 256) for i in range(16)], 256)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {e}"
            if log_path.exists():
                entry["log_tail"] = log_path.read_text()[-3000:]
        finally:
            server.stop()
        report["modes"][mode] = entry
        summary = {k: v for k, v in entry.items() if k not in ("kill", "log_tail")}
        print(mode, json.dumps(summary, indent=1), flush=True)
        if "kill" in entry:
            print("kill:", json.dumps({k: v for k, v in entry["kill"].items() if k != "texts"}), flush=True)
        if "log_tail" in entry:
            print(entry["log_tail"])
    rates = {m: e.get("throughput", {}).get("output_tokens_per_s") for m, e in report["modes"].items()}
    print("\n| mode | overlapped steps | output tok/s | requests | errors | median latency s | offloaded share | "
          "decode batch | step ms (decode waited for the executor) | prefill busy, ms per pass | startup s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, e in report["modes"].items():
        t = e.get("throughput", {})
        srv = t.get("server") or {}
        step = srv.get("decode_loop", {}).get("step_ms", {})
        pre = srv.get("prefill", {})
        print(f"| {mode} | {e.get('overlap_steps', '—')} | {t.get('output_tokens_per_s', 0):.0f} | "
              f"{t.get('requests', 0)} | {t.get('errors', '—')} | {t.get('median_latency_s') or 0:.2f} | "
              f"{e.get('offloaded_steps_share', 0):.2f} | {srv.get('decode_batch_all', 0):.0f} | "
              f"{step.get('device', 0):.1f} ({step.get('offload_wait', 0):.2f}) | "
              f"{100 * pre.get('busy', 0):.0f} %, {pre.get('ms_per_pass', 0):.1f} | {e.get('startup_s', 0):.0f} |")
    if rates.get("never") and rates.get("always"):
        print(f"\nalways / never output throughput: {rates['always'] / rates['never']:.3f}")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "serve_1p1d.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
