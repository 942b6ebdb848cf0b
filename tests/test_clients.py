"""The published client scripts of the TensorRT-LLM and vLLM backends, unmodified
(tests/fixtures/clients/, releases named there), against the real server with SmolLM2-135M on CPU,
plus the parts of both conventions the scripts do not reach (tritonclient and HTTP directly).

Expected texts come from the in-process engine (LocalEngine), not from the server.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import start_test_server

from adrenaline_py.request import GenerationParams, OutputOptions, SamplingParams
from adrenaline_py.serving.launcher import Server, name_vllm_model

CLIENTS = Path(__file__).parent / "fixtures" / "clients"
TRTLLM_RELEASES = ["v0.14.0", "v0.19.0"]
VLLM_RELEASES = ["r24.10", "r25.12"]
PROMPT = "The capital of France is"
BATCH = ["This is a test", "I want you to", "The cat is"]
PENALTIES = {"repetition_penalty": 1.3, "presence_penalty": 0.4, "frequency_penalty": 0.3}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_test_server(tmp_path_factory.mktemp("clients") / "server.log", model="smollm2", offload="never",
                          max_model_len=1024, max_tokens_limit=512, num_decode_blocks=512, num_executor_blocks=512,
                          max_decode_batch=32)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(smollm2):
    """Greedy continuations from the in-process engine: {(prompt, max_tokens, penalized): text}."""
    from conftest import small_engine_config

    from adrenaline_py.engine.local import LocalEngine

    tok = smollm2.tokenizer
    cases = [(PROMPT, 16, False), (PROMPT, 16, True), *((p, 5, False) for p in BATCH)]
    # TensorRT-LLM's greedy (top_k 1) at the client's temperature 1.0, its penalty convention.
    params = [GenerationParams(SamplingParams(max_tokens=n, temperature=1.0, top_k=1, end_ids=tok.eos_token_ids,
                                              **(PENALTIES if pen else {})), OutputOptions())
              for _, n, pen in cases]
    with LocalEngine(smollm2, small_engine_config(offload="never", max_model_len=1024)) as engine:
        done = engine.generate([tok.encode(p) for p, _, _ in cases], params)
    return {case: c.text for case, c in zip(cases, done)}


def run_script(path: Path, *args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


# --- TensorRT-LLM backend: inflight_batcher_llm/client/end_to_end_grpc_client.py -----------------

def trtllm_client(server: Server, release: str, *args: str) -> str:
    return run_script(CLIENTS / f"tensorrtllm_backend-{release}" / "end_to_end_grpc_client.py",
                      "-u", f"127.0.0.1:{server.options.grpc_port}", *args)


@pytest.mark.server
@pytest.mark.parametrize("release", TRTLLM_RELEASES)
@pytest.mark.parametrize("mode", ["plain", "streaming", "penalties", "batch-inputs"])
def test_trtllm_end_to_end_client_passes_its_output_check(server, reference, release, mode):
    # Non-streamed output starts with the prompt (TensorRT-LLM's exclude_input_in_output default);
    # v0.19.0 adds the prompt to the expected text itself, v0.14.0 compares as given.
    echo = release == "v0.14.0" and mode != "streaming"
    if mode == "batch-inputs":
        expected = [(p if echo else "") + reference[(p, 5, False)] for p in BATCH]
        args = ["-o", "5", "-p", json.dumps(BATCH), "--batch-inputs"]
    else:
        expected = [(PROMPT if echo else "") + reference[(PROMPT, 16, mode == "penalties")]]
        args = ["-o", "16", "-p", PROMPT]
        args += {"plain": [], "streaming": ["--streaming"],
                 "penalties": [f"--{k.replace('_', '-')}={v}" for k, v in PENALTIES.items()]}[mode]
    out = trtllm_client(server, release, *args, "--check-outputs", "--expected-outputs", json.dumps(expected))
    assert "error" not in out.lower(), out


@pytest.mark.server
def test_trtllm_client_exclude_input_in_output(server, reference):
    expected = [reference[(PROMPT, 16, False)]]
    trtllm_client(server, "v0.19.0", "-o", "16", "-p", PROMPT, "--exclude-input-in-output",
                  "--check-outputs", "--expected-outputs", json.dumps(expected))


@pytest.mark.server
@pytest.mark.parametrize(("flag", "message"), [
    ("--beam-width=2", "beam_width=2 is not supported (beam search is not implemented)"),
    ("--num-return-sequences=2", "num_return_sequences=2 is not supported"),
    ("--return-log-probs", "return_log_probs=True is not supported (log probabilities are not returned)"),
    ("--return-context-logits", "return_context_logits=True is not supported"),
    ("--return-generation-logits", "return_generation_logits=True is not supported"),
    ("--return-perf-metrics", "return_perf_metrics=True is not supported"),
])
def test_trtllm_client_options_that_cannot_be_honoured_get_a_clear_error(server, flag, message):
    out = trtllm_client(server, "v0.19.0", "-o", "4", "-p", PROMPT, flag)
    assert "Received an error from server" in out and message in out, out


# --- vLLM backend: samples/client.py -------------------------------------------------------------

def results_of(path: Path) -> list[str]:
    """The client's results file: one block per prompt, separated by its ========= lines."""
    blocks = path.read_text().split("\n=========\n\n")
    assert blocks[-1] == "", blocks
    return blocks[:-1]


