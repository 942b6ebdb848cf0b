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
from conftest import start_test_server
from test_server import generate

from adrenaline_py.serving.launcher import Server

pytestmark = pytest.mark.server


def _server(tmp_path_factory, name: str, **engine) -> Server:
    return start_test_server(tmp_path_factory.mktemp(name) / "server.log", model="smollm2", max_model_len=1024,
                             max_tokens_limit=512, **engine)


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


def _timed_stream(server: Server, prompt: str, max_tokens: int) -> dict:
    r = stream(server, prompt, max_tokens)
    return {**r, "done_at": time.monotonic()}


def test_running_requests_are_not_corrupted_while_the_pools_are_full(small_pools_server):
    server = small_pools_server
    probes = ["Tell me a long story about a dragon:", "List the planets of the solar system:",
              "Write a recipe for bread:", "Explain how a bicycle works:"]
    alone = {p: stream(server, p, 64)["text"] for p in probes}  # one at a time: the reference
    assert wait_for(lambda: _pools_empty(server))
    with ThreadPoolExecutor(max_workers=len(probes) + 40) as pool:
        running = [pool.submit(_timed_stream, server, p, 64) for p in probes]
        assert wait_for(lambda: _held(metrics(server)) == len(probes))
        # 40 more than the pools hold (about 16 of this size): they wait, are rejected, or run
        flood = [pool.submit(_timed_stream, server, f"Request {i}: write a short poem about the number {i}.", 64)
                 for i in range(40)]
        results = [f.result(timeout=300) for f in running]
        flooded = [f.result(timeout=300) for f in flood]
    rejected = [r for r in flooded if r["error"]]
    assert rejected and all(re.search(r"server overloaded|KV cache full", r["error"]) for r in rejected), rejected
    assert min(r["done_at"] for r in rejected) < max(r["done_at"] for r in results)  # while the probes ran
    assert all(r["finish_reason"] in ("stop", "length") for r in flooded if not r["error"])
    for prompt, r in zip(probes, results):
        assert r["error"] is None and r["text"] == alone[prompt], prompt
    assert wait_for(lambda: _pools_empty(server))
    print(f"pools full: {len(probes)} running requests kept their exact text while {len(rejected)} of "
          f"{len(flooded)} more were rejected and {len(flooded) - len(rejected)} waited or ran")


@pytest.fixture(scope="module")
def offload_server(tmp_path_factory):
    # ratio:0.5 offloads every other request, so both pools hold requests and local requests keep
    # streaming while the executor is killed. Room for 200 requests of up to 500 tokens in all.
    server = _server(tmp_path_factory, "faults", offload="ratio:0.5", num_decode_blocks=3300,
                     num_executor_blocks=3300, max_decode_batch=32)
    yield server
    server.stop()


def _open_stream(server: Server, prompt: str, max_tokens: int):
    body = json.dumps({"text_input": prompt, "max_tokens": max_tokens, "stream": True}).encode()
    response = urllib.request.urlopen(urllib.request.Request(
        f"{server.http_url}/v2/models/ensemble/generate_stream", data=body), timeout=120)
    response.readline()  # the first event arrived: the request is decoding
    return response


