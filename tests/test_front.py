"""The HTTP front (adrenaline_py/serving/front.py): crash guards, the streaming proxy, the OpenAI API.

Three layers:
- the JSON depth scanner against a plain reference scanner (no server);
- the front in this process before a fake tritonserver (request mapping, errors, proxy fidelity);
- the launcher's server (real tritonserver 2.51, SmolLM2, front on by default): the inputs that
  crash 2.51 are refused and the server keeps serving, a bounded fuzz around the limits, streaming
  through the front, the official `openai` client, and the launcher restarting a crashed
  tritonserver and a killed front (dummy:tiny).
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import random
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_ports, start_test_server

from adrenaline_py.serving.front import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_JSON_DEPTH,
    FrontConfig,
    json_nesting_depth,
    serve,
)
from adrenaline_py.serving.grpc_front import DEFAULT_MAX_MESSAGE_BYTES
from adrenaline_py.serving.launcher import ServerOptions

# --- the depth scanner --------------------------------------------------------------------------------


def parser_depth(data: bytes) -> int:
    """Reference: the deepest nesting a left-to-right JSON parser reaches before its first structural
    error (a backslash outside a string, a closing bracket with nothing open)."""
    depth = best = 0
    in_str = esc = False
    for c in data:
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:
                esc = True
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c == 0x5C:
            return best
        elif c in b"[{":
            depth += 1
            best = max(best, depth)
        elif c in b"]}":
            depth -= 1
            if depth < 0:
                return best
    return best


def random_value(rng: random.Random, depth: int) -> object:
    nasty = ['"', "\\", "[", "]", "{", "}", "\\\"", "\\\\", "a", "é", "\n", "\\\\\"", "[[{"]
    kind = rng.random()
    if depth <= 0 or kind < 0.3:
        return rng.choice([1, -2.5, True, None, "".join(rng.choices(nasty, k=rng.randint(0, 6)))])
    if kind < 0.65:
        return [random_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {"".join(rng.choices(nasty, k=rng.randint(0, 4))): random_value(rng, depth - 1)
            for _ in range(rng.randint(0, 3))}


def true_depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((true_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((true_depth(v) for v in value.values()), default=0)
    return 0


def test_depth_of_valid_json_and_of_its_prefixes_is_exact():
    rng = random.Random(1234)
    for _ in range(1500):
        value = random_value(rng, rng.randint(0, 40))
        data = json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()
        assert json_nesting_depth(data) == true_depth(value) == parser_depth(data), data
        cut = data[: rng.randint(0, len(data))]  # a truncated body: the parser gets this deep before failing
        assert json_nesting_depth(cut) == parser_depth(cut), cut


def test_depth_of_garbage_is_never_below_what_a_parser_reaches():
    rng = random.Random(99)
    alphabet = b'[]{}"\\a ,:'
    for _ in range(3000):
        data = bytes(rng.choices(alphabet, k=rng.randint(0, 80)))
        assert json_nesting_depth(data) >= parser_depth(data), data


def test_depth_of_the_crashing_and_the_tricky_bodies():
    assert json_nesting_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000
    assert json_nesting_depth(b'{"a": "[[[[[[[[[["}') == 1            # brackets in a string
    assert json_nesting_depth(b'{"a": "\\"[[[[[["}') == 1             # an escaped quote does not end it
    assert json_nesting_depth(b'{"a": "\\\\", "b": [[[]]]}') == 4    # an escaped backslash does
    assert json_nesting_depth(b'"\\\\\\"[[["') == 0
    assert json_nesting_depth(b"") == json_nesting_depth(b"plain text") == 0


def test_depth_scan_of_a_worst_case_body_is_fast():
    body = b"[]" * (DEFAULT_MAX_BODY_BYTES // 2)  # 1 MiB of brackets that never nest
    t0 = time.perf_counter()
    assert json_nesting_depth(body) == 1
    took = time.perf_counter() - t0
    print(f"\n1 MiB of '[]': scanned in {took * 1e3:.1f} ms")
    assert took < 1.0


def test_front_defaults_are_the_launcher_and_cli_defaults(monkeypatch):
    import adrenaline_py.serving.launcher as launcher
    from adrenaline_py.cli import main

    o = ServerOptions()
    assert o.front and o.http_max_body_bytes == DEFAULT_MAX_BODY_BYTES
    assert o.http_max_json_depth == DEFAULT_MAX_JSON_DEPTH
    assert DEFAULT_MAX_BODY_BYTES < 4_000_000  # tritonserver 2.51 crashes at 4 MB
    seen: dict[str, list] = {"o": []}
    monkeypatch.setattr(launcher, "serve_forever", lambda engine, options: seen["o"].append(options) or 0)
    assert main(["serve"]) == 0
    o = seen["o"][-1]
    assert (o.front, o.http_max_body_bytes, o.http_max_json_depth, o.served_model_name) == \
        (True, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_DEPTH, None)
    assert main(["serve", "--no-front", "--http-max-body-bytes", "1000", "--http-max-json-depth", "8",
                 "--served-model-name", "m", "--max-restarts", "2"]) == 0
    o = seen["o"][-1]
    assert (o.front, o.http_max_body_bytes, o.http_max_json_depth, o.served_model_name, o.max_restarts) == \
        (False, 1000, 8, "m", 2)
    assert ServerOptions().grpc_max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert FrontConfig("x").max_grpc_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert main(["serve", "--grpc-max-message-bytes", "65536"]) == 0 and seen["o"][-1].grpc_max_message_bytes == 65536


def test_restart_budget_allows_a_bounded_number_per_window():
    from adrenaline_py.serving.launcher import RestartBudget

    budget = RestartBudget(2, window_s=0.3)
    assert [budget.take(), budget.take(), budget.take()] == [1, 2, None]
    time.sleep(0.35)
    assert budget.take() == 1


# --- the front in this process, before a fake tritonserver ---------------------------------------------


class FakeTriton:
    """Echoes what reached it; `ensemble`'s generate endpoints answer from the prompt:
    "ERROR" → a 400 error, "OVERLOAD" → `server overloaded`, else the sampling parameters as text."""

    def __init__(self) -> None:
        self.requests: list[dict] = []

    def app(self):
        from aiohttp import web

        async def generate(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.requests.append({"path": request.path, "body": body, "headers": dict(request.headers)})
            prompt = body["text_input"]
            stream = request.path.endswith("generate_stream")
            error = ("max_tokens must be > 0, got 0" if "ERROR" in prompt
                     else "server overloaded: 9 requests waiting" if "OVERLOAD" in prompt else None)
            if not stream:
                if error:
                    return web.json_response({"error": error}, status=400)
                return web.json_response({"text_output": [body["sampling_parameters"]], "finish_reason": "stop",
                                          "num_input_tokens": 7, "num_output_tokens": 3})
            resp = web.StreamResponse(status=400 if error else 200,
                                      headers={"Content-Type": "text/event-stream; charset=utf-8"})
            await resp.prepare(request)
            if error:
                await resp.write(b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
            else:
                pieces = ["a", "", "b", "c"] + (["MIDERR"] if "MIDSTREAM" in prompt else [])
                for i, t in enumerate(pieces):
                    ev = ({"error": "engine failure"} if t == "MIDERR" else
                          {"text_output": t, "num_input_tokens": 7, "num_output_tokens": 1 if t else 0,
                           "finish_reason": "length" if i == len(pieces) - 1 else ""})
                    await resp.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
            await resp.write_eof()
            return resp

        async def echo(request: web.Request) -> web.Response:
            raw = await request.read()
            return web.json_response({"method": request.method, "raw_path": request.raw_path,
                                      "headers": [[k, v] for k, v in request.headers.items()],
                                      "body_len": len(raw), "body_head": raw[:64].decode(errors="replace")},
                                     headers={"X-Upstream": "fake"})

        async def config(request: web.Request) -> web.Response:
            return web.json_response({"name": "ensemble", "input": [
                {"name": "text_input", "data_type": "TYPE_STRING"}, {"name": "max_tokens", "data_type": "TYPE_INT32"},
                {"name": "random_seed", "data_type": "TYPE_UINT64"}]})

        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/v2/models/ensemble/config", config)
        app.router.add_post("/v2/models/ensemble/generate", generate)
        app.router.add_post("/v2/models/ensemble/generate_stream", generate)
        app.router.add_route("*", "/{tail:.*}", echo)
        return app


class InProcess:
    """A fake tritonserver and a front (model smollm2: its tokenizer and chat template) on one event loop
    in a thread. ``upstream``: point the front elsewhere instead of at the fake."""

    def __init__(self, upstream: str | None = None, model: str = "smollm2") -> None:
        self.fake = FakeTriton()
        self.fake_port, self.port = free_ports(2)
        self.config = FrontConfig(upstream=upstream or f"http://127.0.0.1:{self.fake_port}", port=self.port,
                                  model=model, served_model_name="smollm2", max_model_len=1024,
                                  max_tokens_limit=512)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(30)

    async def _main(self) -> None:
        from aiohttp import web

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.fake.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.fake_port).start()
        started = asyncio.Event()
        task = asyncio.create_task(serve(self.config, started, self._stop))
        await started.wait()
        self._ready.set()
        await task
        await runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def request(url: str, method: str = "GET", body: bytes | dict | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, bytes, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.fixture(scope="module")
def fake():
    pytest.importorskip("aiohttp")
    front = InProcess()
    yield front
    front.close()


def test_proxy_forwards_method_path_query_headers_and_body_unchanged(fake):
    body = b'{"inputs": [{"name": "x", "data": ["[{\\"]"]}]}'
    status, raw, headers = request(f"{fake.url}/v2/models/m%20x/versions/1/infer?a=1&b=%2F", "POST", body,
                                   {"X-Adrenaline-Api-Key": "k" * 20, "X-Custom": "v", "Content-Type": "a/b"})
    echo = json.loads(raw)
    assert status == 200 and headers.get("X-Upstream") == "fake"
    assert echo["method"] == "POST" and echo["raw_path"] == "/v2/models/m%20x/versions/1/infer?a=1&b=%2F"
    sent = {k.lower(): v for k, v in echo["headers"]}
    assert sent["x-adrenaline-api-key"] == "k" * 20 and sent["x-custom"] == "v" and sent["content-type"] == "a/b"
    assert echo["body_len"] == len(body) and echo["body_head"] == body[:64].decode()
    for method in ("GET", "DELETE", "PUT"):
        assert json.loads(request(f"{fake.url}/v2/x", method)[1])["method"] == method


def test_proxy_never_leaves_the_upstream_host(fake):
    # An absolute-form target or a path starting with // must not make the front connect elsewhere.
    for target in ("//example.invalid/v2/x", "http://example.invalid/v2/y?q=1"):
        with socket.create_connection(("127.0.0.1", fake.port), timeout=10) as s:
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: example.invalid\r\nConnection: close\r\n\r\n".encode())
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        head = raw.partition(b"\r\n\r\n")[0]
        assert b" 200 " in head.split(b"\r\n")[0], raw[:300]
        assert b"X-Upstream: fake" in head  # answered by the fake tritonserver, not by another host


@pytest.mark.parametrize("path,body,fits", [
    ("generate", {"text_input": "x", "max_tokens": 2**32 + 4}, False),    # 2.51 would make it 4
    ("generate", {"text_input": "x", "max_tokens": -(2**31) - 1}, False),
    ("generate_stream", {"text_input": "x", "max_tokens": [[2**31]]}, False),
    ("generate", {"text_input": "x", "random_seed": 2**64}, False),
    ("generate", {"text_input": "x", "random_seed": 2**64 - 1, "max_tokens": 2**31 - 1}, True),
    ("generate", {"text_input": "x", "max_tokens": True, "other": 2**70}, True),  # not ints of a typed input
    ("infer", {"inputs": [{"name": "probe", "datatype": "INT32", "shape": [2], "data": [1, 2**31]}]}, False),
    ("infer", {"inputs": [{"name": "probe", "datatype": "UINT8", "shape": [1], "data": [[-1]]}]}, False),
    ("infer", {"inputs": [{"name": "probe", "datatype": "INT64", "shape": [1], "data": [2**40]}]}, True),
])
def test_integers_that_do_not_fit_their_input_type_are_refused(fake, path, body, fits):
    status, raw, _ = request(f"{fake.url}/v2/models/ensemble/{path}", "POST", body)
    if fits:
        assert b"does not fit" not in raw, raw
    else:
        assert status == 400 and b"does not fit its type" in raw, raw


def test_gzip_bodies_are_counted_after_decompression(fake):
    bomb = gzip.compress(b" " * (8 << 20))  # 8 MiB of spaces in about 8 kB
    status, raw, _ = request(f"{fake.url}/v2/x", "POST", bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "larger than" in json.loads(raw)["error"]
    small = gzip.compress(b'{"a": [1, 2]}')
    echo = json.loads(request(f"{fake.url}/v2/x", "POST", small, {"Content-Encoding": "gzip"})[1])
    assert echo["body_head"] == '{"a": [1, 2]}'  # forwarded decompressed, without Content-Encoding
    assert "content-encoding" not in {k.lower() for k, _ in echo["headers"]}


def test_header_count_and_size_are_bounded(fake):
    many = {f"X-H{i}": "v" for i in range(DEFAULT_MAX_HEADERS + 10)}
    assert request(f"{fake.url}/v2/health/ready", headers=many)[0] in (400, 431)
    assert request(f"{fake.url}/v2/health/ready", headers={"X-Big": "v" * 20_000})[0] in (400, 431)
    assert request(f"{fake.url}/v2/x?" + "a" * 20_000)[0] in (400, 414, 431)
    assert request(f"{fake.url}/v2/x")[0] == 200  # and it keeps serving


def test_unreachable_tritonserver_is_a_503_not_a_hang():
    front = InProcess(upstream=f"http://127.0.0.1:{free_ports(1)[0]}", model="dummy:tiny")  # nothing listens there
    try:
        status, raw, _ = request(f"{front.url}/v2/health/ready")
        assert status == 503 and "not reachable" in json.loads(raw)["error"]
        status, raw, _ = request(f"{front.url}/v1/completions", "POST", {"model": "smollm2", "prompt": "x"})
        assert status == 503 and json.loads(raw)["error"]["code"] == "unavailable"
    finally:
        front.close()


def openai_post(front: InProcess, path: str, body: dict) -> tuple[int, dict | list]:
    status, raw, headers = request(f"{front.url}/v1/{path}", "POST", body)
    if headers.get("Content-Type", "").startswith("text/event-stream"):
        events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
        return status, [e if e == "[DONE]" else json.loads(e) for e in events]
    return status, json.loads(raw)


def test_completion_parameters_reach_ensemble_as_sampling_parameters(fake):
    status, out = openai_post(fake, "completions", {"model": "smollm2", "prompt": ["Hi"], "max_tokens": 5,
                                                    "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "\n",
                                                    "top_k": 4, "user": "u"})
    assert status == 200, out
    sent = fake.fake.requests[-1]
    assert sent["path"] == "/v2/models/ensemble/generate"
    assert sent["body"]["text_input"] == "Hi" and sent["body"]["exclude_input_in_output"] is True
    assert json.loads(sent["body"]["sampling_parameters"]) == {"temperature": 0.5, "top_p": 0.9, "seed": 3,
                                                               "top_k": 4, "max_tokens": 5, "stop": ["\n"]}
    assert out["object"] == "text_completion" and out["model"] == "smollm2"
    assert out["choices"][0]["text"] == sent["body"]["sampling_parameters"]  # the fake echoes them
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    # OpenAI's defaults: temperature 1; no max_tokens means the server's default (16 as OpenAI's)
    openai_post(fake, "completions", {"model": "smollm2", "prompt": "Hi"})
    assert json.loads(fake.fake.requests[-1]["body"]["sampling_parameters"]) == {"temperature": 1.0}


def test_chat_uses_the_template_and_fills_max_tokens_with_the_room_left(fake):
    from adrenaline_py.loader import load_checkpoint

    tok = load_checkpoint("smollm2", with_weights=False).tokenizer
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Capital of "},
                                             {"type": "text", "text": "France?"}]}]
    status, out = openai_post(fake, "chat/completions", {"model": "smollm2", "messages": messages})
    assert status == 200, out
    sent = fake.fake.requests[-1]["body"]
    prompt = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Capital of France?"}])
    assert sent["text_input"] == prompt
    assert json.loads(sent["sampling_parameters"])["max_tokens"] == min(512, 1024 - len(tok.encode(prompt)))
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    openai_post(fake, "chat/completions", {"model": "smollm2", "messages": messages, "max_completion_tokens": 9,
                                           "max_tokens": 4})
    assert json.loads(fake.fake.requests[-1]["body"]["sampling_parameters"])["max_tokens"] == 9


@pytest.mark.parametrize("body,status,param,code", [
    ({"n": 2}, 400, "n", "unsupported_parameter"),
    ({"logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ({"top_logprobs": 2}, 400, "logprobs", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported_parameter"),
    ({"tool_choice": "auto"}, 400, "tool_choice", "unsupported_parameter"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format", "unsupported_parameter"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
    ({"logit_bias": {"1": 5}}, 400, "logit_bias", "unsupported_parameter"),
    ({"frobnicate": 1}, 400, "frobnicate", "unrecognized_argument"),
    ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content", "unsupported_parameter"),
    ({"messages": []}, 400, "messages", None),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", None),
])
def test_chat_errors_are_openai_errors(fake, body, status, param, code):
    full = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **body}
    got, out = openai_post(fake, "chat/completions", full)
    assert got == status, out
    assert set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["param"] == param and out["error"]["code"] == code and out["error"]["message"]


@pytest.mark.parametrize("body,param", [({"n": 3}, "n"), ({"best_of": 2}, "best_of"), ({"logprobs": 1}, "logprobs"),
                                        ({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"),
                                        ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2, 3]}, "prompt")])
def test_completion_errors_are_openai_errors(fake, body, param):
    got, out = openai_post(fake, "completions", {"model": "smollm2", "prompt": "hi", **body})
    assert got == 400 and out["error"]["param"] == param, out


def test_missing_model_bad_json_and_unknown_paths(fake):
    assert openai_post(fake, "completions", {"prompt": "hi"})[1]["error"]["param"] == "model"
    status, raw, _ = request(f"{fake.url}/v1/completions", "POST", b"{not json")
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    status, raw, _ = request(f"{fake.url}/v1/embeddings", "POST", {"model": "smollm2", "input": "x"})
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"
    status, raw, _ = request(f"{fake.url}/v1/models/nope")
    assert status == 404 and json.loads(raw)["error"]["code"] == "model_not_found"
    assert json.loads(request(f"{fake.url}/v1/models/smollm2")[1])["id"] == "smollm2"


def test_server_errors_map_to_openai_statuses(fake):
    assert openai_post(fake, "completions", {"model": "smollm2", "prompt": "ERROR"})[0] == 400
    status, out = openai_post(fake, "completions", {"model": "smollm2", "prompt": "OVERLOAD"})
    assert status == 503 and out["error"]["code"] == "overloaded"
    # streaming: an error before the first token is an HTTP error too, not a 200 with an error inside
    status, out = openai_post(fake, "completions", {"model": "smollm2", "prompt": "ERROR", "stream": True})
    assert status == 400 and "max_tokens" in out["error"]["message"]
    status, out = openai_post(fake, "completions", {"model": "smollm2", "prompt": "OVERLOAD", "stream": True})
    assert status == 503


def test_stream_chunks_follow_openai_and_end_with_done(fake):
    status, events = openai_post(fake, "chat/completions", {
        "model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "abc"  # the empty delta was not sent as a chunk
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3,
                                                                   "total_tokens": 10}
    # an error after the first token: an error event, then [DONE]
    status, events = openai_post(fake, "completions", {"model": "smollm2", "prompt": "MIDSTREAM", "stream": True})
    assert status == 200 and events[-1] == "[DONE]" and events[-2]["error"]["message"] == "engine failure"


# --- through the launcher: real tritonserver 2.51, SmolLM2 ------------------------------------------------

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_test_server(tmp_path_factory.mktemp("front") / "server.log", model="smollm2", max_model_len=1024,
                               max_tokens_limit=512, num_decode_blocks=256, num_executor_blocks=256,
                               max_decode_batch=16)
    assert server.options.front and server.triton_http_url != server.http_url
    yield server
    server.stop()


def generate(url: str, prompt: str = "The capital of France is", max_tokens: int = 4) -> dict:
    status, raw, _ = request(f"{url}/v2/models/ensemble/generate", "POST",
                             {"text_input": prompt, "max_tokens": max_tokens, "exclude_input_in_output": True})
    assert status == 200, raw
    return json.loads(raw)


def assert_serving(server) -> None:
    assert server.process.poll() is None, "tritonserver died"
    assert server.front_process.poll() is None, "the front died"
    out = generate(server.http_url)
    assert out["num_output_tokens"] == 4 and out["text_output"], out


@pytest.mark.server
def test_triton_http_listens_on_loopback_behind_the_front(server):
    assert server.triton_http_url.startswith("http://127.0.0.1:")
    assert request(f"{server.triton_http_url}/v2/health/ready")[0] == 200
    assert request(f"{server.http_url}/v2/health/ready")[0] == 200


@pytest.mark.server
@pytest.mark.parametrize("path", ["/v2/models/ensemble/generate", "/v2/models/ensemble/generate_stream",
                                  "/v2/models/ensemble/infer", "/v2/repository/index", "/v1/chat/completions"])
def test_a_4mb_body_and_json_nested_100000_deep_are_refused_and_the_server_keeps_serving(server, path):
    # Measured on 2.51 without the front: any 4 MB body, and arrays nested 100,000 deep as an input's
    # value (bad_words, sampling_parameters), end tritonserver with SIGSEGV; at the top level the same
    # nesting gets a parse error. All are refused before tritonserver sees them.
    status, raw, _ = request(f"{server.http_url}{path}", "POST", b"x" * (4 << 20))
    assert status == 413, raw[:300]
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (b'{"text_input": "hi", "bad_words": ' + deep + b"}",
                 b'{"text_input": "hi", "sampling_parameters": ' + deep + b"}", deep):
        status, raw, _ = request(f"{server.http_url}{path}", "POST", body)
        assert status == 400 and b"nested deeper than 32" in raw, raw[:300]
    assert_serving(server)


@pytest.mark.server
def test_an_int32_input_out_of_range_is_refused_not_wrapped(server):
    # Without the front, tritonserver 2.51 turns max_tokens 2**32 + 4 into 4 before the model sees it.
    status, raw, _ = request(f"{server.http_url}/v2/models/ensemble/generate", "POST",
                             {"text_input": "Hi", "max_tokens": 2**32 + 4})
    assert status == 400 and b"'max_tokens' = 4294967300 does not fit its type INT32" in raw, raw
    assert_serving(server)


def nested_body(depth: int, size: int | None = None) -> bytes:
    """A generate request whose JSON nests ``depth`` levels (lists in `bad_words` from depth 2 on, which the
    server refuses after parsing) and is padded with spaces to ``size`` bytes."""
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    body = '{"text_input": "Hi", "max_tokens": 1, "bad_words": ' + (inner if depth > 1 else '"x"') + "}"
    if size is not None:
        assert size >= len(body)
        body = body[:-1] + " " * (size - len(body)) + "}"
    return body.encode()


@pytest.mark.server
def test_fuzz_of_body_size_and_depth_around_the_limits(server):
    """Sizes around the 1 MiB limit (also chunked, without Content-Length) and depths around 32: refused
    exactly past the limits, passed to tritonserver below them (which then answers), never a crash."""
    rng = random.Random(7)
    limit, max_depth = server.options.http_max_body_bytes, server.options.http_max_json_depth
    sizes = [limit - 1, limit, limit + 1, 4 << 20] + [limit + rng.randint(-4096, 4096) for _ in range(6)]
    depths = [1, 2, max_depth - 1, max_depth, max_depth + 1, 1000] + [rng.randint(2, 80) for _ in range(6)]
    url = f"{server.http_url}/v2/models/ensemble/generate"
    counts = {"413": 0, "depth 400": 0, "to tritonserver": 0}
    for size in sizes:
        body = nested_body(1, size)
        chunked = rng.random() < 0.5
        data = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
        req = urllib.request.Request(url, data=data, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        if size > limit:
            assert status == 413, (size, chunked, status)
            counts["413"] += 1
        else:
            assert status == 200, (size, chunked, status)  # one token generated: it reached tritonserver
            counts["to tritonserver"] += 1
    for depth in depths:
        status, raw, _ = request(url, "POST", nested_body(depth))
        if depth > max_depth:
            assert status == 400 and b"nested deeper" in raw, (depth, raw[:200])
            counts["depth 400"] += 1
        else:
            # tritonserver parsed it: bad_words must be strings, so from depth 2 on the model refuses it
            assert (status, b"nested deeper" in raw) in ((200, False), (400, False)), (depth, raw[:200])
            counts["to tritonserver"] += 1
    print(f"\nfuzz: {counts}")
    assert_serving(server)


@pytest.mark.server
def test_generate_stream_streams_token_by_token_through_the_front(server):
    body = {"text_input": "Once upon a time", "max_tokens": MAX_TOKENS, "stream": True,
            "sampling_parameters": json.dumps({"ignore_eos": True})}
    conn = http.client.HTTPConnection("127.0.0.1", server.options.http_port, timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", "/v2/models/ensemble/generate_stream", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    events, times = [], []
    for line in resp:
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:]))
            times.append(time.perf_counter() - t0)
    conn.close()
    assert len(events) > 1
    assert sum(e["num_output_tokens"] for e in events) == MAX_TOKENS and events[-1]["finish_reason"] == "length"
    text = "".join(e["text_output"] for e in events)
    direct = generate(server.http_url, "Once upon a time", MAX_TOKENS)
    assert text == direct["text_output"]
    # token by token, not buffered: the events arrived spread over the decode, not all at the end
    print(f"\n{len(events)} events; first at {times[0] * 1e3:.0f} ms, last at {times[-1] * 1e3:.0f} ms")
    assert times[-1] - times[0] > 0.3 * times[-1]


@pytest.mark.server
def test_closing_a_stream_at_the_front_cancels_the_request(server):
    def finished(reason: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.options.metrics_port}/metrics", timeout=10) as r:
            m = re.search(rf'adrenaline_requests_finished_total\{{reason="{reason}"\}} (\S+)', r.read().decode())
        return float(m.group(1)) if m else 0.0

    before = finished("cancelled")
    body = json.dumps({"text_input": "Once upon a time", "max_tokens": 400, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.options.http_port), timeout=60) as s:
        s.sendall(b"POST /v2/models/ensemble/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                  % len(body) + body)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 20
    while finished("cancelled") < before + 1 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert finished("cancelled") == before + 1


@pytest.mark.server
def test_the_openai_client_lists_completes_and_streams_a_chat(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [server.served_model_name] == ["smollm2"]

    prompt = "The capital of France is"
    c = client.completions.create(model="smollm2", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    direct = generate(server.http_url, prompt, MAX_TOKENS)
    assert c.choices[0].text == direct["text_output"] and c.choices[0].finish_reason == direct["finish_reason"]
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (direct["num_input_tokens"],
                                                                  direct["num_output_tokens"])
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    text = "".join(deltas)
    print(f"\nchat: {text!r} ({finish}), usage {usage}")
    assert len([d for d in deltas if d]) > 1 and text == whole.choices[0].message.content
    assert "Paris" in text and finish == whole.choices[0].finish_reason in ("stop", "length")
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens > 0
    assert usage.prompt_tokens == whole.usage.prompt_tokens > 10  # the chat template's tokens count
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=messages, n=2)
    assert e.value.status_code == 400 and e.value.body["param"] == "n" and "not supported" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="hi")
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:  # the server's own validation, as an OpenAI error
        client.completions.create(model="smollm2", prompt="hi", max_tokens=100_000)
    assert "max_tokens" in e.value.body["message"]


@pytest.mark.server
def test_restricted_apis_keep_needing_the_key_through_the_front(server):
    assert request(f"{server.http_url}/v2/repository/index", "POST", {})[0] == 403
    assert request(f"{server.http_url}/v2/repository/index", "POST", {}, server.http_auth_headers)[0] == 200


# --- the launcher restarts what died (CLI, dummy:tiny) -------------------------------------------------------


@pytest.mark.server
def test_launcher_restarts_a_crashed_tritonserver_and_a_killed_front(tmp_path):
    from test_shutdown import Launcher, _wait

    launcher = Launcher(tmp_path, "--max-model-len", "256", "--max-tokens-limit", "64", "--num-decode-blocks", "64",
                        "--num-executor-blocks", "64", "--max-decode-batch", "4", drain_timeout=5, stop_grace=10)
    try:
        launcher.wait_ready()
        log = launcher.log()
        internal = re.search(r"tritonserver's own HTTP on (http://127\.0\.0\.1:\d+)", log).group(1)
        # what the front exists for: a 4 MB body sent to tritonserver's own port crashes 2.51
        try:
            request(f"{internal}/v2/models/ensemble/generate", "POST", b"x" * (4 << 20), timeout=30)
        except (OSError, http.client.HTTPException):
            pass
        t0 = time.monotonic()
        assert _wait(lambda: "Restarting it" in launcher.log(), 30), launcher.log()[-3000:]
        crash_line = next(line for line in launcher.log().splitlines() if "tritonserver exited with" in line)
        print(f"\n{crash_line}")
        assert "SIGSEGV" in crash_line or "SIGABRT" in crash_line or "code" in crash_line
        assert _wait(lambda: "tritonserver is serving again" in launcher.log(), 240), launcher.log()[-3000:]
        print(f"tritonserver serving again {time.monotonic() - t0:.1f}s after the crash")
        out = generate(launcher.url, "Hello", 4)
        assert out["num_output_tokens"] == 4

        # the front dies: restarted, and says so
        fronts = [p for p in _children(launcher.proc.pid) if "adrenaline_py.serving.front" in _cmdline(p)]
        assert len(fronts) == 1
        os.kill(fronts[0], signal.SIGKILL)
        assert _wait(lambda: "the HTTP front exited with signal SIGKILL; restarting it" in launcher.log(), 15)
        assert _wait(lambda: _ok(f"{launcher.url}/v2/health/ready"), 30), launcher.log()[-2000:]
        assert generate(launcher.url, "Hello", 4)["num_output_tokens"] == 4
        assert _grpc_generate(launcher.grpc, "Hello")[1] == 4  # the gRPC half came back with it

        launcher.proc.send_signal(signal.SIGTERM)
        assert launcher.proc.wait(60) == 0, launcher.log()[-3000:]
        left = [p for p in _pids() if launcher.run_dir in _cmdline(p)]
        assert left == [] and not Path(launcher.run_dir).exists()
    finally:
        launcher.cleanup()


def _pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children(ppid: int) -> list[int]:
    out = []
    for pid in _pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == ppid:
            out.append(pid)
    return out


def _ok(url: str) -> bool:
    try:
        return request(url, timeout=5)[0] == 200
    except OSError:
        return False


# --- the gRPC half: a message limit (tritonserver 2.51 has none and copies every input into shm) ------


def _grpc_inputs(prompt: str, max_tokens: int):
    import numpy as np
    import tritonclient.grpc as grpcclient

    def tensor(name, value, dtype):
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        return t

    return [tensor("text_input", np.array([[prompt.encode()]], dtype=np.object_), "BYTES"),
            tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
            tensor("exclude_input_in_output", np.array([[True]]), "BOOL"),
            tensor("stream", np.array([[True]]), "BOOL")]


def _grpc_generate(port: int, prompt: str, max_tokens: int = 4) -> tuple[str, int]:
    """One streamed request for ``ensemble`` over gRPC; (text, output tokens), or raises the stream's error."""
    import queue

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("ensemble", _grpc_inputs(prompt, max_tokens))
        text, n = "", 0
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                raise error
            text += result.as_numpy("text_output").reshape(-1)[0].decode()
            n += int(result.as_numpy("num_output_tokens").reshape(-1)[0])
            if result.as_numpy("finish_reason").reshape(-1)[0]:
                return text, n
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.server
def test_triton_grpc_listens_on_loopback_behind_the_front(server):
    assert server.triton_grpc_port != server.options.grpc_port
    direct = _grpc_generate(server.triton_grpc_port, "The capital of France is")
    assert direct[1] == 4
    assert _grpc_generate(server.options.grpc_port, "The capital of France is") == direct


