"""Security defaults and hostile clients, through the real tritonserver (dummy:tiny, loopback only).

- The server listens on 127.0.0.1 only.
- The model-repository, shared-memory, logging and trace APIs need the API key header; inference,
  health, metadata, model configuration and statistics do not.
- Model control mode is none: no request loads a model, from a path or from uploaded files.
- Fuzzing the ensemble's inputs over HTTP and gRPC for a bounded number of examples: every request
  gets a response or a clear error, none hangs, the server survives and still serves.
"""

from __future__ import annotations

import base64
import json
import math
import os
import queue
import re
import socket
import stat
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import small_engine_config, start_test_server

from adrenaline_py.serving.launcher import DEFAULT_API_KEY_HEADER, Server, ServerOptions
from adrenaline_py.serving.triton_runtime import DEFAULT_RESTRICTED_APIS, TritonRuntime

MAX_MODEL_LEN = 512
MAX_TOKENS_LIMIT = 256
SHM = Path("/dev/shm")
REQUEST_TIMEOUT_S = 60.0  # a request without an answer after this long counts as a hang
# about 60-90 s together on 2 CPU cores; the environment variables change them
FUZZ_HTTP_EXAMPLES = int(os.environ.get("ADRENALINE_FUZZ_HTTP_EXAMPLES", "2500"))
FUZZ_GRPC_EXAMPLES = int(os.environ.get("ADRENALINE_FUZZ_GRPC_EXAMPLES", "1500"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_test_server(tmp_path_factory.mktemp("security") / "server.log", model="dummy:tiny",
                               max_model_len=MAX_MODEL_LEN, max_tokens_limit=MAX_TOKENS_LIMIT, admission_timeout_s=10.0)
    yield server
    server.stop()


def http(server: Server, method: str, path: str, body=None, headers=None, timeout: float = 30.0):
    """(status, parsed JSON body or text) of one HTTP request."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(f"{server.http_url}{path}", data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def grpc_client(server: Server):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(f"127.0.0.1:{server.options.grpc_port}")


def generate_ok(server: Server) -> dict:
    status, out = http(server, "POST", "/v2/models/ensemble/generate",
                       {"text_input": "The capital of France is", "max_tokens": 8})
    assert status == 200 and out["finish_reason"] == "length" and out["num_output_tokens"] == 8, (status, out)
    return out


# --- flags (no server) ----------------------------------------------------------------------------


def test_server_command_restricts_apis_and_keeps_model_control_off(tmp_path):
    try:
        rt = TritonRuntime.locate()
    except Exception as e:  # noqa: BLE001
        pytest.skip(str(e))
    cmd = rt.server_command(tmp_path, tmp_path, 1, 2, 3, exit_timeout_s=7, restricted_apis=DEFAULT_RESTRICTED_APIS,
                            restricted_header=("x-k", "s3cret-value-0123456789"))
    spec = "model-repository,shared-memory,logging,trace:x-k=s3cret-value-0123456789"
    assert f"--http-restricted-api={spec}" in cmd
    assert f"--grpc-restricted-protocol={spec}" in cmd
    assert "--model-control-mode=none" in cmd and "--exit-timeout-secs=7" in cmd
    assert "--http-address=127.0.0.1" in cmd and "--grpc-address=127.0.0.1" in cmd
    for bad in [dict(restricted_apis=["models"], restricted_header=("x-k", "v" * 20)),
                dict(restricted_apis=["trace"], restricted_header=("X-K", "v" * 20)),
                dict(restricted_apis=["trace"], restricted_header=("x-k", "a:b=c d")),
                dict(restricted_apis=["trace"], restricted_header=None)]:
        with pytest.raises(ValueError):
            rt.server_command(tmp_path, tmp_path, 1, 2, 3, **bad)
    assert not any("restricted" in a for a in rt.server_command(tmp_path, tmp_path, 1, 2, 3))


def test_serve_flags_build_the_security_and_drain_options(monkeypatch):
    from adrenaline_py import cli
    from adrenaline_py.serving import launcher

    seen = {}
    monkeypatch.setattr(launcher, "serve_forever", lambda engine, options: seen.setdefault("o", options) and 0)
    monkeypatch.delenv("ADRENALINE_API_KEY", raising=False)
    cli.main(["serve", "--model", "dummy:tiny"])
    o = seen.pop("o")
    assert o.address == "127.0.0.1" and o.restricted_apis == DEFAULT_RESTRICTED_APIS and o.api_key is None
    assert o.api_key_header == DEFAULT_API_KEY_HEADER and o.drain_timeout_s == 30.0
    monkeypatch.setenv("ADRENALINE_API_KEY", "from-the-environment-0123")
    cli.main(["serve", "--restricted-apis", "none", "--drain-timeout", "5"])
    o = seen.pop("o")
    assert o.api_key == "from-the-environment-0123" and o.restricted_apis == () and o.drain_timeout_s == 5.0
    cli.main(["serve", "--api-key", "from-the-flag-0123456789", "--restricted-apis", "logging,trace"])
    o = seen.pop("o")
    assert o.api_key == "from-the-flag-0123456789" and o.restricted_apis == ("logging", "trace")


def test_short_or_malformed_keys_are_refused_before_start():
    engine = small_engine_config(model="dummy:tiny")
    for key in ("short", "has space in it 0123456789", "colon:and=equals-0123456789"):
        with pytest.raises(ValueError):
            Server(engine, ServerOptions(api_key=key))
    with pytest.raises(ValueError):
        Server(engine, ServerOptions(restricted_apis=("no-such-api",)))


def _argv_and_cmdline(server: Server, monkeypatch=None) -> tuple[list[str], bytes]:
    """Start a stand-in for tritonserver the way the launcher starts tritonserver; returns (the argv it
    parsed, its /proc/PID/cmdline as ps shows it)."""
    import subprocess
    import sys

    script = ("import json, os, sys, time; print(json.dumps(sys.argv[1:]), flush=True); "
              "print(open(f'/proc/{os.getpid()}/cmdline', 'rb').read().hex(), flush=True)")
    cmd = [sys.executable, "-c", script, f"--http-restricted-api=logging:x-k={server.api_key}", "--plain=1"]
    proc = server._spawn_tritonserver(cmd, dict(os.environ), subprocess.PIPE)
    out = proc.communicate(timeout=60)[0].decode().splitlines()
    lines = [line for line in out if not line.startswith("adrenaline:")]
    return json.loads(lines[0]), bytes.fromhex(lines[1])


def test_the_api_key_reaches_tritonserver_but_not_its_command_line(monkeypatch, tmp_path, capsys):
    from adrenaline_py.serving import launcher

    server = Server(small_engine_config(model="dummy:tiny", run_dir=str(tmp_path)),
                    ServerOptions(api_key="k3y-for-the-hiding-test-0123456789"))
    key = server.api_key.encode()
    argv, cmdline = _argv_and_cmdline(server)
    assert argv == [f"--http-restricted-api=logging:x-k={server.api_key}", "--plain=1"]  # parsed for real
    assert key not in cmdline and b"--http-restricted-api=<hidden" in cmdline and b"--plain=1" in cmdline
    assert not server.api_key_on_command_line

    # ptrace refused in the child (Yama ptrace_scope 3, a container profile): said, and the key is visible
    real = launcher.child_setup

    def refusing(**kw):
        setup = real(**{**kw, "stop_at_exec": False})

        def preexec():
            setup()
            if kw.get("stop_at_exec"):
                raise OSError("PTRACE_TRACEME refused")
        return preexec

    monkeypatch.setattr(launcher, "child_setup", refusing)
    argv, cmdline = _argv_and_cmdline(server)
    assert argv[0].endswith(server.api_key) and key in cmdline and server.api_key_on_command_line
    assert "cannot keep the API key off tritonserver's command line" in capsys.readouterr().err

    # the rewrite fails after the child stopped: it is killed before it ran, then started visibly
    monkeypatch.setattr(launcher, "child_setup", real)
    monkeypatch.setattr(launcher, "hide_args", lambda pid, names: (_ for _ in ()).throw(OSError("no /proc/PID/mem")))
    argv, cmdline = _argv_and_cmdline(server)
    assert argv[0].endswith(server.api_key) and server.api_key_on_command_line


# --- listening addresses --------------------------------------------------------------------------


def _listening(ports: set[int]) -> list[tuple[str, int]]:
    """(local address hex, port) of LISTEN sockets on ``ports``, from /proc/net/tcp and tcp6."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, port = fields[1].split(":")
            if fields[3] == "0A" and int(port, 16) in ports:  # 0A = TCP_LISTEN
                out.append((addr, int(port, 16)))
    return out


def _non_loopback_addresses() -> set[str]:
    addrs = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            addrs.add(info[4][0])
    except OSError:
        pass
    try:  # the address a default route would use (no packet is sent by a UDP connect)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            addrs.add(s.getsockname()[0])
    except OSError:
        pass
    return {a for a in addrs if not a.startswith("127.") and a != "0.0.0.0"}


@pytest.mark.server
def test_server_listens_on_loopback_only(server):
    o = server.options
    ports = {o.http_port, o.grpc_port, o.metrics_port}
    sockets = _listening(ports)
    assert {p for _, p in sockets} == ports, sockets
    # 127.0.0.1 in /proc/net/tcp, or ::ffff:127.0.0.1 (gRPC binds an IPv4-mapped socket) in tcp6
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
    assert all(addr in loopback for addr, _ in sockets), f"not only 127.0.0.1: {sockets}"
    for addr in _non_loopback_addresses():
        for port in ports:
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((addr, port)) != 0, f"{addr}:{port} accepts connections"


# --- restricted APIs --------------------------------------------------------------------------------

RESTRICTED_HTTP = [
    ("POST", "/v2/repository/index", {}),
    ("POST", "/v2/repository/models/ensemble/unload", {}),
    ("POST", "/v2/repository/models/ensemble/load", {}),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/systemsharedmemory/region/r/register", {"key": "/decode.kv.shm", "offset": 0, "byte_size": 64}),
    ("POST", "/v2/systemsharedmemory/unregister", {}),
    ("GET", "/v2/cudasharedmemory/status", None),
    ("GET", "/v2/logging", None),
    ("POST", "/v2/logging", {"log_file": "/tmp/adrenaline-security-test.log", "log_verbose_level": 1}),
    ("GET", "/v2/trace/setting", None),
    ("POST", "/v2/trace/setting", {"trace_file": "/tmp/adrenaline-security-test.trace", "trace_level": ["TIMESTAMPS"]}),
    ("GET", "/v2/models/ensemble/trace/setting", None),
]
READ_ONLY_RESTRICTED_HTTP = ["/v2/systemsharedmemory/status", "/v2/cudasharedmemory/status", "/v2/logging",
                             "/v2/trace/setting", "/v2/models/ensemble/trace/setting"]


@pytest.mark.server
@pytest.mark.parametrize(("method", "path", "body"), RESTRICTED_HTTP, ids=[f"{m} {p}" for m, p, _ in RESTRICTED_HTTP])
def test_restricted_http_api_is_refused_without_the_key(server, method, path, body):
    header = server.options.api_key_header
    for headers in ({}, {header: "wrong-key-0123456789abcdef"}, {header: ""}):
        status, out = http(server, method, path, body, headers)
        assert status == 403 and "restricted" in out["error"], (headers, status, out)
    assert not Path("/tmp/adrenaline-security-test.log").exists()
    assert not Path("/tmp/adrenaline-security-test.trace").exists()


MODELS = {"ensemble", "vllm_model", "preprocessing", "scheduler", "prefill", "attention"}  # the repository's


@pytest.mark.server
def test_restricted_http_api_answers_with_the_key(server):
    for path in READ_ONLY_RESTRICTED_HTTP:
        status, out = http(server, "GET", path, headers=server.http_auth_headers)
        assert status == 200, (path, status, out)
    status, index = http(server, "POST", "/v2/repository/index", {}, server.http_auth_headers)
    assert status == 200
    assert {m["name"] for m in index} == MODELS


@pytest.mark.server
def test_restricted_grpc_protocols_need_the_key(server):
    from tritonclient.utils import InferenceServerException

    client = grpc_client(server)
    calls = {
        "model-repository": lambda h: client.get_model_repository_index(headers=h),
        "shared-memory": lambda h: client.get_system_shared_memory_status(headers=h),
        "cuda-shared-memory": lambda h: client.get_cuda_shared_memory_status(headers=h),
        "logging": lambda h: client.get_log_settings(headers=h),
        "trace": lambda h: client.get_trace_settings(headers=h),
        "trace-update": lambda h: client.update_trace_settings(settings={"trace_file": "/tmp/x.trace"}, headers=h),
        "unload": lambda h: client.unload_model("ensemble", headers=h),
    }
    wrong = {k: "wrong-key-0123456789abcdef" for k in server.grpc_auth_headers}
    try:
        for call in calls.values():
            for headers in (None, wrong, {server.options.api_key_header: server.api_key}):  # last: HTTP spelling
                with pytest.raises(InferenceServerException, match="restricted"):
                    call(headers)
        for name in ("model-repository", "shared-memory", "logging", "trace"):
            calls[name](server.grpc_auth_headers)  # allowed with the key
        assert client.is_model_ready("ensemble")
    finally:
        client.close()


@pytest.mark.server
def test_inference_health_and_metadata_stay_open(server):
    for path in ("/v2/health/ready", "/v2/health/live", "/v2", "/v2/models/ensemble", "/v2/models/ensemble/ready",
                 "/v2/models/ensemble/config", "/v2/models/stats"):
        status, out = http(server, "GET", path)
        assert status == 200, (path, status, out)
    generate_ok(server)
    client = grpc_client(server)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.get_model_metadata("ensemble").name == "ensemble"
    finally:
        client.close()


@pytest.mark.server
def test_api_key_file_is_private(server):
    st = server.api_key_path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert server.api_key_path.read_text().strip() == server.api_key
    assert stat.S_IMODE(server.run_dir.stat().st_mode) & 0o077 == 0
    assert len(server.api_key) >= 32


# --- no model from a path -----------------------------------------------------------------------------


@pytest.mark.server
def test_repository_control_cannot_load_a_model_from_a_path(server, tmp_path):
    """Model control mode none: load requests (a repository path, an uploaded model.py) are refused
    without the key (403) and with it ("not allowed"), and the uploaded code never runs."""
    from tritonclient.utils import InferenceServerException

    marker = tmp_path / "model_was_loaded"
    model_py = (f"open({str(marker)!r}, 'w').write('pwned')\n"
                "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n")
    config = json.dumps({"name": "evil", "backend": "python", "max_batch_size": 0,
                         "input": [{"name": "x", "data_type": "TYPE_INT32", "dims": [1]}],
                         "output": [{"name": "y", "data_type": "TYPE_INT32", "dims": [1]}]})
    evil_repo = tmp_path / "repo" / "evil" / "1"
    evil_repo.mkdir(parents=True)
    (evil_repo / "model.py").write_text(model_py)
    (evil_repo.parent / "config.pbtxt").write_text('backend: "python"\n')
    bodies = [
        ("evil", {"parameters": {"config": config,
                                 "file:1/model.py": base64.b64encode(model_py.encode()).decode()}}),
        ("evil", {"parameters": {"config": config, "repository": str(tmp_path / "repo")}}),  # not a parameter
        ("../../../../" + str(evil_repo.parent).lstrip("/"), {}),
        ("ensemble", {"parameters": {"config": config}}),
    ]
    for name, body in bodies:
        status, out = http(server, "POST", f"/v2/repository/models/{name}/load", body)
        assert status in (400, 403, 404), (name, status, out)  # 403: restricted API
        status, out = http(server, "POST", f"/v2/repository/models/{name}/load", body, server.http_auth_headers)
        assert status >= 400 and "error" in out, (name, status, out)
        if not name.startswith("../") and "repository" not in body.get("parameters", {}):
            assert "not allowed" in out["error"], out
    client = grpc_client(server)
    try:
        for headers in (None, server.grpc_auth_headers):
            with pytest.raises(InferenceServerException):
                client.load_model("evil", config=config, files={"file:1/model.py": model_py.encode()}, headers=headers)
    finally:
        client.close()
    time.sleep(1.0)
    assert not marker.exists(), "an uploaded model.py ran"
    status, index = http(server, "POST", "/v2/repository/index", {}, server.http_auth_headers)
    assert {m["name"] for m in index} == MODELS
    assert all(m["state"] == "READY" for m in index)
    status, out = http(server, "GET", "/v2/models/evil")
    assert status >= 400
    generate_ok(server)


# --- hostile inputs (issue 11): a clear error, no traceback or path, and the next request works -----------

MAX_PROMPT_BYTES = max(MAX_MODEL_LEN * 32, 1 << 16)  # request.Limits.max_prompt_bytes
# a Python traceback (as the python backend formats it: "At:" and "file.py(line): function" lines) or a
# path of the server's files; not any slash: fuzzed input names come back in tritonserver's own messages
LEAK = re.compile(r"\bAt:\n|Traceback|\.py\(\d+\)|/dev/shm/|site-packages|/backends/|/model_repository/")

HOSTILE_HTTP = [
    ({"text_input": "hi", "sampling_parameters": json.dumps({"max_tokens": 2**32 + 4})}, "max_tokens must be <= 256"),
    ({"text_input": "hi", "sampling_parameters": json.dumps({"top_k": 2**32 + 1})}, "top_k must be <= 2147483647"),
    ({"text_input": "hi", "sampling_parameters": json.dumps({"min_tokens": 2**32 + 1})}, "min_tokens"),
    ({"text_input": "hi", "sampling_parameters": json.dumps({"seed": 2**64})}, "seed must be in [0, "),
    ({"text_input": "hi", "sampling_parameters": '{"max_tokens": ' + "9" * 5000 + "}"}, "not valid JSON"),
    ({"text_input": "hi", "sampling_parameters": "[" * 60_000}, "not valid JSON"),  # too deep for json
    ({"text_input": "hi", "sampling_parameters": "[" * 70_000}, "sampling_parameters is 70000 bytes"),
    ({"text_input": "hi", "seed": -1}, "seed must be in [0, "),
    ({"text_input": "hi", "temperature": 1e-45}, "temperature must be 0 (greedy) or at least 1e-05"),
    ({"text_input": "hi", "temperature": 1e-39}, "temperature must be 0 (greedy) or at least 1e-05"),  # denormal
    ({"text_input": "hi", "temperature": 1e300}, "temperature must be >= 0, got inf"),  # FP32 overflow
    ({"text_input": "hi", "top_p": -0.5}, "top_p must be in (0, 1]"),
    ({"text_input": "x" * (MAX_PROMPT_BYTES + 1)}, f"text_input is {MAX_PROMPT_BYTES + 1} bytes; at most"),
    ({"text_input": "hi", "stop_words": ["s"] * 300}, "stop_words has 300 entries; at most 256"),
    ({"text_input": "hi", "bad_words": ["b" * 5000]}, "bad_words is 5000 bytes"),
    ({"text_input": "hi", "foo": 1}, "unexpected inference input 'foo' for model 'ensemble'"),
    ({"text_input": "hi", "parameters": {"bogus": 4}}, "unexpected inference input 'bogus' for model"),
]


@pytest.mark.server
@pytest.mark.parametrize(("body", "message"), HOSTILE_HTTP, ids=[m[:40] for _, m in HOSTILE_HTTP])
def test_hostile_http_input_gets_a_clear_error_then_a_good_request_succeeds(server, body, message):
    status, out = http(server, "POST", "/v2/models/ensemble/generate", body)
    assert status == 400 and message in out["error"], (status, out)
    assert not LEAK.search(out["error"]), out
    generate_ok(server)


@pytest.mark.server
def test_hostile_grpc_input_gets_the_same_errors_as_http(server):
    text = np.array([[b"hi"]], dtype=np.object_)
    cases = [
        ([("text_input", text, "BYTES"), ("foo", np.array([[1]], dtype=np.int32), "INT32")],
         "unexpected inference input 'foo' for model 'ensemble'"),  # tritonserver's own message
        ([("text_input", text, "BYTES"), ("temperature", np.array([[1e-45]], dtype=np.float32), "FP32")],
         "temperature must be 0 (greedy) or at least 1e-05"),
        ([("text_input", text, "BYTES"), ("seed", np.array([[-(2**63)]], dtype=np.int64), "INT64")],
         "seed must be in [0, "),
        ([("text_input", np.array([[b"x" * (MAX_PROMPT_BYTES + 1)]], dtype=np.object_), "BYTES")],
         f"text_input is {MAX_PROMPT_BYTES + 1} bytes; at most"),
    ]
    for inputs, message in cases:
        outcome = _grpc_stream_outcome(server, inputs)
        assert message in outcome and not LEAK.search(outcome), outcome
    # the full range of random_seed (UINT64) is a seed: accepted
    ok = [("text_input", text, "BYTES"), ("max_tokens", np.array([[4]], dtype=np.int32), "INT32"),
          ("random_seed", np.array([[2**64 - 1]], dtype=np.uint64), "UINT64")]
    assert _grpc_stream_outcome(server, ok) == "ok"
    generate_ok(server)


@pytest.mark.server
def test_a_denormal_top_p_keeps_the_top_token(server):
    """Documented meaning: top_p keeps the smallest prefix of tokens reaching that mass (always one)."""
    greedy = http(server, "POST", "/v2/models/ensemble/generate", {"text_input": "Once upon", "max_tokens": 12})[1]
    sampled = http(server, "POST", "/v2/models/ensemble/generate",
                   {"text_input": "Once upon", "max_tokens": 12, "temperature": 1.0, "top_p": 1e-45, "seed": 7})[1]
    assert sampled["text_output"] == greedy["text_output"], (greedy, sampled)


def _finished(server: Server) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.options.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^adrenaline_requests_finished_total\{reason="(\w+)"\} (\S+)$', text, re.M)}


def _settled_finished(server: Server, quiet_s: float = 1.5, timeout_s: float = 30.0) -> dict[str, float]:
    """The counters once they stopped moving (decode samples them every 0.5 s, later on a busy host)."""
    last, since = _finished(server), time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.25)
        now = _finished(server)
        if now != last:
            last, since = now, time.monotonic()
    return last


@pytest.mark.server
def test_every_request_end_is_counted_rejections_included(server):
    before = _settled_finished(server)
    for body, _ in HOSTILE_HTTP[:3]:
        assert http(server, "POST", "/v2/models/ensemble/generate", body)[0] == 400
    generate_ok(server)  # 8 tokens: "length"
    after = _settled_finished(server)
    assert after.get("error", 0) - before.get("error", 0) == 3, (before, after)
    assert after.get("length", 0) - before.get("length", 0) == 1, (before, after)


# --- private memory and secrets ------------------------------------------------------------------------


@pytest.mark.server
def test_shm_regions_run_dir_and_its_files_are_owner_only(server):
    regions = [SHM / r for r in server.track_shm_regions() if (SHM / r).exists()]
    assert regions, "expected the python backend's regions"
    modes = {r.name: oct(stat.S_IMODE(r.stat().st_mode)) for r in regions}
    assert set(modes.values()) == {"0o600"}, modes
    assert not server.regions_made_private  # 0600 from their creation (seccomp), not fixed afterwards
    loose = [str(p) for p in [server.run_dir, *server.run_dir.rglob("*")]
             if not p.is_symlink() and p.exists() and stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not loose, loose


@pytest.mark.server
def test_api_key_is_on_no_command_line_and_in_no_log(server):
    assert not server.api_key_on_command_line
    key = server.api_key.encode()
    pids = server.process_group()  # tritonserver, its stubs and their workers
    assert len(pids) >= 6
    for pid in pids:
        assert key not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
    triton_cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
    for flag in (b"--http-restricted-api=<hidden", b"--grpc-restricted-protocol=<hidden"):
        assert flag in triton_cmdline
    assert key not in server.log_path.read_bytes()
    # tritonserver got the real key: the restricted APIs answer with it (and only with it)
    assert http(server, "GET", "/v2/logging", headers=server.http_auth_headers)[0] == 200
    assert http(server, "GET", "/v2/logging")[0] == 403


# --- fuzzing -------------------------------------------------------------------------------------------

INPUT_NAMES = ["text_input", "max_tokens", "stream", "temperature", "top_k", "top_p", "seed", "random_seed",
               "min_tokens", "min_length", "end_id", "pad_id", "stop_words", "bad_words",
               "exclude_input_in_output", "return_num_input_tokens", "return_num_output_tokens",
               "sampling_parameters"]
SAMPLING_KEYS = ["max_tokens", "temperature", "top_k", "top_p", "seed", "min_tokens", "stop", "bad_words",
                 "stop_token_ids", "ignore_eos", "n", "best_of", "use_beam_search", "skip_special_tokens"]


class Tally:
    """How the fuzzed requests ended (printed for docs/reliability.md)."""

    def __init__(self, name: str):
        self.name, self.count, self.outcomes, self.t0 = name, 0, Counter(), time.monotonic()
        self.errors: Counter = Counter()

    def error(self, message: str) -> None:
        assert not LEAK.search(message), f"a client error leaks a traceback or a path: {message[:500]!r}"
        self.errors[re.sub(r"\d+", "N", message.strip())[:90]] += 1

    def report(self) -> str:
        return (f"{self.name}: {self.count} inputs in {time.monotonic() - self.t0:.0f}s; "
                + ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items()))
                + "".join(f"\n    {n:4d} x {m}" for m, n in self.errors.most_common(12)))


