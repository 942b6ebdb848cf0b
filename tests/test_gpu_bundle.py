"""tools/gpu_bundle.py: runtime selection, wheel handling and the unpacked runtime serving a model."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from adrenaline_py.serving.triton_runtime import TritonRuntime, TritonRuntimeError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "tools" / "gpu_bundle.py")
gb = importlib.util.module_from_spec(_spec)
sys.modules["gpu_bundle"] = gb  # dataclasses look their module up by name
_spec.loader.exec_module(gb)

ECHO_CONFIG = """\
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
# answers with the numpy the stub's embedded Python imported: it must be numpy 1.x
ECHO_MODEL = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
            reply = text + f" numpy={np.__version__}".encode()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("text_output", np.array([reply], np.object_))]))
        return out
"""


def _source_runtime() -> TritonRuntime:
    try:
        return TritonRuntime.locate()
    except TritonRuntimeError as e:
        pytest.skip(f"no tritonserver runtime to bundle: {e}")


# --------------------------------------------------------------------------------------- pure logic
def test_library_closure_follows_needed_and_separates_system_libraries() -> None:
    graph = {"a.so": ["b.so", "libc.so.6"], "b.so": ["c.so", "libz.so.1"], "c.so": ["a.so"], "unused.so": ["d.so"],
             "d.so": []}
    available = {name: Path(name) for name in graph}
    bundled, system = gb.library_closure(["a.so", "libstdc++.so.6"], available, lambda p: graph[p.name])
    assert bundled == ["a.so", "b.so", "c.so"]  # cycle handled, unused.so/d.so left out
    assert system == ["libc.so.6", "libstdc++.so.6", "libz.so.1"]


def test_elf_needed_matches_readelf() -> None:
    exe = Path(os.path.realpath(sys.executable))
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not installed")
    out = subprocess.run([readelf, "-d", str(exe)], capture_output=True, text=True, check=True).stdout
    expected = [line.split("[", 1)[1].rstrip("]").strip() for line in out.splitlines() if "(NEEDED)" in line]
    assert gb.elf_needed(exe) == expected
    with pytest.raises(gb.BundleError):
        gb.elf_needed(Path(__file__))


def test_find_wheel_matches_name_version_and_python(tmp_path: Path) -> None:
    for name in ("numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                 "numpy-1.26.3-cp312-cp312-manylinux_2_17_x86_64.whl", "gguf-0.19.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    numpy = gb.WheelSpec("numpy", "1.26.4", "")
    assert gb.find_wheel(tmp_path, numpy, "3.12") is None  # only a cp311 build and another version
    assert gb.find_wheel(tmp_path, numpy, "3.11").name.startswith("numpy-1.26.4-cp311")
    assert gb.find_wheel(tmp_path, gb.WheelSpec("gguf", "0.19.0", ""), "3.12") is not None
    assert gb.find_wheel(tmp_path, gb.WheelSpec("GGUF", "0.18.0", ""), "3.12") is None


def _fake_wheel(path: Path, name: str, version: str) -> Path:
    whl = path / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        z.writestr(f"{name}-{version}.data/purelib/{name}_extra.py", "X = 1\n")
        z.writestr(f"{name}-{version}.data/scripts/{name}-tool", "#!/bin/sh\necho hi\n")
        record = f"{name}/__init__.py,,\n{name}_extra.py,,\n{name}-{version}.dist-info/RECORD,,\n"
        z.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n")
        z.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return whl


def test_install_wheel_unpacks_replaces_versions_and_is_idempotent(tmp_path: Path) -> None:
    site, bin_dir = tmp_path / "site", tmp_path / "bin"
    site.mkdir()
    bin_dir.mkdir()
    old = _fake_wheel(tmp_path, "pkg", "1.0")
    assert gb.install_wheel(old, site, bin_dir)
    assert not gb.install_wheel(old, site, bin_dir)  # already there
    assert (site / "pkg_extra.py").is_file() and os.access(bin_dir / "pkg-tool", os.X_OK)
    assert gb.installed_version(site, "pkg") == "1.0"
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    assert gb.install_wheel(_fake_wheel(new_dir, "pkg", "2.0"), site, bin_dir)
    assert gb.installed_version(site, "pkg") == "2.0"
    assert not (site / "pkg-1.0.dist-info").exists()
    assert "2.0" in (site / "pkg" / "__init__.py").read_text()


def test_verify_rejects_a_changed_file(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"abc")
    manifest = {"files": [{"path": "x.bin", "bytes": 3, "sha256": gb.sha256_file(tmp_path / "x.bin")}]}
    (tmp_path / gb.MANIFEST).write_text(json.dumps(manifest))
    gb.verify(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"abd")
    with pytest.raises(gb.BundleError, match="differs"):
        gb.verify(tmp_path)


# ----------------------------------------------------------------------------------- real runtime
def test_select_runtime_files_keeps_the_server_closure() -> None:
    rt = _source_runtime()
    site = rt.libs_dir.parent
    sel = gb.select_runtime_files(site, ("3.11", "3.12"))
    files = set(sel.files)
    for rel in ("pytriton/tritonserver/bin/tritonserver",
                "pytriton/tritonserver/backends/python/libtriton_python.so",
                "pytriton/tritonserver/backends/python/triton_python_backend_utils.py",
                "pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub",
                "pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub"):
        assert rel in files
    assert not any("/3.13/" in f or "/3.8/" in f or "libpython3" in f or "__pycache__" in f for f in files)
    assert any(f.startswith("nvidia_pytriton.libs/libtritonserver") for f in files)
    shipped_libs = {Path(f).name for f in files if f.startswith("nvidia_pytriton.libs/")}
    for f in files:  # closed: every NEEDED is shipped or a system library
        if not f.endswith(".py"):
            for name in gb.elf_needed(site / f):
                assert name in shipped_libs or name in sel.system_libraries, (f, name)
    assert "libpython3.12.so.1.0" in sel.system_libraries  # the stub's, from the target system


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.server
def test_unpacked_runtime_is_located_and_serves(tmp_path: Path) -> None:
    """Pack the runtime, install it into a fresh venv like the bring-up, serve a python model from it."""
    rt = _source_runtime()
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    sel = gb.select_runtime_files(rt.libs_dir.parent, (version,))
    bundle = tmp_path / "bundle"
    tarball = bundle / gb.RUNTIME_TARBALL
    t0 = time.monotonic()
    gb.build_runtime_tarball(sel, tarball, preset=0, cache_dir=tmp_path / "cache")  # fast preset for CI
    files = [{"path": gb.RUNTIME_TARBALL, "bytes": tarball.stat().st_size, "sha256": gb.sha256_file(tarball)}]
    (bundle / gb.MANIFEST).write_text(json.dumps({"python_version": version, "files": files, "wheels": []}))
    # numpy and the rest come from this interpreter's site-packages, after the venv's own
    sites = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    site = gb.install(bundle, venv, base, None, extra_sites=sites)
    took_install = time.monotonic() - t0

    venv_rt = TritonRuntime.locate(venv / "bin" / "python")
    assert venv_rt.tritonserver.is_relative_to(site) and venv_rt.libs_dir == site / "nvidia_pytriton.libs"
    assert not list((site / "nvidia_pytriton.libs").glob("libpython3*"))  # the 3.13 stub's, left out

    repo = tmp_path / "models"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    backend_dir = venv_rt.prepare(tmp_path / "work")
    port = _free_port()
    cmd = venv_rt.server_command(repo, backend_dir, port, _free_port(), None)
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=venv_rt.environment(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                    ready = r.status == 200
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        assert ready, f"not ready (exit {proc.poll()}):\n{log_path.read_text()[-4000:]}"
        body = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/echo/infer",
                                     data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        text = answer["outputs"][0]["data"][0]
        assert text.startswith("hello numpy=1."), text  # the stub runs numpy 1.x from the venv's path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print(f"tarball {tarball.stat().st_size / 2**20:.1f} MiB (preset 0), packed and installed in {took_install:.0f}s")