@pytest.mark.server
def test_a_grpc_message_over_the_limit_is_refused_and_the_server_keeps_serving(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    huge = "word " * 1_000_000  # 5 MB of prompt: over the 4 MiB default
    with pytest.raises(InferenceServerException) as e:
        _grpc_generate(server.options.grpc_port, huge)
    assert "RESOURCE_EXHAUSTED" in str(e.value.status()), e.value
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.options.grpc_port}")
    try:  # unary: refused at the front (tritonserver would have said UNIMPLEMENTED for a decoupled model)
        with pytest.raises(InferenceServerException) as e:
            client.infer("ensemble", _grpc_inputs(huge, 4), client_timeout=60)
        assert "RESOURCE_EXHAUSTED" in str(e.value.status()), e.value
    finally:
        client.close()
    text, n = _grpc_generate(server.options.grpc_port, "The capital of France is")
    assert n == 4 and text
    assert_serving(server)


@pytest.mark.server
def test_a_compressed_grpc_message_is_limited_by_its_decompressed_size(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.options.grpc_port}")
    try:  # 50 MB of one repeated word: about 50 KB on the wire with gzip
        with pytest.raises(InferenceServerException) as e:
            client.infer("ensemble", _grpc_inputs("word " * 10_000_000, 4), client_timeout=60,
                         compression_algorithm="gzip")
        assert "RESOURCE_EXHAUSTED" in str(e.value.status()), e.value
    finally:
        client.close()
    assert _grpc_generate(server.options.grpc_port, "The capital of France is")[1] == 4


@pytest.mark.server
def test_grpc_errors_and_metadata_pass_through_the_front(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.options.grpc_port}")
    try:
        assert client.is_server_ready() and client.is_model_ready("ensemble")
        with pytest.raises(InferenceServerException) as e:  # tritonserver's own error, status and all
            client.get_model_metadata("no_such_model")
        assert "no_such_model" in str(e.value) and "NOT_FOUND" in str(e.value.status())
        with pytest.raises(InferenceServerException) as e:  # restricted without the key ...
            client.get_model_repository_index()
        assert "This protocol is restricted" in str(e.value)  # tritonserver's answer, passed on
        index = client.get_model_repository_index(headers=server.grpc_auth_headers)  # ... allowed with it
        assert any(m.name == "ensemble" for m in index.models)
    finally:
        client.close()