def _fuzz_settings(max_examples: int):
    from hypothesis import HealthCheck, Phase, settings

    # derandomized: the same inputs every run (a CI failure reproduces); no shrinking: it would
    # re-run many requests against the server after a failure, past the time budget
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


def _strategies():
    """Hypothesis strategies: ``wild`` (any JSON value, extreme numbers, NaN/inf, lone surrogates,
    prompts around and far past the context limit) and ``valid`` values per input, mixed so that
    about three in four fields are in range and requests get past parsing into the engine."""
    from hypothesis import strategies as st

    any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)  # incl. lone surrogates
    big_int = st.integers(min_value=-(2**80), max_value=2**80)
    small_int = st.integers(min_value=-3, max_value=300)
    floats = st.floats(allow_nan=True, allow_infinity=True)
    leaf = st.one_of(st.none(), st.booleans(), small_int, big_int, floats, any_text)
    json_value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                              | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
    near_limit = st.integers(min_value=MAX_MODEL_LEN - 80, max_value=MAX_MODEL_LEN + 80).map(lambda n: "a" * n)
    far_past_limit = st.integers(min_value=1000, max_value=20000).map(lambda n: "é" * n)
    words = st.lists(st.text(max_size=6), max_size=3)
    valid = {
        "text_input": st.text(min_size=1, max_size=60),
        "max_tokens": st.integers(1, 48),
        "stream": st.booleans(),
        "temperature": st.floats(0, 2),
        "top_k": st.integers(0, 50),
        "top_p": st.floats(0.01, 1),
        "seed": st.integers(0, 2**63 - 1),
        "random_seed": st.integers(0, 2**64 - 1),
        "min_tokens": st.integers(0, 8),
        "min_length": st.integers(0, 8),
        "end_id": st.integers(0, 300),
        "pad_id": st.integers(0, 300),
        "stop_words": words,
        "bad_words": words,
        "exclude_input_in_output": st.booleans(),
        "return_num_input_tokens": st.booleans(),
        "return_num_output_tokens": st.booleans(),
    }
    valid_sampling = {
        "max_tokens": st.integers(1, 48), "temperature": st.floats(0, 2), "top_k": st.integers(-1, 50),
        "top_p": st.floats(0.01, 1), "seed": st.integers(0, 2**63 - 1), "min_tokens": st.integers(0, 8),
        "stop": st.one_of(st.text(max_size=4), words), "bad_words": words,
        "stop_token_ids": st.lists(st.integers(0, 300), max_size=3), "ignore_eos": st.booleans(),
        "n": st.just(1), "best_of": st.just(1), "use_beam_search": st.just(False),
        "skip_special_tokens": st.booleans(),
    }
    valid["sampling_parameters"] = st.fixed_dictionaries({}, optional=valid_sampling).map(json.dumps)
    wild_sampling = st.fixed_dictionaries({}, optional={k: st.one_of(v, v, json_value)
                                                        for k, v in valid_sampling.items()})
    wild = {
        "text_input": st.one_of(any_text, near_limit, far_past_limit, json_value, st.just("")),
        "sampling_parameters": st.one_of(
            wild_sampling.map(lambda d: json.dumps(d, allow_nan=True)),
            st.dictionaries(st.sampled_from(list(valid_sampling)) | st.text(max_size=8), json_value, max_size=3)
            .map(lambda d: json.dumps(d, allow_nan=True)),
            any_text, json_value),
    }
    default_wild = st.one_of(json_value, big_int, floats, small_int)

    def field(name):
        w = wild.get(name, default_wild)
        return st.one_of(valid[name], valid[name], valid[name], w)

    return st, {name: field(name) for name in INPUT_NAMES}, json_value, any_text, valid, wild


