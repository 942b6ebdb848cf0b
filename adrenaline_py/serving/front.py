"""The HTTP front of `adrenaline serve`: crash guards, a streaming proxy for the Triton API, and an
OpenAI-compatible API.

Why it exists: tritonserver 2.51 dies with SIGSEGV on any HTTP body of 4 MB or more and on JSON
nested 100,000 deep (upstream bugs, fixed after 2.51 by ``--http-max-input-size``). So the
launcher runs this aiohttp server on the public HTTP port, and tritonserver's own HTTP listens on
loopback on an internal port. Every request passes the guards first:

- a body limit (``max_body_bytes``, 413): checked against Content-Length before anything is read,
  and again while reading (chunked or compressed bodies are counted after decompression);
- a JSON nesting-depth limit (``max_json_depth``, 400): :func:`json_nesting_depth` scans the bytes
  without parsing them (no recursion), so no parser ever sees a deep document;
- bounded request line, header size and header count (aiohttp's parser limits).

Everything else goes to tritonserver unchanged (method, path, query, headers, body) and the answer
comes back as it arrives, so ``/generate_stream`` streams token by token.

The OpenAI API (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``) is translated here
into ``ensemble``'s ``/generate`` or ``/generate_stream`` on the internal port: one loopback HTTP hop
per request, and per token one SSE event parsed and one chunk written (docs/performance.md has the
measured cost). Only the checkpoint's tokenizer is loaded (for the chat template), never weights.

Run by the launcher as ``python -m adrenaline_py.serving.front --config <run dir>/front.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from yarl import URL

log = logging.getLogger("adrenaline.front")

DEFAULT_MAX_BODY_BYTES = 1 << 20        # tritonserver 2.51 crashes at 4 MB; prompts are far smaller
DEFAULT_MAX_JSON_DEPTH = 32             # the client contract nests 3 deep; 2.51 crashes at ~100,000
DEFAULT_MAX_HEADERS = 64                # header count
DEFAULT_MAX_HEADER_BYTES = 8190         # one header line, and the request line (aiohttp's default)
ENSEMBLE = "ensemble"

# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus the ones the proxy
# recomputes: the body it forwards is already decompressed and has a new length.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length", "expect",
})
_REQUEST_ONLY = frozenset({"content-encoding"})

# tritonserver 2.51 wraps a JSON integer that does not fit an input's type (max_tokens 2**32 + 4
# arrives as 4) before any model code can see it; the front checks the ranges first.
_INT_RANGES = {
    "INT8": (-(1 << 7), (1 << 7) - 1), "INT16": (-(1 << 15), (1 << 15) - 1),
    "INT32": (-(1 << 31), (1 << 31) - 1), "INT64": (-(1 << 63), (1 << 63) - 1),
    "UINT8": (0, (1 << 8) - 1), "UINT16": (0, (1 << 16) - 1), "UINT32": (0, (1 << 32) - 1),
    "UINT64": (0, (1 << 64) - 1),
}
_GENERATE = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/generate(?:_stream)?")
_INFER = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer")


def int_range_error(name: str, datatype: str, value: Any) -> str | None:
    """Why an integer in a JSON input value (a scalar or nested lists) does not fit ``datatype``, or None."""
    bounds = _INT_RANGES.get(datatype.upper().removeprefix("TYPE_"))
    if bounds is None:
        return None
    lo, hi = bounds
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, list):
            todo.extend(v)
        elif isinstance(v, int) and not isinstance(v, bool) and not lo <= v <= hi:
            return f"input '{name}' = {v} does not fit its type {datatype.upper().removeprefix('TYPE_')} [{lo}, {hi}]"
    return None

_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def json_nesting_depth(data: bytes) -> int:
    """Deepest array/object nesting that a left-to-right JSON parser reaches in ``data``.

    Brackets inside strings do not count; a quote preceded by an odd run of backslashes is escaped.
    Vectorized (numpy) so that a 1 MiB body costs milliseconds and no recursion is involved. For
    invalid JSON the result is exact up to the first error (where a parser stops) and may be larger
    afterwards, never smaller: a parser cannot get deeper than this before it fails.
    """
    if data.count(b"[") + data.count(b"{") == 0:
        return 0
    b = np.frombuffer(data, dtype=np.uint8)
    idx = np.arange(b.size, dtype=np.int64)
    # For each position, the last position at or before it that is not a backslash.
    last_plain = np.maximum.accumulate(np.where(b == 0x5C, -1, idx))
    quotes = np.flatnonzero(b == 0x22)
    before = quotes - 1
    run = np.where(before >= 0, before - last_plain[np.maximum(before, 0)], 0)  # backslashes before it
    toggles = np.zeros(b.size, dtype=np.int8)
    toggles[quotes[run % 2 == 0]] = 1
    outside = (np.cumsum(toggles, dtype=np.int64) & 1) == 0  # a bracket is never at a quote position
    steps = np.where(outside, _BRACKET_STEP[b], 0).astype(np.int32)
    return max(0, int(np.cumsum(steps, dtype=np.int32).max()))


@dataclass(frozen=True)
class FrontConfig:
    """Everything the front needs; the launcher writes it as JSON (no secrets in it)."""

    upstream: str                                  # tritonserver's HTTP, e.g. http://127.0.0.1:41234
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "smollm2"                         # --model: where the tokenizer comes from
    served_model_name: str = "smollm2"             # what /v1/models lists and `model` must name
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_headers: int = DEFAULT_MAX_HEADERS
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_model_len: int = 2048                      # for the default max_tokens of a chat completion
    max_tokens_limit: int = 1024
    api_key_header: str = "x-adrenaline-api-key"   # an OpenAI client's Bearer token is forwarded as it
    drain_timeout_s: float = 30.0                  # on SIGTERM: in-flight requests get this long
    # the gRPC half (adrenaline_py/serving/grpc_front.py): public port and tritonserver's own gRPC
    grpc_port: int | None = None                   # None: no gRPC front
    grpc_upstream: str | None = None               # e.g. 127.0.0.1:41235
    max_grpc_message_bytes: int = 4 << 20          # grpc_front.DEFAULT_MAX_MESSAGE_BYTES

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> FrontConfig:
        return cls(**json.loads(path.read_text()))

    def validate(self) -> None:
        if self.max_body_bytes < 1 or self.max_json_depth < 1:
            raise ValueError("the body limit and the JSON depth limit must be >= 1")
        if self.max_headers < 1 or self.max_header_bytes < 256:
            raise ValueError("the header limits must allow at least 1 header of 256 bytes")
        if self.grpc_port is not None and (self.grpc_upstream is None or self.max_grpc_message_bytes < 1024):
            raise ValueError("the gRPC front needs tritonserver's gRPC address and a message limit >= 1024 bytes")


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


def _unsupported(param: str, what: str | None = None) -> OpenAIError:
    return OpenAIError(400, f"{what or param} is not supported by this server", param=param,
                       code="unsupported_parameter")


def _guard_error(request: web.BaseRequest, status: int, message: str, code: str) -> web.Response:
    """A guard's refusal in the shape the client expects: OpenAI's under /v1, Triton's elsewhere."""
    if request.path.startswith("/v1/") or request.path == "/v1":
        return OpenAIError(status, message, code=code).response()
    return web.json_response({"error": message}, status=status)