@pytest.mark.server
@pytest.mark.parametrize("release", VLLM_RELEASES)
@pytest.mark.parametrize("streaming", [False, True], ids=["generate", "streaming"])
def test_vllm_sample_client_passes(server, tmp_path, release, streaming):
    folder = CLIENTS / f"vllm_backend-{release}"
    results = tmp_path / "results.txt"
    args = ["-s", "--exclude-inputs-in-outputs"] if streaming else []
    out = run_script(folder / "client.py", "-u", f"127.0.0.1:{server.options.grpc_port}",
                     "--input-prompts", str(folder / "prompts.txt"), "--results-file", str(results), *args)
    assert "PASS: vLLM example" in out and "error" not in out.lower(), out
    prompts = (folder / "prompts.txt").read_text().splitlines(keepends=True)
    blocks = results_of(results)
    assert len(blocks) == len(prompts)
    for prompt, block in zip(prompts, blocks):
        # Not streamed: the prompt (with its newline) leads, as the vLLM backend sends it.
        assert block.startswith(prompt) != streaming, block
        assert len(block) > len(prompt), block  # sampled text, at temperature 0.1: not checked word by word


@pytest.mark.server
def test_vllm_sample_client_streaming_without_excluding_the_input_fails_as_with_vllm(server, tmp_path):
    folder = CLIENTS / "vllm_backend-r25.12"
    out = run_script(folder / "client.py", "-u", f"127.0.0.1:{server.options.grpc_port}", "-s",
                     "--input-prompts", str(folder / "prompts.txt"), "--results-file", str(tmp_path / "r.txt"))
    assert "When streaming, `exclude_input_in_output` = False is not allowed." in out
    assert "FAIL: vLLM example" in out


# --- the rest of both conventions, with tritonclient and HTTP ------------------------------------

def tensor(name: str, value: np.ndarray):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    t = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
    t.set_data_from_numpy(value)
    return t


