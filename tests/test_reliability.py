"""Serving under overload and faults, through the real tritonserver (SmolLM2-135M, CPU, loopback)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import small_engine_config
from test_server import _free_ports, generate

from adrenaline_py.serving.launcher import Server, ServerOptions

pytestmark = pytest.mark.server


def _server(tmp_path_factory, name: str, **engine) -> Server:
    http, grpc_port, metrics = _free_ports(3)
    cfg = small_engine_config(model="smollm2", max_model_len=1024, max_tokens_limit=512, **engine)
    cfg = type(cfg)(**{**cfg.__dict__, "run_dir": ""})
    log = tmp_path_factory.mktemp(name) / "server.log"
    server = Server(cfg, ServerOptions(http_port=http, grpc_port=grpc_port, metrics_port=metrics,
                                       startup_timeout_s=300), log_path=log)
    server.__enter__()
    return server


def metrics(server: Server) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.options.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("adrenaline_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return False


def stream(server: Server, prompt: str, max_tokens: int) -> dict:
    """One streaming request; returns its text and how it ended (finish reason or error)."""
    events = generate(server, {"text_input": prompt, "max_tokens": max_tokens, "stream": True}, "generate_stream")
    errors = [e["error"] for e in events if "error" in e]
    return {"text": "".join(e.get("text_output", "") for e in events),
            "finish_reason": next((e["finish_reason"] for e in events if e.get("finish_reason")), None),
            "error": errors[0] if errors else None}


@pytest.fixture(scope="module")
def small_pools_server(tmp_path_factory):
    # 48 blocks of 16 tokens per pool: about 9 requests of 20 + 64 tokens each, per pool.
    server = _server(tmp_path_factory, "overload", offload="auto", num_decode_blocks=48, num_executor_blocks=48,
                     max_queued_requests=6, admission_timeout_s=4.0, max_decode_batch=32)
    yield server
    server.stop()


def test_metrics_report_pools_requests_and_batches(small_pools_server):
    generate(small_pools_server, {"text_input": "The capital of France is", "max_tokens": 8})
    # Metrics are sampled every 0.5 s: wait until the finished request shows.
    assert wait_for(lambda: metrics(small_pools_server).get('adrenaline_requests_finished_total{reason="length"}'))
    time.sleep(1.0)
    m = metrics(small_pools_server)
    for pool in ("decode", "executor"):
        assert m[f'adrenaline_kv_blocks_total{{pool="{pool}"}}'] == 48
        assert m[f'adrenaline_kv_blocks_used{{pool="{pool}"}}'] == 0
    assert m['adrenaline_decode_requests{state="running"}'] == 0
    assert m["adrenaline_requests_offloaded"] == 0
    assert m['adrenaline_decode_batch_size_count{rows="all"}'] >= 7
    assert m['adrenaline_requests_finished_total{reason="length"}'] >= 1


def test_overload_ends_every_request_with_output_or_explicit_error(small_pools_server):
    prompts = [f"Request {i}: write a short poem about the number {i}." for i in range(48)]
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        results = list(pool.map(lambda p: stream(small_pools_server, p, 64), prompts))
    finished = [r for r in results if r["finish_reason"] in ("stop", "length")]
    rejected = [r for r in results if r["error"]]
    assert len(finished) + len(rejected) == len(prompts)  # nothing lost or left hanging
    assert finished and rejected
    for r in rejected:
        assert re.search(r"server overloaded|KV cache full", r["error"]), r["error"]
    m = metrics(small_pools_server)
    # auto admission used both pools: offloaded while the executor had room, local otherwise
    assert m['adrenaline_admitted_total{pool="executor"}'] > 0
    assert m['adrenaline_admitted_total{pool="decode"}'] > 0
    assert wait_for(lambda: all(metrics(small_pools_server)[f'adrenaline_kv_blocks_used{{pool="{p}"}}'] == 0
                                for p in ("decode", "executor")))
    ok = generate(small_pools_server, {"text_input": "Still serving?", "max_tokens": 4})
    assert ok.get("finish_reason") == "length"


@pytest.fixture(scope="module")
def offload_server(tmp_path_factory):
    server = _server(tmp_path_factory, "kill", offload="always", num_decode_blocks=512, num_executor_blocks=512,
                     max_decode_batch=32)
    yield server
    server.stop()


def _open_stream(server: Server, prompt: str, max_tokens: int):
    body = json.dumps({"text_input": prompt, "max_tokens": max_tokens, "stream": True}).encode()
    response = urllib.request.urlopen(urllib.request.Request(
        f"{server.http_url}/v2/models/ensemble/generate_stream", data=body), timeout=120)
    response.readline()  # the first event arrived: the request is decoding
    return response


def test_cancelled_streams_free_their_kv_blocks_in_both_pools(offload_server):
    import tritonclient.grpc as grpcclient

    num_grpc, num_http = 24, 8
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{offload_server.options.grpc_port}")
    client.start_stream(callback=lambda result, error: None)
    for i in range(num_grpc):
        inputs = []
        for name, value, dtype in (("text_input", np.array([[f"Story {i}:".encode()]], dtype=np.object_), "BYTES"),
                                   ("max_tokens", np.array([[200]], dtype=np.int32), "INT32"),
                                   ("stream", np.array([[True]]), "BOOL")):
            t = grpcclient.InferInput(name, list(value.shape), dtype)
            t.set_data_from_numpy(value)
            inputs.append(t)
        client.async_stream_infer("ensemble", inputs)
    http_streams = [_open_stream(offload_server, f"Poem {i}:", 200) for i in range(num_http)]
    total = num_grpc + num_http
    held = lambda m: m['adrenaline_decode_requests{state="running"}'] + m['adrenaline_decode_requests{state="waiting"}']
    assert wait_for(lambda: held(metrics(offload_server)) == total, 120)
    assert metrics(offload_server)['adrenaline_kv_blocks_used{pool="executor"}'] > 0
    client.stop_stream(cancel_requests=True)
    client.close()
    for r in http_streams:
        r.close()
    started = time.monotonic()
    assert wait_for(lambda: all(metrics(offload_server)[f'adrenaline_kv_blocks_used{{pool="{p}"}}'] == 0
                                for p in ("decode", "executor")), timeout=15)
    print(f"{total} cancelled streams freed their blocks in {time.monotonic() - started:.1f}s")
    m = metrics(offload_server)
    assert m['adrenaline_requests_finished_total{reason="cancelled"}'] == total
    assert m['adrenaline_decode_requests{state="running"}'] == 0


def _stub_pid(server: Server, model: str) -> int:
    """The python-backend stub process of one model instance of this server."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(server.run_dir).encode() in a for a in args) and f"{model}_0_0".encode() in args:
            return int(proc.name)
    raise AssertionError(f"no stub process for {model}")


