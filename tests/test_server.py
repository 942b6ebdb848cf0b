"""Through the real tritonserver 2.51 (from the nvidia-pytriton wheel) with SmolLM2-135M on CPU."""

from __future__ import annotations

import json
import queue
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import greedy, small_engine_config, start_test_server

from adrenaline_py.serving.launcher import Server

pytestmark = pytest.mark.server

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "List three primary colors:",
    "Once upon a time, in a small village near the mountains, there lived an old clockmaker who",
    "Translate to French: good morning, my friend.",
    "Les trois couleurs du drapeau français sont",
    "1, 1, 2, 3, 5, 8,",
    "Explain in one sentence why the sky is blue. The sky is blue because",
]
MAX_TOKENS = 24


def _start(tmp_path_factory, offload: str) -> Server:
    return start_test_server(tmp_path_factory.mktemp(f"server-{offload}") / "server.log", model="smollm2",
                             offload=offload, max_model_len=1024, max_tokens_limit=512, num_decode_blocks=512,
                             num_executor_blocks=512, max_decode_batch=32)


@pytest.fixture(scope="module")
def server_never(tmp_path_factory):
    server = _start(tmp_path_factory, "never")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server_always(tmp_path_factory):
    server = _start(tmp_path_factory, "always")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def engine_outputs(smollm2):
    """The engine's direct (in-process) greedy output for PROMPTS: what the server must return."""
    from adrenaline_py.engine.local import LocalEngine

    ids = [smollm2.tokenizer.encode(p) for p in PROMPTS]
    params = [greedy(MAX_TOKENS, end_ids=smollm2.tokenizer.eos_token_ids) for _ in PROMPTS]
    with LocalEngine(smollm2, small_engine_config(offload="never", max_model_len=1024)) as engine:
        return [(c.text, len(c.output_ids)) for c in engine.generate(ids, params)]


def generate(server: Server, body: dict, path: str = "generate") -> dict:
    req = urllib.request.Request(f"{server.http_url}/v2/models/ensemble/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            raw = r.read().decode()
    except urllib.error.HTTPError as e:
        raw = e.read().decode()
    if path == "generate_stream":
        return [json.loads(line[len("data: "):]) for line in raw.split("\n") if line.startswith("data: ")]
    return json.loads(raw)


def complete(server: Server, prompt: str, **kw) -> dict:
    # The continuation only: like TensorRT-LLM's, the ensemble puts the prompt in front by default.
    out = generate(server, {"text_input": prompt, "max_tokens": MAX_TOKENS, "exclude_input_in_output": True, **kw})
    assert "error" not in out, out
    return out


def grpc_stream(server: Server, prompt: str, max_tokens: int = MAX_TOKENS) -> list[dict]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.options.grpc_port}")
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))

    def tensor(name, value, dtype):
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        return t

    client.async_stream_infer("ensemble", [
        tensor("text_input", np.array([[prompt.encode()]], dtype=np.object_), "BYTES"),
        tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
        tensor("stream", np.array([[True]]), "BOOL"),
    ])
    chunks = []
    try:
        while True:
            result, error = results.get(timeout=300)
            if error is not None:
                raise AssertionError(f"stream error: {error}")
            chunk = {
                "text_output": result.as_numpy("text_output").reshape(-1)[0].decode(),
                "finish_reason": result.as_numpy("finish_reason").reshape(-1)[0].decode(),
                "num_output_tokens": int(result.as_numpy("num_output_tokens").reshape(-1)[0]),
            }
            chunks.append(chunk)
            if chunk["finish_reason"]:
                return chunks
    finally:
        client.stop_stream()
        client.close()


# --- correctness -------------------------------------------------------------------------------


def test_generate_equals_engine_direct_output(server_never, engine_outputs):
    for prompt, (text, n) in zip(PROMPTS, engine_outputs):
        out = complete(server_never, prompt)
        assert out["text_output"] == text, prompt
        assert out["num_output_tokens"] == n
        assert out["finish_reason"] in ("stop", "length")


def test_chat_question_is_answered_with_paris(server_never, smollm2):
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = complete(server_never, prompt)
    assert "Paris" in out["text_output"]
    assert out["finish_reason"] == "stop"