# --- request translation (OpenAI -> ensemble) ------------------------------------------------------

# Accepted and ignored: they do not change the generated text.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                      "safety_identifier"})
# vLLM's extensions, passed on as `sampling_parameters` keys (the server validates them).
_EXTENSIONS = ("top_k", "min_p", "min_tokens", "ignore_eos", "stop_token_ids")
_COMMON = frozenset({"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed",
                     "stop", "n", "presence_penalty", "frequency_penalty", "logit_bias", *_EXTENSIONS,
                     *_IGNORED})
_COMPLETION_KEYS = _COMMON | {"prompt", "best_of", "logprobs", "echo", "suffix"}
_CHAT_KEYS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
                        "tool_choice", "functions", "function_call", "response_format", "modalities",
                        "reasoning_effort", "prediction", "audio", "web_search_options"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_common(body: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise OpenAIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                          code="unrecognized_argument")
    n = body.get("n")
    if n is not None and n != 1:
        raise _unsupported("n", "n other than 1")
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v is not None and (not _is_number(v) or v != 0):
            raise _unsupported(name, f"{name} other than 0")
    if body.get("logit_bias"):
        raise _unsupported("logit_bias")
    if body.get("stream") not in (None, True, False):
        raise OpenAIError(400, "stream must be a boolean", param="stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not body.get("stream"):
            raise OpenAIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}:
            raise OpenAIError(400, "stream_options supports only include_usage", param="stream_options")