def test_killing_the_executor_mid_decode_moves_its_requests_to_decode(offload_server):
    prompts = ["Tell me a long story about a dragon:", "List the planets of the solar system:",
               "Write a recipe for bread:"]
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        futures = [pool.submit(stream, offload_server, p, 80) for p in prompts]
        assert wait_for(lambda: metrics(offload_server).get("adrenaline_requests_offloaded", 0) == len(prompts))
        os.kill(_stub_pid(offload_server, "attention"), signal.SIGKILL)
        results = [f.result(timeout=300) for f in futures]
    assert all(r["error"] is None and r["finish_reason"] for r in results), results
    assert metrics(offload_server)["adrenaline_offload_recovered_total"] >= 1
    # Recomputed KV gives the same continuation as an uninterrupted run (now served locally).
    for prompt, r in zip(prompts, results):
        again = generate(offload_server, {"text_input": prompt, "max_tokens": 80})
        assert again["text_output"] == r["text"]
    assert wait_for(lambda: metrics(offload_server)['adrenaline_kv_blocks_used{pool="decode"}'] == 0)


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory):
    server = _server(tmp_path_factory, "soak", offload="auto", num_decode_blocks=256, num_executor_blocks=256,
                     max_queued_requests=16, admission_timeout_s=10.0, max_decode_batch=32)
    yield server
    server.stop()


def test_overload_at_twice_capacity_for_60s_loses_nothing(soak_server):
    from adrenaline_py.serving.loadgen import measure_capacity, run_open_loop

    url = soak_server.http_url
    capacity = measure_capacity(url, concurrency=32, seconds=20)  # saturate the decode batch
    assert capacity.completed > 0 and capacity.lost == 0
    load = run_open_loop(url, rate=2 * capacity.rate, seconds=60, run_dir=soak_server.run_dir)
    print(f"capacity {capacity.rate:.2f} req/s; overload: sent {load.sent} at {2 * capacity.rate:.2f} req/s, "
          f"completed {load.completed}, errors {dict(load.errors)}, lost {load.lost}, "
          f"server RSS MB {[round(x) for x in load.rss_mb]}")
    assert load.lost == 0, load.lost_reasons
    assert load.completed + sum(load.errors.values()) == load.sent
    assert all(e.startswith(("server overloaded", "KV cache full")) for e in load.errors), load.errors
    assert wait_for(lambda: all(metrics(soak_server)[f'adrenaline_kv_blocks_used{{pool="{p}"}}'] == 0
                                for p in ("decode", "executor")))
    # Memory stays flat under sustained overload (first sample is after the capacity warm-up).
    assert load.rss_mb[-1] < 1.15 * load.rss_mb[0], load.rss_mb