def _grpc_inputs(prompt: str, max_tokens: int) -> list:
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value, dtype in (("text_input", np.array([[prompt.encode()]], dtype=np.object_), "BYTES"),
                               ("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
                               ("stream", np.array([[True]]), "BOOL")):
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    return inputs


def _held(m: dict[str, float]) -> float:
    return m['adrenaline_decode_requests{state="running"}'] + m['adrenaline_decode_requests{state="waiting"}']


def _pools_empty(server: Server) -> bool:
    m = metrics(server)
    return all(m[f'adrenaline_kv_blocks_used{{pool="{p}"}}'] == 0 for p in ("decode", "executor"))


def test_200_cancelled_streams_free_their_kv_blocks_in_both_pools(offload_server):
    import tritonclient.grpc as grpcclient

    num_grpc_streams, per_stream, num_http = 5, 20, 100
    total = num_grpc_streams * per_stream + num_http
    max_tokens = 500  # none may finish before all 200 are decoding
    assert _pools_empty(offload_server)
    reasons = ("cancelled", "stop", "length", "error")
    m0 = metrics(offload_server)
    before = {r: m0.get(f'adrenaline_requests_finished_total{{reason="{r}"}}', 0) for r in reasons}
    started = time.monotonic()
    clients, errors = [], []
    for s in range(num_grpc_streams):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{offload_server.options.grpc_port}")
        client.start_stream(callback=lambda result, error: errors.append(error) if error is not None else None)
        for i in range(per_stream):
            client.async_stream_infer("ensemble", _grpc_inputs(f"Story {s}.{i}:", max_tokens))
        clients.append(client)
    with ThreadPoolExecutor(max_workers=num_http) as pool:
        http_streams = list(pool.map(lambda i: _open_stream(offload_server, f"Poem {i}:", max_tokens),
                                     range(num_http)))
    assert wait_for(lambda: _held(metrics(offload_server)) == total, 120), metrics(offload_server)
    admitted_s = time.monotonic() - started
    m = metrics(offload_server)
    assert m['adrenaline_kv_blocks_used{pool="executor"}'] > 0 and m['adrenaline_kv_blocks_used{pool="decode"}'] > 0
    assert not errors, errors  # no request failed before the cancellation
    for client in clients:
        client.stop_stream(cancel_requests=True)
        client.close()
    for r in http_streams:
        r.close()
    cancelled = time.monotonic()
    assert wait_for(lambda: _pools_empty(offload_server), timeout=30)
    freed_s = time.monotonic() - cancelled
    print(f"{total} streams decoding after {admitted_s:.1f}s; cancelled, their blocks were free in both pools "
          f"after {freed_s:.1f}s")
    m = metrics(offload_server)
    ended = {r: m.get(f'adrenaline_requests_finished_total{{reason="{r}"}}', 0) - before[r] for r in reasons}
    # each request ended once: cancelled, or (a real model) by its end token between being held and the
    # cancellation; none failed
    assert sum(ended.values()) == total and ended["error"] == 0, ended
    assert ended["cancelled"] >= total - 5, ended
    assert _held(m) == 0


def _worker_pid(server: Server, role: str) -> int:
    """The worker process (backends/adrenaline/worker.py) that a role's stub supervises."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if (state != "Z" and len(args) > 3 and args[1].endswith(b"worker.py") and args[2] == role.encode()
                and args[3].startswith(str(server.run_dir).encode())):
            return int(proc.name)
    raise AssertionError(f"no {role} worker process")


def _restarted(server: Server, role: str, restarts_before: float) -> bool:
    m = metrics(server)
    return (m.get(f'adrenaline_worker_restarts_total{{model="{role}"}}', 0) > restarts_before
            and m[f'adrenaline_worker_up{{model="{role}"}}'] == 1)


def _collect_streams(server: Server, prompts: list[str], max_tokens: int) -> list[dict]:
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(lambda p: stream(server, p, max_tokens), prompts))


FAULT_PROMPTS = ["Tell me a long story about a dragon:", "List the planets of the solar system:",
                 "Write a recipe for bread:", "Explain how a bicycle works:", "Describe the city of Paris:",
                 "Write a letter to a friend about summer:"]


@pytest.fixture(scope="module")
def reference_texts(offload_server) -> dict[str, str]:
    """Each fault prompt's greedy text of 80 tokens, alone and uninterrupted."""
    body = {"max_tokens": 80, "exclude_input_in_output": True}  # the streamed text never has the prompt
    return {p: generate(offload_server, {"text_input": p, **body})["text_output"] for p in FAULT_PROMPTS}


def test_killing_the_executor_mid_decode_recovers_and_offloads_again(offload_server, reference_texts):
    server = offload_server
    m0 = metrics(server)
    restarts = m0.get('adrenaline_worker_restarts_total{model="attention"}', 0)
    recovered = m0["adrenaline_offload_recovered_total"]
    old_pid = _worker_pid(server, "attention")
    with ThreadPoolExecutor(max_workers=2 * len(FAULT_PROMPTS)) as pool:
        futures = [pool.submit(stream, server, p, 80) for p in FAULT_PROMPTS]
        # ratio:0.5: half of them decode locally and must keep streaming through the fault
        assert wait_for(lambda: metrics(server)["adrenaline_requests_offloaded"] >= 2
                        and _held(metrics(server)) == len(FAULT_PROMPTS))
        os.kill(old_pid, signal.SIGKILL)
        killed = time.monotonic()
        # arriving while the executor is down or restarting: admitted locally, or to a generation
        # that dies before their prefill (admitted again), or offloaded to the new one
        futures += [pool.submit(stream, server, p, 80) for p in FAULT_PROMPTS]
        assert wait_for(lambda: _restarted(server, "attention", restarts), timeout=120)
        restart_s = time.monotonic() - killed
        results = [f.result(timeout=300) for f in futures]
    # Offloaded requests were recomputed locally and finished: same text as an uninterrupted run.
    for prompt, r in zip(FAULT_PROMPTS * 2, results):
        assert r["error"] is None and r["finish_reason"], r
        assert r["text"] == reference_texts[prompt], prompt
    assert metrics(server)["adrenaline_offload_recovered_total"] > recovered
    assert _worker_pid(server, "attention") != old_pid
    # The restarted executor has a fresh pool, and new requests are offloaded to it again.
    before = metrics(server)
    stats_before = _executor_stats(server)
    assert stats_before["generation"] == 2 and stats_before["num_free_blocks"] == stats_before["num_blocks"]
    again = _collect_streams(server, FAULT_PROMPTS, 80)
    for prompt, r in zip(FAULT_PROMPTS, again):
        assert r["error"] is None and r["text"] == reference_texts[prompt], (prompt, r)
    after = metrics(server)
    assert (after['adrenaline_admitted_total{pool="executor"}'] - before['adrenaline_admitted_total{pool="executor"}']
            >= len(FAULT_PROMPTS) // 2)
    assert _executor_stats(server)["steps"] > stats_before["steps"]  # the new executor served them
    assert wait_for(lambda: _pools_empty(server))
    stats = _executor_stats(server)
    assert stats["num_free_blocks"] == stats["num_blocks"]
    print(f"executor worker killed; restarted and serving again after {restart_s:.1f}s")


def test_killing_the_prefill_worker_recovers(offload_server, reference_texts):
    server = offload_server
    restarts = metrics(server).get('adrenaline_worker_restarts_total{model="prefill"}', 0)
    old_pid = _worker_pid(server, "prefill")
    with ThreadPoolExecutor(max_workers=2 * len(FAULT_PROMPTS)) as pool:
        decoding = [pool.submit(stream, server, p, 80) for p in FAULT_PROMPTS[:3]]
        assert wait_for(lambda: _held(metrics(server)) == 3)
        # these are in preprocessing, admission or prefill when the worker dies
        arriving = [pool.submit(stream, server, p, 80) for p in FAULT_PROMPTS[3:]]
        os.kill(old_pid, signal.SIGKILL)
        killed = time.monotonic()
        later = [pool.submit(stream, server, p, 80) for p in FAULT_PROMPTS[:3]]  # wait for the new worker
        assert wait_for(lambda: _restarted(server, "prefill", restarts), timeout=240)
        restart_s = time.monotonic() - killed
        results = [f.result(timeout=300) for f in decoding + arriving + later]
    for prompt, r in zip(FAULT_PROMPTS + FAULT_PROMPTS[:3], results):
        assert r["error"] is None and r["text"] == reference_texts[prompt], (prompt, r)
    assert _worker_pid(server, "prefill") != old_pid
    ok = generate(server, {"text_input": FAULT_PROMPTS[0], "max_tokens": 80, "exclude_input_in_output": True})
    assert ok["text_output"] == reference_texts[FAULT_PROMPTS[0]]
    assert wait_for(lambda: _pools_empty(server))
    print(f"prefill worker killed; restarted and serving again after {restart_s:.1f}s")


def _executor_stats(server: Server) -> dict:
    body = {"inputs": [{"name": "probe", "shape": [1], "datatype": "INT32", "data": [0]}]}
    req = urllib.request.Request(f"{server.http_url}/v2/models/attention/infer", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(json.loads(r.read())["outputs"][0]["data"][0])


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