def test_http_stream_deltas_concatenate_to_generate_text(server_never):
    prompt = "Écris une phrase en japonais avec des emoji: 日本語 🎌"
    whole = complete(server_never, prompt)["text_output"]
    events = generate(server_never, {"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": True},
                      "generate_stream")
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == whole
    assert [e["finish_reason"] for e in events][-1] in ("stop", "length")
    assert all(e["finish_reason"] == "" for e in events[:-1])


def test_perf_analyzer_runs_against_the_ensemble(server_never, tmp_path):
    from adrenaline_py.serving.triton_runtime import TritonRuntime

    runtime = TritonRuntime.locate()
    if runtime.perf_analyzer is None:
        pytest.skip("perf_analyzer not installed (tritonclient[all])")
    if not any(Path(d, "libb64.so.0d").exists() for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")):
        pytest.skip("perf_analyzer needs Debian's libb64-0d (tools/install_system_deps.sh installs it)")
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"data": [
        {"text_input": ["The capital of France is"], "max_tokens": [8], "stream": [True]},
        {"text_input": ["def fibonacci(n):"], "max_tokens": [8], "stream": [True]},
    ]}))
    cmd = [str(runtime.perf_analyzer), "-m", "ensemble", "-i", "grpc", "--streaming",
           "-u", f"127.0.0.1:{server_never.options.grpc_port}", "--input-data", str(data),
           "--concurrency-range", "2", "--measurement-interval", "3000", "--max-trials", "6",
           "--stability-percentage", "100"]  # CI machines are noisy: we check it runs, not a rate
    env = runtime.perf_analyzer_environment(tmp_path)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Throughput" in proc.stdout


def test_sampling_controls_through_the_server(server_never, engine_outputs):
    base = engine_outputs[0][0]  # greedy continuation of PROMPTS[0], e.g. " Paris. ..."
    word = base.split()[0]
    stopped = complete(server_never, PROMPTS[0], stop_words=[word])
    assert stopped["finish_reason"] == "stop" and word not in stopped["text_output"]
    # Bad words are banned as tokenized alone, so give the word as it appears: after a space.
    bad = " " + word.strip(".,!?")
    assert base.startswith(bad)
    banned = complete(server_never, PROMPTS[0], bad_words=[bad])
    assert not banned["text_output"].startswith(bad)
    vllm_style = complete(server_never, PROMPTS[0], sampling_parameters=json.dumps({"stop": [word], "top_k": -1}))
    assert vllm_style["text_output"] == stopped["text_output"]
    sampled = [complete(server_never, PROMPTS[3], temperature=0.9, top_p=0.95, top_k=40, seed=7, min_tokens=8)
               for _ in range(2)]
    assert sampled[0]["text_output"] == sampled[1]["text_output"]  # seeded: reproducible
    assert sampled[0]["num_output_tokens"] >= 8


# --- bad input: each gets its own error, the server keeps serving ------------------------------

BAD_JSON_REQUESTS = [
    ({"max_tokens": 4}, "missing required input 'text_input'"),
    ({"text_input": "", "max_tokens": 4}, "text_input is empty"),
    ({"text_input": "word " * 1200, "max_tokens": 4}, "exceeds the context"),
    ({"text_input": "hi", "max_tokens": 0}, "max_tokens must be > 0"),
    ({"text_input": "hi", "max_tokens": -3}, "max_tokens must be > 0"),
    ({"text_input": "hi", "max_tokens": 100000}, "max_tokens must be <="),
    ({"text_input": "hi", "temperature": -0.5}, "temperature must be >= 0"),
    ({"text_input": "hi", "top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"text_input": "hi", "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"text_input": "hi", "top_k": -2}, "top_k must be >= 0"),
    ({"text_input": "hi", "sampling_parameters": "{not json"}, "sampling_parameters is not valid JSON"),
    ({"text_input": "hi", "sampling_parameters": "[1, 2]"}, "must be a JSON object"),
    ({"text_input": "hi", "sampling_parameters": '{"top_p": 2}'}, "top_p must be in (0, 1]"),
    ({"text_input": "hi", "max_tokens": "many"}, "Unable to parse"),
]


@pytest.mark.parametrize(("body", "message"), BAD_JSON_REQUESTS, ids=[m for _, m in BAD_JSON_REQUESTS])
def test_bad_json_input_gets_its_error(server_never, body, message):
    out = generate(server_never, body)
    assert message in out.get("error", ""), out


def _grpc_infer_error(server, inputs) -> str:
    return _grpc_model_error(server, "ensemble", inputs)


