"""How many streamed responses a Python-backend model can send per second, by sender threads.

Decode's output threads (adrenaline_py/engine/output.py) send every token response through the
python backend's response sender; under load the sends bound how far behind clients fall (the
output lag, docs/performance.md). This tool measures that path alone, with no model behind it: a
decoupled Python-backend model (written to a temporary repository) holds R streaming requests and
sends N responses to each from T threads, each thread owning R / T requests and sending one
response per request per round, as the output threads do. Each response carries K of the tensors
decode sends (text_output, finish_reason, num_output_tokens, num_input_tokens).

Printed per (T, K), medians over --repeats runs: sends per second (the model's wall time from the
first send to the last), the mean time one ``send`` call takes in its thread, and the throughput
next to one thread's (the baseline). Clients read the streams over HTTP ``generate_stream``
(aiohttp), so the client's CPU counts too; on a small host it is part of what saturates.
``--loop HOST_MS WAIT_MS`` adds what decode's process has beside its senders: a thread that runs
Python for HOST_MS (holding the GIL), then waits WAIT_MS with the GIL released (the GPU's part of a
step), senders passing a gate open only during the wait (decode's HostGate; ``--no-gate``: off).

    .venv/bin/python tools/bench_sends.py                          # T = 1 2 4 8 16, K = 2
    .venv/bin/python tools/bench_sends.py --threads 4 --tensors 1 2 4
    .venv/bin/python tools/bench_sends.py --threads 1 4 --loop 5 20    # beside a decode-like loop
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

CONFIG = """name: "sends"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "requests" data_type: TYPE_INT32 dims: [ 1 ] },
        { name: "responses" data_type: TYPE_INT32 dims: [ 1 ] },
        { name: "threads" data_type: TYPE_INT32 dims: [ 1 ] },
        { name: "tensors" data_type: TYPE_INT32 dims: [ 1 ] },
        { name: "loop_host_us" data_type: TYPE_INT32 dims: [ 1 ] },
        { name: "loop_wait_us" data_type: TYPE_INT32 dims: [ 1 ] },
        { name: "gate" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] },
         { name: "finish_reason" data_type: TYPE_STRING dims: [ -1 ] },
         { name: "num_output_tokens" data_type: TYPE_INT32 dims: [ -1 ] },
         { name: "num_input_tokens" data_type: TYPE_INT32 dims: [ -1 ] },
         { name: "wall_s" data_type: TYPE_FP64 dims: [ 1 ] },
         { name: "send_s" data_type: TYPE_FP64 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# The model: requests gather until R of them arrived, then T threads send to them as decode's output
# threads do (one response per owned request per round); the final response carries the timings.
MODEL = '''
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


def scalar(request, name):
    return int(pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args):
        self.lock = threading.Lock()
        self.waiting = []

    def execute(self, requests):
        for r in requests:
            names = ("requests", "responses", "threads", "tensors", "loop_host_us", "loop_wait_us", "gate")
            n_req, n_resp, n_threads, n_tensors, host_us, wait_us, gate = (scalar(r, k) for k in names)
            with self.lock:
                self.waiting.append(r.get_response_sender())
                if len(self.waiting) < n_req:
                    continue
                senders, self.waiting = self.waiting, []
            threading.Thread(target=self.run, args=(senders, n_resp, n_threads, n_tensors, host_us, wait_us, gate),
                             daemon=True).start()
        return None

    def run(self, senders, n_resp, n_threads, n_tensors, host_us, wait_us, gate):
        send_s = [0.0] * n_threads
        done, is_open = threading.Event(), threading.Event()
        is_open.set()

        def loop():  # as the decode loop: Python holding the GIL, then a wait that releases it (the GPU's)
            while not done.is_set():
                if gate:
                    is_open.clear()
                end, x = time.perf_counter() + host_us / 1e6, 0
                while time.perf_counter() < end:
                    x += 1
                is_open.set()
                time.sleep(wait_us / 1e6)

        def work(t):
            mine = senders[t::n_threads]
            for i in range(n_resp):
                for sender in mine:
                    is_open.wait(0.05)  # as HostGate.wait
                    t0 = time.perf_counter()
                    out = [pb_utils.Tensor("text_output", np.array([b" token"], dtype=np.object_)),
                           pb_utils.Tensor("finish_reason", np.array([[b""]], dtype=np.object_)),
                           pb_utils.Tensor("num_output_tokens", np.array([[i + 1]], dtype=np.int32)),
                           pb_utils.Tensor("num_input_tokens", np.array([[32]], dtype=np.int32))]
                    sender.send(pb_utils.InferenceResponse(output_tensors=out[:n_tensors]))
                    send_s[t] += time.perf_counter() - t0

        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        looper = threading.Thread(target=loop, daemon=True) if host_us > 0 else None
        if looper is not None:
            looper.start()
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        done.set()
        if looper is not None:
            looper.join()
        for sender in senders:
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("wall_s", np.array([wall], dtype=np.float64)),
                pb_utils.Tensor("send_s", np.array([sum(send_s)], dtype=np.float64))]),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''


async def one_run(url: str, requests: int, responses: int, threads: int, tensors: int,
                  loop: tuple[float, float] = (0.0, 0.0), gate: bool = True) -> tuple[float, float]:
    """(sends per second, mean seconds per send call) of one run, from the model's own clock."""
    import aiohttp

    body = {"requests": requests, "responses": responses, "threads": threads, "tensors": tensors,
            "loop_host_us": int(loop[0] * 1e3), "loop_wait_us": int(loop[1] * 1e3), "gate": int(gate)}

    async def stream(session: aiohttp.ClientSession) -> dict:
        events, last = 0, {}
        async with session.post(f"{url}/v2/models/sends/generate_stream", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
            async for line in resp.content:
                if line.startswith(b"data:"):
                    events += 1
                    last = json.loads(line[5:])
        if events != responses + 1 or "wall_s" not in last:
            raise RuntimeError(f"a stream got {events} events, expected {responses + 1}: {last}")
        return last

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        finals = await asyncio.gather(*(stream(session) for _ in range(requests)))
    wall, send = float(finals[0]["wall_s"]), float(finals[0]["send_s"])
    total = requests * responses
    return total / wall, send / total


def start_server(work: Path, http_port: int, grpc_port: int, metrics_port: int) -> subprocess.Popen:
    from adrenaline_py.serving.triton_runtime import TritonRuntime

    repo = work / "repo" / "sends"
    (repo / "1").mkdir(parents=True)
    (repo / "config.pbtxt").write_text(CONFIG)
    (repo / "1" / "model.py").write_text(MODEL)
    rt = TritonRuntime.locate()
    backends = rt.prepare(work)
    cmd = rt.server_command(work / "repo", backends, http_port=http_port, grpc_port=grpc_port,
                            metrics_port=metrics_port)
    return subprocess.Popen(cmd, env=rt.environment(), stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT)


def wait_ready(url: str, server: subprocess.Popen, timeout_s: float = 120.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tritonserver exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v2/models/sends/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError("tritonserver did not become ready")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="sender threads (T)")
    p.add_argument("--tensors", type=int, nargs="+", default=[2], choices=[1, 2, 3, 4], help="tensors per response (K)")
    p.add_argument("--requests", type=int, default=64, help="streams (R)")
    p.add_argument("--responses", type=int, default=200, help="responses per stream (N)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop", type=float, nargs=2, metavar=("HOST_MS", "WAIT_MS"), default=(0.0, 0.0),
                   help="a thread in the model's process that, as the decode loop, runs Python (holding the GIL) "
                        "for HOST_MS, then waits WAIT_MS (the GPU's part, GIL released)")
    p.add_argument("--no-gate", action="store_true",
                   help="with --loop: senders do not wait while that thread runs Python (decode's HostGate off)")
    a = p.parse_args(argv)
    import platform
    import socket

    socks = [socket.socket() for _ in range(3)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    url = f"http://127.0.0.1:{ports[0]}"
    with tempfile.TemporaryDirectory(prefix="bench-sends-") as tmp:
        server = start_server(Path(tmp), *ports)
        try:
            wait_ready(url, server)
            asyncio.run(one_run(url, a.requests, 10, 1, 1))  # warm-up
            loop = (f"; beside a loop of {a.loop[0]:g} ms Python / {a.loop[1]:g} ms waiting, gate "
                    f"{'off' if a.no_gate else 'on'}" if a.loop[0] > 0 else "")
            print(f"# python-backend sends: {a.requests} streams x {a.responses} responses{loop}; "
                  f"{platform.node()}, {len(os.sched_getaffinity(0))} CPUs; medians of {a.repeats}")
            print("| threads | tensors | sends/s | ms per send call | vs 1 thread |")
            print("|---:|---:|---:|---:|---:|")
            base: dict[int, float] = {}
            for k in a.tensors:
                for t in a.threads:
                    runs = [asyncio.run(one_run(url, a.requests, a.responses, t, k, tuple(a.loop), not a.no_gate))
                            for _ in range(a.repeats)]
                    rate = statistics.median(r[0] for r in runs)
                    per = statistics.median(r[1] for r in runs)
                    if t == 1:
                        base[k] = rate
                    ratio = f"{rate / base[k]:.2f}" if k in base else "-"
                    print(f"| {t} | {k} | {rate:.0f} | {1e3 * per:.3f} | {ratio} |", flush=True)
        finally:
            server.terminate()
            server.wait(30)
    return 0

if __name__ == "__main__":
    sys.exit(main())