def _sampling(body: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    """`sampling_parameters` for ensemble. OpenAI's defaults, not the Triton API's: temperature 1."""
    params: dict[str, Any] = {"temperature": 1.0}
    for name in ("temperature", "top_p", "seed", *_EXTENSIONS):
        if body.get(name) is not None:
            params[name] = body[name]
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise OpenAIError(400, "stop must be a string or a list of strings", param="stop")
        params["stop"] = stop
    return params


def _max_tokens(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        v = body.get(name)
        if v is not None:
            if not _is_int(v):
                raise OpenAIError(400, f"{name} must be an integer", param=name)
            return v
    return None


def _completion_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        raise _unsupported("prompt", "a list of several prompts or token ids as prompt")
    if not isinstance(prompt, str):
        raise OpenAIError(400, "prompt must be a string", param="prompt")
    for name, ok in (("best_of", lambda v: v in (None, 1)), ("logprobs", lambda v: v is None),
                     ("echo", lambda v: not v), ("suffix", lambda v: not v)):
        if not ok(body.get(name)):
            raise _unsupported(name)
    return prompt


def _chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    for name in ("tools", "functions"):
        if body.get(name):
            raise _unsupported(name, "tool calling")
    if body.get("tool_choice") not in (None, "none") or body.get("function_call") not in (None, "none"):
        raise _unsupported("tool_choice", "tool calling")
    if body.get("logprobs") or body.get("top_logprobs") is not None:
        raise _unsupported("logprobs")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _unsupported("response_format", "response_format other than text")
    for name in ("audio", "prediction", "web_search_options"):
        if body.get(name) is not None:
            raise _unsupported(name)
    if body.get("modalities") not in (None, ["text"]):
        raise _unsupported("modalities", "modalities other than text")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise OpenAIError(400, f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
        role = {"developer": "system"}.get(m["role"], m["role"])
        if role not in ("system", "user", "assistant"):
            raise _unsupported(f"messages[{i}].role", f"role {m['role']!r}")
        if m.get("tool_calls") or m.get("function_call"):
            raise _unsupported(f"messages[{i}].tool_calls", "tool calling")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _unsupported(f"messages[{i}].content", "content parts other than text")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise OpenAIError(400, f"messages[{i}].content must be a string or a list of text parts",
                              param=f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


def _scalar(value: Any) -> Any:
    """An output of /generate as a scalar (outputs with a batch dimension come back as lists)."""
    while isinstance(value, list) and value:
        value = value[0]
    return value


def _upstream_error(status: int, message: str) -> OpenAIError:
    """An ensemble error as OpenAI reports it: full pools are 503 (retry later), bad input 400."""
    if "server overloaded" in message or "KV cache full" in message:
        return OpenAIError(503, message, "server_error", code="overloaded")
    if status >= 500:
        return OpenAIError(500, message, "server_error", code="internal_error")
    if status == 404:
        return OpenAIError(404, message, code="not_found")
    return OpenAIError(400, message)


# --- the server ---------------------------------------------------------------------------------------


class Front:
    """The front's state: its configuration, one client session to tritonserver, the tokenizer."""

    def __init__(self, config: FrontConfig) -> None:
        config.validate()
        self.config = config
        self.upstream = URL(config.upstream)
        self.created = int(time.time())
        self._session: aiohttp.ClientSession | None = None
        self._tokenizer: asyncio.Future | None = None
        self._input_types: dict[str, dict[str, str]] = {}  # model -> input -> datatype, from tritonserver

    # The application -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        # client_max_size makes request.read() stop at the limit (also for chunked bodies).
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._guard])
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        r = app.router
        r.add_get("/v1/models", self.list_models)
        r.add_get("/v1/models/{model:.+}", self.get_model)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_route("*", "/v1/{tail:.*}", self.openai_not_found)
        r.add_route("*", "/{tail:.*}", self.proxy)
        return app

    def runner(self, app: web.Application) -> web.AppRunner:
        c = self.config
        # handler_cancellation: a client that goes away cancels its handler, which closes the upstream
        # connection, which tritonserver turns into a cancelled request (KV blocks freed at once).
        return web.AppRunner(app, handler_cancellation=True, shutdown_timeout=c.drain_timeout_s,
                             max_line_size=c.max_header_bytes, max_field_size=c.max_header_bytes,
                             max_headers=c.max_headers, access_log=None)

    async def _on_startup(self, app: web.Application) -> None:
        # force_close: no idle keep-alive connection to tritonserver, which would hold its drain on
        # SIGTERM until the timeout (2.51). Costs one loopback connect per request, nothing per token.
        # auto_decompress=False: response bytes go back exactly as tritonserver sent them.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"))
        # The tokenizer loads in a thread (2 s for the GGUF): the proxy serves meanwhile.
        self._tokenizer = asyncio.get_running_loop().run_in_executor(None, self._load_tokenizer)

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    def _load_tokenizer(self):
        from adrenaline_py.loader import load_checkpoint

        return load_checkpoint(self.config.model, with_weights=False).tokenizer

    # The guards ------------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        c = self.config
        limit_msg = f"request body larger than {c.max_body_bytes} bytes"
        if request.content_length is not None and request.content_length > c.max_body_bytes:
            return _guard_error(request, 413, limit_msg, "body_too_large")  # refused before reading it
        try:
            body = await request.read()  # decompressed; stops at client_max_size
        except web.HTTPRequestEntityTooLarge:
            return _guard_error(request, 413, limit_msg, "body_too_large")
        if body:
            scan = body
            # Triton's binary tensor extension: only the first N bytes are JSON.
            n = request.headers.get("Inference-Header-Content-Length")
            if n is not None and n.isdigit() and int(n) <= len(body):
                scan = body[:int(n)]
            if json_nesting_depth(scan) > c.max_json_depth:
                return _guard_error(request, 400, f"JSON nested deeper than {c.max_json_depth} levels",
                                    "json_too_deep")
        return await handler(request)

    # The Triton API: a streaming proxy ---------------------------------------------------------------

    async def _input_types_of(self, model: str, request: web.Request) -> dict[str, str]:
        """The datatype of each input of ``model`` (its configuration from tritonserver, cached); empty
        when it cannot be read (then tritonserver sees the request as before)."""
        if model not in self._input_types:
            assert self._session is not None
            key = request.headers.get(self.config.api_key_header)
            try:
                async with self._session.get(self.upstream.with_path(f"/v2/models/{model}/config", encoded=False),
                                             headers={self.config.api_key_header: key} if key else None) as r:
                    if r.status != 200:
                        return {}
                    config = await r.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return {}
            self._input_types[model] = {i["name"]: i.get("data_type", "") for i in config.get("input", [])
                                        if isinstance(i, dict) and "name" in i}
        return self._input_types[model]

    async def _range_error(self, request: web.Request, body: bytes) -> str | None:
        """An integer input of a /generate or JSON /infer request out of its type's range, or None."""
        generate = _GENERATE.fullmatch(request.path)
        if request.method != "POST" or not body or not (generate or _INFER.fullmatch(request.path)):
            return None
        if "Inference-Header-Content-Length" in request.headers:
            return None  # binary tensors: their bytes are their type
        try:
            doc = json.loads(body)  # depth bounded by the guard
        except (ValueError, UnicodeDecodeError):
            return None  # tritonserver answers it
        if not isinstance(doc, dict):
            return None
        if generate:
            types = await self._input_types_of(generate.group(1), request)
            return next((e for name, v in doc.items() if name in types
                         and (e := int_range_error(name, types[name], v))), None)
        inputs = doc.get("inputs")
        for t in inputs if isinstance(inputs, list) else ():
            if isinstance(t, dict) and isinstance(t.get("datatype"), str):
                if e := int_range_error(str(t.get("name")), t["datatype"], t.get("data")):
                    return e
        return None

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()  # cached by the guard
        if (error := await self._range_error(request, body)) is not None:
            return web.json_response({"error": error}, status=400)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP | _REQUEST_ONLY]
        # Only the path and query of the client's URL: an absolute-form target or a path starting with //
        # must not pick another host.
        rel = request.rel_url
        url = URL.build(scheme=self.upstream.scheme, host=self.upstream.host, port=self.upstream.port,
                        path=rel.raw_path, query_string=rel.raw_query_string, encoded=True)
        assert self._session is not None
        try:
            upstream = await self._session.request(request.method, url, headers=headers, data=body or None,
                                                   allow_redirects=False)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
            return web.json_response({"error": "tritonserver is not reachable (starting or restarting)"},
                                     status=503)
        async with upstream:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in upstream.headers.items():
                if k.lower() not in _HOP_BY_HOP or k.lower() == "content-length":
                    resp.headers.add(k, v)
            await resp.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():  # as it arrives: SSE token by token
                    await resp.write(chunk)
            except aiohttp.ClientError:
                # tritonserver went away mid-answer: cut the client's connection too, so that it sees an
                # incomplete answer as it would have without the front (no terminating chunk).
                if request.transport is not None:
                    request.transport.abort()
                return resp
            await resp.write_eof()
            return resp

    # The OpenAI API --------------------------------------------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.config.served_model_name, "object": "model", "created": self.created,
                "owned_by": "adrenaline"}

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.config.served_model_name:
            return self._unknown_model(request.match_info["model"]).response()
        return web.json_response(self._model_card())

    async def openai_not_found(self, request: web.Request) -> web.Response:
        return OpenAIError(404, f"{request.method} {request.path} is not served here (served: /v1/models, "
                           "/v1/completions, /v1/chat/completions)", code="not_found").response()

    def _unknown_model(self, name: Any) -> OpenAIError:
        return OpenAIError(404, f"The model `{name}` does not exist (served: `{self.config.served_model_name}`)",
                           param="model", code="model_not_found")

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())  # depth already bounded by the guard
        except (ValueError, UnicodeDecodeError):
            raise OpenAIError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the body must be a JSON object")
        if "model" not in body:
            raise OpenAIError(400, "you must provide a model parameter", param="model")
        if body["model"] != self.config.served_model_name:
            raise self._unknown_model(body["model"])
        return body

    def _auth_headers(self, request: web.Request) -> dict[str, str]:
        """The API key for tritonserver (which checks it where `inference` is restricted): the key header
        as sent, else an OpenAI client's ``Authorization: Bearer <key>``."""
        h = {"Content-Type": "application/json"}
        key = request.headers.get(self.config.api_key_header)
        auth = request.headers.get("Authorization", "")
        if key is None and auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
        if key:
            h[self.config.api_key_header] = key
        return h

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._json_body(request)
            _check_common(body, _COMPLETION_KEYS)
            prompt = _completion_prompt(body)
            # no max_tokens: the server's --default-max-tokens (16, OpenAI's default for completions)
            params = _sampling(body, _max_tokens(body, "max_tokens"))
        except OpenAIError as e:
            return e.response()
        return await self._generate(request, body, prompt, params, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._json_body(request)
            _check_common(body, _CHAT_KEYS)
            messages = _chat_messages(body)
            max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
            prompt, default_max = await self._chat_prompt(messages, need_length=max_tokens is None)
            params = _sampling(body, max_tokens if max_tokens is not None else default_max)
        except OpenAIError as e:
            return e.response()
        return await self._generate(request, body, prompt, params, chat=True)

    async def _chat_prompt(self, messages: list[dict[str, str]], need_length: bool) -> tuple[str, int | None]:
        """The prompt from the chat template; without max_tokens, the room left in the context (as vLLM)."""
        assert self._tokenizer is not None
        try:
            tok = await self._tokenizer
        except Exception as e:  # noqa: BLE001 - reported to the client, logged once here
            log.error("loading the tokenizer of %s failed: %s", self.config.model, e)
            raise OpenAIError(500, "the tokenizer of the served model could not be loaded", "server_error",
                              code="internal_error") from None
        if not tok.chat_template:
            raise OpenAIError(400, "the served model has no chat template; use /v1/completions",
                              param="messages", code="no_chat_template")

        def render() -> tuple[str, int | None]:
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
            if not need_length:
                return prompt, None
            room = self.config.max_model_len - len(tok.encode(prompt))
            return prompt, min(self.config.max_tokens_limit, room)

        try:  # in a thread: rendering and tokenizing a long conversation must not stall other streams
            prompt, default_max = await asyncio.get_running_loop().run_in_executor(None, render)
        except Exception as e:  # noqa: BLE001 - a template error (raise_exception) is the client's
            raise OpenAIError(400, f"chat template: {e}", param="messages") from None
        if default_max is not None and default_max < 1:
            raise OpenAIError(400, f"the messages take the whole context of {self.config.max_model_len} tokens",
                              param="messages", code="context_length_exceeded")
        return prompt, default_max

    async def _generate(self, request: web.Request, body: dict[str, Any], prompt: str, params: dict[str, Any],
                        chat: bool) -> web.StreamResponse:
        stream = bool(body.get("stream"))
        include_usage = bool(stream and (body.get("stream_options") or {}).get("include_usage"))
        # exclude_input_in_output explicitly: OpenAI's text never repeats the prompt, whatever ensemble's default
        payload = {"text_input": prompt, "stream": stream, "exclude_input_in_output": True,
                   "sampling_parameters": json.dumps(params)}
        path = f"/v2/models/{ENSEMBLE}/{'generate_stream' if stream else 'generate'}"
        assert self._session is not None
        try:
            upstream = await self._session.post(self.upstream.with_path(path), data=json.dumps(payload),
                                                 headers=self._auth_headers(request))
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
            return OpenAIError(503, "the inference server is not reachable (starting or restarting)",
                               "server_error", code="unavailable").response()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        async with upstream:
            if not stream:
                return await self._complete(upstream, rid, body["model"], chat)
            return await self._stream(request, upstream, rid, body["model"], chat, include_usage)

    async def _complete(self, upstream: aiohttp.ClientResponse, rid: str, model: str, chat: bool) -> web.Response:
        raw = await upstream.read()
        try:
            out = json.loads(raw)
        except ValueError:
            out = {"error": raw.decode(errors="replace")}
        if upstream.status != 200 or "error" in out:
            return _upstream_error(upstream.status, str(out.get("error", out))).response()
        text = _scalar(out.get("text_output", ""))
        n_in, n_out = int(_scalar(out.get("num_input_tokens", 0))), int(_scalar(out.get("num_output_tokens", 0)))
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": _scalar(out.get("finish_reason"))}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return web.json_response({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
        })

    async def _stream(self, request: web.Request, upstream: aiohttp.ClientResponse, rid: str, model: str,
                      chat: bool, include_usage: bool) -> web.StreamResponse:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        events = _sse_events(upstream.content)
        # Headers wait for the first event, so that a request refused before its first token (bad input,
        # full pools) gets an HTTP error status, as OpenAI answers it, instead of an error inside a 200.
        try:
            first = await anext(events, None)
        except aiohttp.ClientError:
            first = None
        if first is None:
            return OpenAIError(502, "the inference server closed the stream", "server_error",
                               code="upstream_closed").response()
        if "error" in first:
            return _upstream_error(upstream.status if upstream.status != 200 else 400, str(first["error"])).response()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)

        def chunk(delta_text: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if delta_text:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            c: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            if include_usage:
                c["usage"] = None
            return b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n"

        n_in = n_out = 0
        finish = None
        error: str | None = None
        if chat:
            await resp.write(chunk(None, None, role=True))
        event: dict[str, Any] | None = first
        try:
            while event is not None:
                if "error" in event:
                    error = str(event["error"])
                    break
                n_in = int(_scalar(event.get("num_input_tokens", n_in)) or n_in)
                n_out += int(_scalar(event.get("num_output_tokens", 0)) or 0)
                text = _scalar(event.get("text_output", "")) or ""
                finish = _scalar(event.get("finish_reason")) or None
                if text or finish:  # empty deltas (text held back for a stop string) are not sent
                    await resp.write(chunk(text, finish))
                if finish:
                    break
                event = await anext(events, None)
        except aiohttp.ClientError as e:
            error = f"the inference server closed the stream: {type(e).__name__}"
        if error is None and finish is None:
            error = "the inference server closed the stream before its last token"
        if error is not None:
            await resp.write(b"data: " + json.dumps(_upstream_error(400, error).body()).encode() + b"\n\n")
        elif include_usage:
            usage = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                     "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}
            await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def _sse_events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of tritonserver's SSE stream (``data: {...}`` blocks), as they arrive."""
    buf = b""
    async for piece in content.iter_any():
        buf += piece
        while True:
            end = buf.find(b"\n\n")
            if end < 0:
                break
            block, buf = buf[:end], buf[end + 2:]
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    try:
                        event = json.loads(line[5:])
                    except ValueError:
                        event = {"error": f"unreadable event from the inference server: {line[:200]!r}"}
                    yield event if isinstance(event, dict) else {"error": "unexpected event"}


# --- running it ------------------------------------------------------------------------------------


async def serve(config: FrontConfig, started: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None), then drain: stop
    listening at once, let in-flight requests finish for up to ``drain_timeout_s``."""
    grpc_server = grpc_proxy = None
    if config.grpc_port is not None:  # first: whoever finds the HTTP port ready may use gRPC at once
        from adrenaline_py.serving.grpc_front import start_grpc_front

        grpc_server, grpc_proxy = await start_grpc_front(config.host, config.grpc_port, config.grpc_upstream,
                                                         config.max_grpc_message_bytes)
        log.info("front: gRPC on %s:%d (messages up to %d bytes), tritonserver's gRPC at %s", config.host,
                 config.grpc_port, config.max_grpc_message_bytes, config.grpc_upstream)
    front = Front(config)
    runner = front.runner(front.app())
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        if grpc_server is not None:
            await grpc_server.stop(None)
            await grpc_proxy.close()
        raise
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    log.info("front: listening on http://%s:%d, tritonserver at %s", config.host, config.port, config.upstream)
    if started is not None:
        started.set()
    await stop.wait()
    if grpc_server is None:
        await runner.cleanup()
        return
    # both stop listening at once; in-flight calls get the drain timeout, then gRPC cancels them
    await asyncio.gather(runner.cleanup(), grpc_server.stop(config.drain_timeout_s))
    await grpc_proxy.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adrenaline_py.serving.front", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="front.json written by the launcher")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    config = FrontConfig.load(a.config)
    try:
        asyncio.run(serve(config))
    except OSError as e:  # a port is taken: the launcher reports it
        print(f"adrenaline front: cannot listen on {config.host}:{config.port}"
              + (f" / gRPC {config.grpc_port}" if config.grpc_port is not None else "") + f": {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
