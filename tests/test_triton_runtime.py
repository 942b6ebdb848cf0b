"""Start the tritonserver shipped by nvidia-pytriton on a one-model repository and query it over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

try:
    from adrenaline_py.serving.triton_runtime import TritonRuntime, TritonRuntimeError
except ModuleNotFoundError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from adrenaline_py.serving.triton_runtime import TritonRuntime, TritonRuntimeError

START_TIMEOUT_S = 180.0
ECHO_CONFIG = """\
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
ECHO_MODEL = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
            out = np.array([b"echo: " + text.reshape(-1)[0]], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("text_output", out)]))
        return responses
"""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _log_tail(path: Path, n: int = 80) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no server log>"
    return "\n".join(lines[-n:])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _start(rt: TritonRuntime, repo: Path, backend_dir: Path, log_path: Path):
    """Start tritonserver on free ports; retry when a port was taken meanwhile. Returns (proc, http_port)."""
    for _attempt in range(3):
        http_port, grpc_port, metrics_port = _free_ports(3)
        cmd = rt.server_command(repo, backend_dir, http_port, grpc_port, metrics_port)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=rt.environment(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        url = f"http://127.0.0.1:{http_port}/v2/health/ready"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return proc, http_port
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        _stop(proc)
        if "already in use" not in _log_tail(log_path, 400):
            break
    pytest.fail(
        f"tritonserver did not become ready (exit code {proc.returncode})\n"
        f"command: {' '.join(cmd)}\n--- server log ---\n{_log_tail(log_path)}"
    )


@pytest.mark.server
def test_tritonserver_echo_roundtrip(tmp_path: Path) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    try:
        rt = TritonRuntime.locate()
    except TritonRuntimeError as exc:
        pytest.skip(str(exc))

    repo = tmp_path / "models"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(textwrap.dedent(ECHO_MODEL))
    backend_dir = rt.prepare(tmp_path / "work")
    assert (backend_dir / "python" / "triton_python_backend_stub").exists()

    log_path = tmp_path / "server.log"
    proc, http_port = _start(rt, repo, backend_dir, log_path)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=60.0)
        assert client.is_model_ready("echo"), _log_tail(log_path)
        inp = httpclient.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"hello triton"], dtype=np.object_))
        try:
            result = client.infer("echo", [inp])
        except Exception as exc:  # show the server's side of the failure
            pytest.fail(f"inference failed: {exc}\n--- server log ---\n{_log_tail(log_path)}")
        assert result.as_numpy("text_output").tolist() == [b"echo: hello triton"]
        client.close()
    finally:
        _stop(proc)
    assert proc.returncode is not None


def test_perf_analyzer_wrapper_moves_the_binary_aside_and_finds_libcudart(tmp_path: Path) -> None:
    """A fake venv: `perf_analyzer` is an ELF binary (a copy of /bin/echo); after the install the
    wrapper runs it with the wheel's libcudart directory first on LD_LIBRARY_PATH; twice is a no-op."""
    try:
        rt = TritonRuntime.locate()
    except TritonRuntimeError as exc:
        pytest.skip(str(exc))
    import dataclasses
    import shutil

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2("/bin/echo", bin_dir / "perf_analyzer")
    fake = dataclasses.replace(rt, python_executable=bin_dir / "python")
    for _ in range(2):
        wrapper = fake.install_perf_analyzer_wrapper()
        assert wrapper == bin_dir / "perf_analyzer"
        assert (bin_dir / "perf_analyzer.bin").read_bytes()[:4] == b"\x7fELF"
    out = subprocess.run([str(wrapper), "hello"], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/elsewhere"})
    assert out.stdout == "hello\n"
    libs = tmp_path / "venv" / "lib" / "perf_analyzer_libs"
    assert (libs / "libcudart.so.12").resolve().is_file()
    script = wrapper.read_text()
    assert f'LD_LIBRARY_PATH="{libs}' in script and "perf_analyzer.bin" in script


def test_installed_perf_analyzer_starts_without_extra_environment() -> None:
    """`make venv` installs the wrapper: a plain `perf_analyzer --version` must load its libraries."""
    try:
        rt = TritonRuntime.locate()
    except TritonRuntimeError as exc:
        pytest.skip(str(exc))
    if rt.perf_analyzer is None:
        pytest.skip("perf_analyzer not installed (tritonclient[all])")
    if not subprocess.run(["sh", "-c", "ldconfig -p | grep -q libb64.so.0d"]).returncode == 0:
        pytest.skip("perf_analyzer needs Debian's libb64-0d (tools/install_system_deps.sh installs it)")
    out = subprocess.run([str(rt.perf_analyzer), "--version"], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert "Perf Analyzer Version" in out.stdout + out.stderr, out.stderr
