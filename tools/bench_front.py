"""What the HTTP front (adrenaline_py/serving/front.py) adds per token and per request.

Two measurements, both printed as medians:

1. ``model``: streams of N tokens of SmolLM2 (greedy, ``ignore_eos``: exactly N tokens) read from
   tritonserver's own loopback HTTP port, through the front's ``/v2/.../generate_stream`` (the proxy)
   and through the front's ``/v1/completions`` (the OpenAI translation), interleaved round by round
   so that drift hits all three alike. Per token: the median gap between consecutive events; per
   request: the median time from sending to the last event. The model's own step time varies by a
   few ms on a CPU, so these differences are noisy.
2. ``synthetic``: the same three paths in front of a fake tritonserver (a thread of this process)
   that sends N SSE events 2 ms apart and notes when it wrote each; the client notes when it read
   each, on the same clock. Per token: the median of (read - written) over all events, so the
   front's added latency per token is the difference between the paths, without the model's noise.

    .venv/bin/python tools/bench_front.py                    # starts a SmolLM2 server (front on)
    .venv/bin/python tools/bench_front.py --url http://127.0.0.1:8000 --triton-url http://127.0.0.1:PORT
    .venv/bin/python tools/bench_front.py --only synthetic

(`adrenaline serve` prints tritonserver's internal URL at start-up.) Single-threaded client, one
request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

PROMPT = "Once upon a time, in a small village near the mountains,"


def stream_times(url: str, path: str, body: dict, absolute: bool = False) -> list[float]:
    """POST ``body`` and return the arrival time of every SSE ``data:`` event, relative to the send
    (``absolute``: perf_counter values)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    data = json.dumps(body).encode()
    t0 = time.perf_counter()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{path}: HTTP {resp.status}: {resp.read()[:300]!r}")
    times = []
    for line in resp:
        if line.startswith(b"data:") and not line.startswith(b"data: [DONE]"):
            times.append(time.perf_counter() - (0.0 if absolute else t0))
    conn.close()
    return times


def paths(model_name: str, n: int) -> dict[str, tuple[str, dict]]:
    triton = {"text_input": PROMPT, "max_tokens": n, "stream": True,
              "sampling_parameters": json.dumps({"ignore_eos": True})}
    openai = {"model": model_name, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True,
              "stream": True}
    return {"direct": ("/v2/models/ensemble/generate_stream", triton),
            "front /v2": ("/v2/models/ensemble/generate_stream", triton),
            "front /v1": ("/v1/completions", openai)}


def measure(triton_url: str, front_url: str, model_name: str, n: int, rounds: int) -> dict[str, dict]:
    plan = paths(model_name, n)
    urls = {"direct": triton_url, "front /v2": front_url, "front /v1": front_url}
    gaps: dict[str, list[float]] = {k: [] for k in plan}
    totals: dict[str, list[float]] = {k: [] for k in plan}
    firsts: dict[str, list[float]] = {k: [] for k in plan}
    for name, (path, body) in plan.items():  # warm-up
        stream_times(urls[name], path, body)
    for r in range(rounds):
        order = list(plan) if r % 2 == 0 else list(reversed(plan))
        for name in order:
            path, body = plan[name]
            t = stream_times(urls[name], path, body)
            gaps[name] += [b - a for a, b in zip(t, t[1:])]
            totals[name].append(t[-1])
            firsts[name].append(t[0])
    return {k: {"events": len(gaps[k]) // rounds + 1, "gap_ms": statistics.median(gaps[k]) * 1e3,
                "first_ms": statistics.median(firsts[k]) * 1e3, "total_ms": statistics.median(totals[k]) * 1e3}
            for k in plan}


def measure_latency(triton_url: str, front_url: str, model_name: str, n: int, rounds: int) -> dict[str, dict]:
    """Per event: read time - write time (same clock); per request: send to last event."""
    plan = paths(model_name, n)
    urls = {"direct": triton_url, "front /v2": front_url, "front /v1": front_url}
    lat: dict[str, list[float]] = {k: [] for k in plan}
    totals: dict[str, list[float]] = {k: [] for k in plan}
    firsts: dict[str, list[float]] = {k: [] for k in plan}
    for r in range(rounds + 1):  # round 0 warms up
        for name in (list(plan) if r % 2 == 0 else list(reversed(plan))):
            path, body = plan[name]
            SENT.clear()
            t0 = time.perf_counter()
            got = stream_times(urls[name], path, body, absolute=True)
            if len(got) != len(SENT):
                raise RuntimeError(f"{name}: read {len(got)} events, {len(SENT)} were sent")
            if r:
                lat[name] += [g - s for g, s in zip(got, SENT)]
                totals[name].append(got[-1] - t0)
                firsts[name].append(got[0] - t0)
    return {k: {"events": n, "gap_ms": statistics.median(lat[k]) * 1e3, "first_ms": statistics.median(firsts[k]) * 1e3,
                "total_ms": statistics.median(totals[k]) * 1e3} for k in plan}