def _http_bodies():
    """(path, body bytes): valid requests, valid requests with one field made wild or one unknown
    key added, requests of wild fields, non-objects, and raw bytes (invalid UTF-8 in a string,
    truncated JSON, random bytes)."""
    st, fields, json_value, any_text, valid, wild = _strategies()
    valid_body = st.fixed_dictionaries({"text_input": valid["text_input"]},
                                       optional={k: v for k, v in valid.items() if k != "text_input"})
    one_wild = st.tuples(valid_body, st.sampled_from(INPUT_NAMES)).flatmap(
        lambda t: wild.get(t[1], st.one_of(json_value, st.floats(), st.integers(-(2**80), 2**80))).map(
            lambda v, t=t: {**t[0], t[1]: v}))
    extra_key = st.tuples(valid_body, any_text, json_value).map(lambda t: {t[1]: t[2], **t[0]})
    chaos = st.one_of(st.fixed_dictionaries({}, optional=fields), json_value)
    body = st.one_of(valid_body, valid_body, one_wild, one_wild, extra_key, chaos)
    encoded = body.map(lambda b: json.dumps(b, allow_nan=True).encode())
    raw = st.one_of(
        st.binary(max_size=64).map(lambda b: b'{"text_input": "' + b + b'", "max_tokens": 4}'),
        encoded.flatmap(lambda e: st.integers(0, max(len(e) - 1, 0)).map(lambda n: e[:n])),
        st.binary(max_size=200),
    )
    return st.tuples(st.sampled_from(["generate", "generate_stream"]),
                     st.one_of(encoded, encoded, encoded, encoded, raw))