def grpc_responses(server: Server, model: str, inputs: dict[str, np.ndarray], stop_after: int | None = None):
    """(results, error) of one request on a gRPC stream; with stop_after, the stream is cancelled
    after that many responses."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.options.grpc_port}")
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    results = []
    try:
        client.async_stream_infer(model, [tensor(k, v) for k, v in inputs.items()], enable_empty_final_response=True)
        while True:
            result, error = got.get(timeout=300)
            if error is not None:
                return results, str(error)
            response = result.get_response()
            if response.outputs:
                results.append(result)
            if stop_after is not None and len(results) >= stop_after:
                client.stop_stream(cancel_requests=True)
                return results, None
            if response.parameters["triton_final_response"].bool_param:
                return results, None
    finally:
        client.stop_stream()
        client.close()


def http_generate(server: Server, model: str, body: dict) -> dict:
    req = urllib.request.Request(f"{server.http_url}/v2/models/{model}/generate", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def metrics(server: Server) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.options.metrics_port}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if line.startswith("adrenaline_"))}


def kv_used(server: Server) -> float:
    return metrics(server)['adrenaline_kv_blocks_used{pool="decode"}']


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def b(text: str) -> np.ndarray:
    return np.array([[text.encode()]], dtype=np.object_)


@pytest.mark.server
def test_ensemble_output_shapes_are_tensorrt_llms(server, reference):
    results, error = grpc_responses(server, "ensemble", {
        "text_input": b(PROMPT), "max_tokens": np.array([[16]], dtype=np.int32),
        "temperature": np.array([[1.0]], dtype=np.float32), "exclude_input_in_output": np.array([[True]])})
    assert error is None and len(results) == 1
    r = results[0]
    assert r.as_numpy("text_output").shape == (1,)  # output[0].decode() works, as with TensorRT-LLM
    assert r.as_numpy("text_output")[0].decode() == reference[(PROMPT, 16, False)]
    assert r.as_numpy("finish_reason").shape == (1, 1) and r.as_numpy("batch_index").tolist() == [[0]]


@pytest.mark.server
def test_ensemble_echoes_the_prompt_by_default_but_never_in_a_stream(server, reference):
    whole = http_generate(server, "ensemble", {"text_input": PROMPT, "max_tokens": 16})
    assert whole["text_output"] == PROMPT + reference[(PROMPT, 16, False)]
    results, error = grpc_responses(server, "ensemble", {
        "text_input": b(PROMPT), "max_tokens": np.array([[16]], dtype=np.int32), "stream": np.array([[True]])})
    assert error is None
    assert "".join(r.as_numpy("text_output")[0].decode() for r in results) == reference[(PROMPT, 16, False)]


@pytest.mark.server
def test_a_failing_row_of_a_batch_fails_the_request_and_frees_the_others(server):
    results, error = grpc_responses(server, "ensemble", {
        "text_input": np.array([[b"One"], [b"Two"]], dtype=np.object_),
        "max_tokens": np.array([[8], [100000]], dtype=np.int32)})
    assert results == [] and "batch_index 1: max_tokens must be <=" in error
    time.sleep(2.5)  # two metric periods: row 0's blocks were reserved and prefilled, then given back
    assert kv_used(server) == 0


@pytest.mark.server
def test_vllm_model_takes_request_parameters_with_string_values(server, reference):
    out = http_generate(server, "vllm_model", {
        "text_input": PROMPT, "exclude_input_in_output": True, "return_finish_reason": True,
        "return_num_input_tokens": True, "return_num_output_tokens": True,
        "parameters": {"temperature": "0", "max_tokens": "16"}})
    assert out["text_output"] == reference[(PROMPT, 16, False)], out
    assert (out["finish_reason"], out["num_input_tokens"], out["num_output_tokens"]) == ("length", 5, 16)
    # Without exclude_input_in_output the prompt leads, as with the vLLM backend.
    out = http_generate(server, "vllm_model", {"text_input": PROMPT,
                                               "sampling_parameters": '{"temperature": 0, "max_tokens": 16}'})
    assert out["text_output"] == PROMPT + reference[(PROMPT, 16, False)]
    assert "finish_reason" not in out  # only on request, as the vLLM backend


@pytest.mark.server
def test_vllm_model_stream_with_its_optional_outputs(server, reference):
    results, error = grpc_responses(server, "vllm_model", {
        "text_input": np.array([PROMPT.encode()], dtype=np.object_), "stream": np.array([True]),
        "exclude_input_in_output": np.array([True]), "return_finish_reason": np.array([True]),
        "return_num_output_tokens": np.array([True]),
        "sampling_parameters": np.array([json.dumps({"temperature": "0", "max_tokens": "16"}).encode()],
                                        dtype=np.object_)})
    assert error is None and len(results) > 1
    assert all(r.as_numpy("text_output").shape == (1,) for r in results)
    assert "".join(r.as_numpy("text_output")[0].decode() for r in results) == reference[(PROMPT, 16, False)]
    reasons = [r.as_numpy("finish_reason")[0].decode() for r in results]
    assert set(reasons[:-1]) == {"None"} and reasons[-1] == "length"  # str(None) until the end, as vLLM's
    counts = [r.as_numpy("num_output_tokens") for r in results]
    assert all(c.dtype == np.uint32 for c in counts) and sum(int(c[0]) for c in counts) == 16


@pytest.mark.server
@pytest.mark.parametrize(("inputs", "message"), [
    ({"return_logprobs": np.array([True])}, "return_logprobs is not supported"),
    ({"return_cumulative_logprob": np.array([True])}, "return_cumulative_logprob is not supported"),
    ({"stream": np.array([True]), "exclude_input_in_output": np.array([False])},
     "When streaming, `exclude_input_in_output` = False is not allowed."),
    ({"sampling_parameters": np.array([b'{"max_tokens": "many"}'], dtype=np.object_)},
     "sampling_parameters.max_tokens must be an integer, got 'many'"),
])
def test_vllm_model_errors(server, inputs, message):
    _, error = grpc_responses(server, "vllm_model", {"text_input": np.array([b"hi"], dtype=np.object_), **inputs})
    assert error is not None and message in error, error


@pytest.mark.server
def test_vllm_model_cancelled_stream_frees_its_kv_blocks(server):
    assert wait_for(lambda: kv_used(server) == 0)

    def cancelled() -> float:
        return metrics(server).get('adrenaline_requests_finished_total{reason="cancelled"}', 0)

    before = cancelled()
    results, error = grpc_responses(server, "vllm_model", {
        "text_input": np.array([b"Tell a long story:"], dtype=np.object_), "stream": np.array([True]),
        "exclude_input_in_output": np.array([True]),
        "sampling_parameters": np.array([b'{"max_tokens": 500, "ignore_eos": true}'], dtype=np.object_)},
        stop_after=2)
    assert error is None and len(results) == 2
    # 500 tokens take far longer than this on CPU: the request ends because it was cancelled.
    assert wait_for(lambda: cancelled() == before + 1, timeout=10)
    assert wait_for(lambda: kv_used(server) == 0, timeout=5)


def test_vllm_model_name_is_configurable(tmp_path):
    for name in ("my_vllm", "", "vllm_model"):
        repo = tmp_path / (name or "none")
        (repo / "vllm_model" / "1").mkdir(parents=True)
        (repo / "ensemble").mkdir()
        name_vllm_model(repo, name)
        assert sorted(p.name for p in repo.iterdir()) == sorted({"ensemble", *([name] if name else [])})
    with pytest.raises(ValueError, match="not a free model name"):
        repo = tmp_path / "clash"
        (repo / "vllm_model").mkdir(parents=True)
        (repo / "ensemble").mkdir()
        name_vllm_model(repo, "ensemble")