def report(title: str, res: dict[str, dict], n: int, per_token: str = "token gap") -> None:
    print(f"\n{title}")
    print(f"  {'path':<10} {'events':>6} {per_token + ' (median)':>19} {'first event':>12} {'request':>10}")
    for k, v in res.items():
        print(f"  {k:<10} {v['events']:>6} {v['gap_ms']:>16.3f} ms {v['first_ms']:>9.2f} ms "
              f"{v['total_ms']:>7.1f} ms")
    d = res["direct"]
    for k, v in res.items():
        if k == "direct":
            continue
        print(f"  {k} adds {(v['gap_ms'] - d['gap_ms']) * 1e3:+.0f} µs per token (median {per_token}), "
              f"{(v['total_ms'] - d['total_ms']):+.2f} ms per request of {n} tokens (median)")


# --- a fake tritonserver for the synthetic measurement ------------------------------------------------


SENT: list[float] = []  # when the fake tritonserver wrote each event of the current request


def fake_triton(port_box: list, ready: threading.Event, stop: threading.Event) -> None:
    from aiohttp import web

    async def generate_stream(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = int(json.loads(body.get("sampling_parameters", "{}")).get("max_tokens", body.get("max_tokens", 16)))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for i in range(n):
            await asyncio.sleep(0.002)  # a fast decode step: each event leaves on its own
            event = {"finish_reason": "length" if i == n - 1 else "", "model_name": "ensemble",
                     "model_version": "1", "num_input_tokens": 12, "num_output_tokens": 1, "text_output": " tok"}
            SENT.append(time.perf_counter())
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await resp.write_eof()
        return resp

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v2/models/ensemble/generate_stream", generate_stream)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_box.append(site._server.sockets[0].getsockname()[1])
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await runner.cleanup()

    asyncio.run(main())


@contextlib.contextmanager
def running_front(**config):
    """The front as a subprocess, as the launcher runs it, with ``FrontConfig(**config)``; yields its
    HTTP port once it listens."""
    import subprocess

    from adrenaline_py.serving.front import FrontConfig
    from adrenaline_py.serving.launcher import _free_port

    port = _free_port()
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "front.json"
        FrontConfig(port=port, model="dummy:tiny", served_model_name="bench", **config).save(cfg)
        proc = subprocess.Popen([sys.executable, "-m", "adrenaline_py.serving.front", "--config", str(cfg)],
                                cwd=PROJECT_ROOT, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            yield port
        finally:
            proc.terminate()
            proc.wait(30)


def synthetic(n: int, rounds: int) -> dict[str, dict]:
    """The front as a subprocess (as the launcher runs it) before a fake tritonserver in this process's
    thread; the client is this thread."""
    port_box: list = []
    ready, stop = threading.Event(), threading.Event()
    threading.Thread(target=fake_triton, args=(port_box, ready, stop), daemon=True).start()
    ready.wait(30)
    upstream = f"http://127.0.0.1:{port_box[0]}"
    try:
        with running_front(upstream=upstream) as port:
            return measure_latency(upstream, f"http://127.0.0.1:{port}", "bench", n, rounds)
    finally:
        stop.set()


# --- the gRPC half: ModelStreamInfer through the front's byte proxy (adrenaline_py/serving/grpc_front.py) ---

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


def fake_grpc_triton(n: int, port_box: list, ready: threading.Event, stop: threading.Event) -> None:
    """A gRPC server whose ModelStreamInfer answers each request with ``n`` messages 2 ms apart, each
    holding the perf_counter time it was written (8 bytes; CLOCK_MONOTONIC is one clock for all processes)."""
    import functools
    import struct

    import grpc

    async def stream(requests, context):
        async for request in requests:
            flood = request == b"flood"  # as fast as it can (throughput), else 2 ms apart (latency)
            for _ in range(n):
                yield struct.pack("<d", time.perf_counter())
                await asyncio.sleep(0 if flood else 0.002)
            return

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            if details.method == STREAM_METHOD:
                return grpc.stream_stream_rpc_method_handler(functools.partial(stream))
            return None

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((Handler(),))
        port_box.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await server.stop(None)

    asyncio.run(main())


def grpc_stream_latency(port: int, n: int) -> tuple[list[float], float, float]:
    """(write-to-read latency of each message, time to the first message, time to the last) of one stream."""
    import struct

    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(STREAM_METHOD)
        sent = time.perf_counter()
        latencies, first = [], None
        for msg in call(iter([b"request"])):
            now = time.perf_counter()
            first = first if first is not None else now - sent
            latencies.append(now - struct.unpack("<d", msg)[0])
        assert len(latencies) == n, len(latencies)
        return latencies, first, now - sent


def grpc_throughput(port: int, n: int, streams: int) -> float:
    """Messages per second read by ``streams`` concurrent streams of ``n`` messages each (one thread each)."""
    import grpc

    def one() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            got = sum(1 for _ in channel.stream_stream(STREAM_METHOD)(iter([b"flood"])))
            assert got == n, got

    threads = [threading.Thread(target=one) for _ in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return streams * n / (time.perf_counter() - t0)


def grpc_synthetic(n: int, rounds: int, streams: int = 0) -> dict[str, dict]:
    """The front (gRPC half) as a subprocess, as the launcher runs it, before a fake gRPC tritonserver."""
    from adrenaline_py.serving.launcher import _free_port

    port_box: list = []
    ready, stop = threading.Event(), threading.Event()
    threading.Thread(target=fake_grpc_triton, args=(n, port_box, ready, stop), daemon=True).start()
    ready.wait(30)
    grpc_port = _free_port()
    try:
        with running_front(upstream="http://127.0.0.1:9", grpc_port=grpc_port,
                           grpc_upstream=f"127.0.0.1:{port_box[0]}"):
            ports = {"direct": port_box[0], "front gRPC": grpc_port}
            lat: dict[str, list[float]] = {k: [] for k in ports}
            firsts: dict[str, list[float]] = {k: [] for k in ports}
            totals: dict[str, list[float]] = {k: [] for k in ports}
            for r in range(rounds + 1):  # round 0 warms up; interleaved, so that drift hits both alike
                for name in (list(ports) if r % 2 == 0 else list(reversed(ports))):
                    latencies, first, total = grpc_stream_latency(ports[name], n)
                    if r:
                        lat[name] += latencies
                        firsts[name].append(first)
                        totals[name].append(total)
            res = {k: {"events": n, "gap_ms": statistics.median(lat[k]) * 1e3,
                       "first_ms": statistics.median(firsts[k]) * 1e3,
                       "total_ms": statistics.median(totals[k]) * 1e3} for k in ports}
            if streams:
                for k, port in ports.items():
                    rates = [grpc_throughput(port, 10 * n, streams) for _ in range(3)]
                    res[k]["messages_per_s"] = statistics.median(rates)
            return res
    finally:
        stop.set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="the front (public HTTP port) of a running server; default: start one")
    p.add_argument("--triton-url", help="tritonserver's own HTTP (the internal loopback port)")
    p.add_argument("--model-name", default="smollm2", help="served model name of the running server")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--only", choices=["model", "synthetic", "grpc"])
    p.add_argument("--grpc-streams", type=int, default=16,
                   help="gRPC throughput: concurrent streams that read messages as fast as they come (0: skip)")
    a = p.parse_args(argv)
    print(f"bench_front: {time.strftime('%Y-%m-%d %H:%M')}, {a.tokens} tokens per stream, {a.rounds} rounds")
    if a.only in (None, "synthetic"):
        report("synthetic (fake tritonserver, one event every 2 ms; 'token' = write-to-read latency):",
               synthetic(a.tokens, a.rounds), a.tokens, per_token="latency")
    if a.only in (None, "grpc"):
        res = grpc_synthetic(a.tokens, a.rounds, a.grpc_streams)
        report("gRPC, synthetic (fake tritonserver's ModelStreamInfer, one message every 2 ms; 'token' = "
               "write-to-read latency):", res, a.tokens, per_token="latency")
        for k, v in res.items():
            if "messages_per_s" in v:
                print(f"  {k}: {v['messages_per_s']:.0f} messages/s with {a.grpc_streams} streams flooding "
                      f"({10 * a.tokens} messages each, median of 3)")
    if a.only in ("synthetic", "grpc"):
        return 0
    server = None
    if a.url is None:
        from adrenaline_py.config import EngineConfig
        from adrenaline_py.serving.launcher import Server, ServerOptions, _free_port

        http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
        server = Server(EngineConfig(model="smollm2", max_model_len=1024, max_tokens_limit=512, num_decode_blocks=256,
                                     num_executor_blocks=256, max_decode_batch=8),
                        ServerOptions(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port),
                        log_path=Path(tempfile.gettempdir()) / "bench_front_server.log")
        server.__enter__()
        a.url, a.triton_url, a.model_name = server.http_url, server.triton_http_url, server.served_model_name
    try:
        if a.triton_url is None:
            p.error("--triton-url is needed with --url")
        report(f"model (SmolLM2-135M on this CPU, greedy, {a.tokens} tokens):",
               measure(a.triton_url, a.url, a.model_name, a.tokens, a.rounds), a.tokens)
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