def _check_http_answer(path: str, status: int, raw: bytes) -> str:
    """Outcome of one fuzzed HTTP request; fails on an answer that is neither valid nor a clear error.

    A clear error is a JSON object (or, from /generate_stream, a server-sent event) with a non-empty
    "error" string. tritonserver 2.51 sends some errors with status 200 (/generate of a request that
    streams: "generate expects model to produce exactly 1 response") and the errors of
    /generate_stream before the first response as an event with status 400.
    """
    text = raw.decode("utf-8", errors="replace")
    if path == "generate_stream" and text.startswith("data: "):
        # split on "\n" only: str.splitlines() also splits inside a JSON string at U+0085, U+2028, ...
        events = [json.loads(line[len("data: "):]) for line in text.split("\n") if line.startswith("data: ")]
        for e in events[:-1]:
            assert "error" not in e and e.get("finish_reason") == "", events
        last = events[-1]
        if "error" in last:
            assert isinstance(last["error"], str) and last["error"].strip(), last
            return f"{status} stream error", last["error"]
        assert status == 200 and last.get("finish_reason") in ("stop", "length"), (status, last)
        return "200 stream ok", None
    try:
        out = json.loads(text)
    except ValueError:
        pytest.fail(f"status {status}: neither JSON nor events: {text[:300]!r}")
    if isinstance(out, dict) and "error" in out:
        assert isinstance(out["error"], str) and out["error"].strip(), (status, out)
        assert status >= 400 or "exactly 1 response" in out["error"], (status, out)
        return f"{status} error", out["error"]
    assert status == 200 and path == "generate", (status, out)
    assert isinstance(out.get("text_output"), str) and out.get("finish_reason") in ("stop", "length"), out
    return "200 ok", None