def test_wrong_dtype_shape_and_bytes_get_their_errors(server_never):
    text = np.array([[b"hello"]], dtype=np.object_)
    cases = [
        ([("text_input", text, "BYTES"), ("max_tokens", np.array([[4.0]], dtype=np.float32), "FP32")], "data-type"),
        ([("text_input", np.array([[1]], dtype=np.int32), "INT32")], "data-type"),
        ([("text_input", np.array([[b"a", b"b"]], dtype=np.object_), "BYTES")], "unexpected shape"),
        ([("text_input", np.array([[b"\xff\xfe bad"]], dtype=np.object_), "BYTES")], "not valid UTF-8"),
    ]
    for inputs, message in cases:
        assert message in _grpc_infer_error(server_never, inputs)
    assert complete(server_never, "The capital of France is")["text_output"]


def test_server_keeps_serving_after_bad_inputs(server_never, engine_outputs):
    for body, _ in BAD_JSON_REQUESTS:
        generate(server_never, body)
    assert complete(server_never, PROMPTS[0])["text_output"] == engine_outputs[0][0]


# --- offloading -------------------------------------------------------------------------------


def test_offload_always_gives_the_same_tokens_as_never(server_always, engine_outputs):
    for prompt, (text, n) in zip(PROMPTS, engine_outputs):
        out = complete(server_always, prompt)
        assert (out["text_output"], out["num_output_tokens"]) == (text, n), prompt
    stats = _executor_stats(server_always)
    assert stats["steps"] > 0  # the executor really served the decode attention
    assert stats["num_free_blocks"] == stats["num_blocks"]  # and every block came back


def _executor_stats(server: Server) -> dict:
    body = {"inputs": [{"name": "probe", "shape": [1], "datatype": "INT32", "data": [0]}]}
    req = urllib.request.Request(f"{server.http_url}/v2/models/attention/infer", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(json.loads(r.read())["outputs"][0]["data"][0])


def test_sixteen_concurrent_mixed_requests_complete_correctly(server_always, engine_outputs):
    prompts = (PROMPTS * 3)[:20]
    expected = (engine_outputs * 3)[:20]
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        outs = list(pool.map(lambda p: complete(server_always, p), prompts))
    for out, (text, n) in zip(outs, expected):
        assert (out["text_output"], out["num_output_tokens"]) == (text, n)


def test_grpc_stream_with_offload_concatenates_to_generate_text(server_always):
    prompt = "Write a haiku about the sea:"
    whole = complete(server_always, prompt)["text_output"]
    chunks = grpc_stream(server_always, prompt)
    assert "".join(c["text_output"] for c in chunks) == whole
    assert sum(c["num_output_tokens"] for c in chunks) == complete(server_always, prompt)["num_output_tokens"]



def test_internal_models_refuse_direct_clients(server_never):
    # prefill would write K/V into blocks the caller names; scheduler would reserve blocks forever.
    body = {"inputs": [
        {"name": "input_ids", "shape": [1, 3], "datatype": "INT32", "data": [1, 2, 3]},
        {"name": "block_table", "shape": [1, 1], "datatype": "INT32", "data": [0]},
        {"name": "kv_pool", "shape": [1, 1], "datatype": "BYTES", "data": ["decode"]},
        {"name": "generation_params", "shape": [1, 1], "datatype": "BYTES", "data": ["{}"]},
    ]}
    req = urllib.request.Request(f"{server_never.http_url}/v2/models/prefill/infer", data=json.dumps(body).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=60)
    assert "internal to the server" in refused.value.read().decode()
    error = _grpc_model_error(server_never, "scheduler", [
        ("input_ids", np.array([[1, 2, 3]], dtype=np.int32), "INT32"),
        ("generation_params", np.array([[b"{}"]], dtype=np.object_), "BYTES"),
    ])
    assert "internal to the server" in error


def _grpc_model_error(server, model: str, inputs) -> str:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.options.grpc_port}")
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        tensors = []
        for name, value, dtype in inputs:
            t = grpcclient.InferInput(name, list(value.shape), dtype)
            t.set_data_from_numpy(value)
            tensors.append(t)
        client.async_stream_infer(model, tensors)
        _, error = results.get(timeout=120)
        return str(error) if error is not None else ""
    finally:
        client.stop_stream()
        client.close()