def _assert_alive(server: Server) -> None:
    assert server.process.poll() is None, f"tritonserver died (exit {server.process.returncode}); see {server.log_path}"


def _busy_gauges(server: Server) -> dict[str, float]:
    """Gauges of the engine's metrics that must be 0 when no request is in flight (none if the
    engine exports none of them)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.options.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.split("\n"):
        if line.startswith(("adrenaline_kv_blocks_used", "adrenaline_decode_requests", "adrenaline_admission_waiting")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _assert_served_and_idle(server: Server) -> None:
    """After fuzzing: the server is alive and ready, serves a normal request, and every request's
    KV blocks came back (the engine's gauges return to 0; sampled every 0.5 s)."""
    _assert_alive(server)
    assert http(server, "GET", "/v2/health/ready")[0] == 200
    generate_ok(server)
    deadline = time.monotonic() + 20
    while any(_busy_gauges(server).values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    busy = {k: v for k, v in _busy_gauges(server).items() if v}
    assert not busy, f"requests or KV blocks still held after fuzzing: {busy}"


@pytest.mark.server
def test_fuzz_http_generate(server, capsys):
    from hypothesis import example, given

    tally = Tally("HTTP /generate and /generate_stream")

    @_fuzz_settings(FUZZ_HTTP_EXAMPLES)
    @given(_http_bodies())
    @example(("generate", b'{"text_input": "\xff\xfe\xfd", "max_tokens": 4}'))
    @example(("generate", b'{"text_input": "hi", "temperature": NaN, "top_p": Infinity}'))
    @example(("generate", b'{"text_input": "hi", "max_tokens": 99999999999999999999999}'))
    @example(("generate", b'{"text_input": "hi", "seed": -1, "random_seed": -5}'))
    @example(("generate", b'{"text_input": "hi", "stream": true}'))
    @example(("generate_stream", b'{"text_input": "hi", "stream": true, "sampling_parameters": "{\\"n\\": 2}"}'))
    @example(("generate", json.dumps({"text_input": "x" * (MAX_MODEL_LEN - 2), "max_tokens": 1}).encode()))
    @example(("generate", json.dumps({"text_input": "\ud800 lone surrogate", "max_tokens": 2}).encode()))
    def check(case):
        path, body = case
        tally.count += 1
        req = urllib.request.Request(f"{server.http_url}/v2/models/ensemble/{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (TimeoutError, urllib.error.URLError) as e:  # URLError: refused or timed out connecting
            pytest.fail(f"no answer within {REQUEST_TIMEOUT_S}s (hang) or no server for {body[:200]!r}: {e!r}")
        outcome, message = _check_http_answer(path, status, raw)
        tally.outcomes[outcome] += 1
        if message:
            tally.error(message)
        _assert_alive(server)

    try:
        check()
    finally:
        with capsys.disabled():
            print(f"\n[fuzz] {tally.report()}")
    _assert_served_and_idle(server)


GRPC_DTYPES = {"text_input": "BYTES", "max_tokens": "INT32", "stream": "BOOL", "temperature": "FP32",
               "top_k": "INT32", "top_p": "FP32", "seed": "INT64", "random_seed": "UINT64", "min_tokens": "INT32",
               "min_length": "INT32", "end_id": "INT32", "pad_id": "INT32", "stop_words": "BYTES",
               "bad_words": "BYTES", "exclude_input_in_output": "BOOL", "return_num_input_tokens": "BOOL",
               "return_num_output_tokens": "BOOL", "sampling_parameters": "BYTES"}
NUMPY_DTYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
                "UINT8": np.uint8, "UINT32": np.uint32, "UINT64": np.uint64, "FP16": np.float16,
                "FP32": np.float32, "FP64": np.float64}


def _grpc_tensors():
    """Lists of (name, array, datatype): mostly the contract's names, types and [1, 1] shapes with
    in-range or extreme values (full dtype range, NaN, inf), sometimes wrong types, shapes
    (batch > 1, extra dims) and unknown names; BYTES elements are random bytes (invalid UTF-8),
    text, prompts around the context limit or sampling JSON."""
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    _, fields, _, _, valid, wild = _strategies()
    shapes = st.one_of(st.sampled_from([(1,), (2, 1), (1, 3), (1, 1, 1)]),
                       hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))

    def encode(v) -> bytes:
        return (v if isinstance(v, str) else json.dumps(v, allow_nan=True)).encode("utf-8", "surrogatepass")

    bytes_elem = st.one_of(st.binary(max_size=80), fields["text_input"].map(encode),
                           fields["sampling_parameters"].map(encode))

    def scalar_for(name):
        dt = GRPC_DTYPES[name]
        if dt == "BYTES":
            if name in ("stop_words", "bad_words"):
                return st.lists(bytes_elem | st.text(max_size=6).map(str.encode), min_size=1, max_size=4).map(
                    lambda xs: np.array([xs], dtype=np.object_))
            ok = valid[name].map(encode)
            return st.one_of(ok, ok, ok, bytes_elem).map(lambda b: np.array([[b]], dtype=np.object_))
        in_range = valid[name].map(lambda v: np.array([[v]], dtype=NUMPY_DTYPES[dt]))
        extreme = hnp.arrays(NUMPY_DTYPES[dt], (1, 1))  # the whole range of the type, NaN and inf
        return st.one_of(in_range, in_range, extreme)

    def any_tensor():
        def bytes_array(shape):
            return st.lists(bytes_elem, min_size=math.prod(shape), max_size=math.prod(shape)).map(
                lambda xs: np.array(xs, dtype=np.object_).reshape(shape))

        return st.tuples(st.sampled_from(["BYTES", *NUMPY_DTYPES]), shapes).flatmap(
            lambda t: (bytes_array(t[1]) if t[0] == "BYTES" else hnp.arrays(NUMPY_DTYPES[t[0]], t[1]))
            .map(lambda a, dt=t[0]: (a, dt)))

    def tensor_for(name):
        if name in GRPC_DTYPES:
            right = scalar_for(name).map(lambda a: (name, a, GRPC_DTYPES[name]))
            return st.one_of(right, right, right, right, right, any_tensor().map(lambda t: (name, *t)))
        return any_tensor().map(lambda t: (name, *t))

    def right(name):
        return scalar_for(name).map(lambda a: (name, a, GRPC_DTYPES[name]))

    names = st.lists(st.sampled_from(INPUT_NAMES[1:]), max_size=6, unique=True)
    valid_request = names.flatmap(lambda ns: st.tuples(right("text_input"), *[right(n) for n in ns]).map(list))
    # one input replaced by a tensor of any type and shape, or an unknown input added
    mutated = st.tuples(valid_request, st.sampled_from(INPUT_NAMES) | st.text(min_size=1, max_size=12),
                        any_tensor()).map(
        lambda t: [x for x in t[0] if x[0] != t[1]] + [(t[1], *t[2])])
    chaos = st.lists(st.sampled_from(INPUT_NAMES) | st.text(min_size=1, max_size=12), max_size=5, unique=True).flatmap(
        lambda ns: st.tuples(*[tensor_for(n) for n in ns]).map(list))
    return st.one_of(valid_request, valid_request, mutated, mutated, chaos)


def _grpc_stream_outcome(server: Server, inputs) -> str:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpc_client(server)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        tensors = []
        for name, value, dtype in inputs:
            t = grpcclient.InferInput(name, list(value.shape), dtype)
            t.set_data_from_numpy(value)
            tensors.append(t)
        try:
            client.async_stream_infer("ensemble", tensors, enable_empty_final_response=True)
        except InferenceServerException as e:
            return f"client refused: {e}"
        got = 0
        while True:
            try:
                result, error = results.get(timeout=REQUEST_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(f"no answer within {REQUEST_TIMEOUT_S}s (hang); {got} responses so far")
            if error is not None:
                assert str(error).strip(), "an error without a message"
                return f"error: {error}"
            response = result.get_response()
            final = response.parameters.get("triton_final_response")
            if response.outputs:
                got += 1
                assert result.as_numpy("text_output") is not None and result.as_numpy("finish_reason") is not None
            if final is not None and final.bool_param:
                assert got >= 1, "final flag without any response or error"
                return "ok"
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.server
def test_fuzz_grpc_stream(server, capsys):
    from hypothesis import example, given

    tally = Tally("gRPC stream")
    text = np.array([[b"hello"]], dtype=np.object_)

    @_fuzz_settings(FUZZ_GRPC_EXAMPLES)
    @given(_grpc_tensors())
    @example([("text_input", np.array([[b"\xff\xfe bad"]], dtype=np.object_), "BYTES")])
    @example([("text_input", text, "BYTES"), ("temperature", np.array([[np.nan]], dtype=np.float32), "FP32")])
    @example([("text_input", text, "BYTES"), ("top_p", np.array([[np.inf]], dtype=np.float32), "FP32")])
    @example([("text_input", text, "BYTES"), ("max_tokens", np.array([[-(2**31)]], dtype=np.int32), "INT32")])
    @example([("text_input", text, "BYTES"), ("random_seed", np.array([[2**64 - 1]], dtype=np.uint64), "UINT64")])
    @example([("text_input", text, "BYTES"), ("seed", np.array([[-(2**63)]], dtype=np.int64), "INT64")])
    @example([("text_input", np.array([[b"a"], [b"b"]], dtype=np.object_), "BYTES")])
    @example([("text_input", text, "BYTES"), ("stop_words", np.array([[b"\xff", b""]], dtype=np.object_), "BYTES")])
    @example([("max_tokens", np.array([[4]], dtype=np.int32), "INT32")])
    @example([])
    def check(inputs):
        tally.count += 1
        outcome = _grpc_stream_outcome(server, inputs)
        tally.outcomes[outcome.split(":")[0]] += 1
        if outcome.startswith(("error", "client")):
            tally.error(outcome)
        _assert_alive(server)

    try:
        check()
    finally:
        with capsys.disabled():
            print(f"\n[fuzz] {tally.report()}")
    _assert_served_and_idle(server)
