"""Find and prepare the Triton Inference Server that ships inside the ``nvidia-pytriton`` wheel.

PyPI ``nvidia-pytriton==0.7.0`` contains a complete ``tritonserver`` 2.51.0 binary, the python backend
(``libtriton_python.so`` + ``triton_python_backend_utils.py``) and python-backend stubs for Python
3.8-3.13, with their shared libraries in ``site-packages/nvidia_pytriton.libs``. This module runs that
server directly, without PyTriton's Python API and without importing anything from Triton:

    rt = TritonRuntime.locate()                 # paths for the running interpreter
    backend_dir = rt.prepare(work_dir, extra_backends={"adrenaline": Path("backends/adrenaline")})
    env = rt.environment()
    cmd = rt.server_command(model_repository, backend_dir, http_port=8000, grpc_port=8001,
                            metrics_port=8002)
    subprocess.Popen(cmd, env=env)

Facts this relies on (checked against tritonserver 2.51.0 from the wheel):

* The stub (``triton_python_backend_stub``) links ``libpython3.X.so.1.0``; it must match the Python
  that runs the models, so the stub is picked by the interpreter's version and the directory of that
  interpreter's ``libpython`` goes first on ``LD_LIBRARY_PATH``.
* The stub's embedded Python takes ``sys.prefix`` (and so its site-packages) from the first
  ``python3`` on ``PATH``; :meth:`TritonRuntime.environment` puts the interpreter's own ``bin`` first
  so a virtualenv is honoured. Keep ``numpy<2``: the 2.51 stub corrupts numpy 2 tensors.
* Python-based backends: a directory ``<backend-directory>/<name>/model.py`` next to
  ``<backend-directory>/python/`` makes ``backend: "<name>"`` in a model's config.pbtxt run that shared
  ``model.py`` through the python backend (the model's version directory may then be empty).
* ``perf_analyzer`` (from ``tritonclient[all]``) needs Debian's ``libb64-0d`` (install it with
  ``tools/install_system_deps.sh``) and a ``libcudart.so.12``; :meth:`perf_analyzer_environment`
  provides the latter by linking the wheel's bundled libcudart.

Only the standard library is used, so this file can also be run as a script with another interpreter
(``python triton_runtime.py --probe``) to describe that interpreter.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "TritonRuntime",
    "TritonRuntimeError",
    "DEFAULT_PYTHON_BACKEND_CONFIG",
    "DEFAULT_RESTRICTED_APIS",
    "PYTHON_BACKEND_FILES",
    "TRITON_APIS",
    "restricted_header_names",
]

#: python-backend settings passed as ``--backend-config=python,<key>=<value>``. The shared-memory
#: region of each model instance starts at ``shm-default-byte-size`` and grows in
#: ``shm-growth-byte-size`` steps (Triton's defaults are 1 MiB each, too small for logits/KV traffic);
#: ``stub-timeout-seconds`` must cover ``import torch`` in a stub's start-up (default 30 s).
DEFAULT_PYTHON_BACKEND_CONFIG: dict[str, str] = {
    "shm-default-byte-size": str(16 * 1024 * 1024),
    "shm-growth-byte-size": str(16 * 1024 * 1024),
    "stub-timeout-seconds": "120",
}

#: API groups of ``--http-restricted-api`` / ``--grpc-restricted-protocol`` in tritonserver 2.51
TRITON_APIS = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
               "statistics", "trace", "logging")
#: API groups that need the key by default: everything that changes the server or reads or writes
#: files or memory it was not configured with. Inference, health, metadata, model configuration and
#: statistics stay open (perf_analyzer and genai-perf read the last two).
DEFAULT_RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")
_HEADER_KEY = re.compile(r"[a-z0-9][a-z0-9_-]*")
_HEADER_VALUE = re.compile(r"[A-Za-z0-9._~+/-]+")

#: files of the python backend that a backend directory needs (the stub is added per Python version)
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUB_NAME = "triton_python_backend_stub"


class TritonRuntimeError(RuntimeError):
    """The Triton runtime from nvidia-pytriton cannot be found or used."""


def _probe_current() -> dict[str, str | None]:
    """Describe the running interpreter: version, pytriton location, libpython location."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    spec = importlib.util.find_spec("pytriton")  # top-level: does not import pytriton
    pytriton_dir = None
    if spec is not None and spec.submodule_search_locations:
        pytriton_dir = list(spec.submodule_search_locations)[0]
    soname = sysconfig.get_config_var("INSTSONAME") or f"libpython{version}.so.1.0"
    if not soname.endswith(".so") and ".so." not in soname:  # static builds report libpythonX.Y.a
        soname = f"libpython{version}.so.1.0"
    libdir = sysconfig.get_config_var("LIBDIR")
    return {
        "version": version,
        "pytriton_dir": pytriton_dir,
        "libpython_soname": soname,
        "libdir": libdir,
        "base_prefix": sys.base_prefix,
        "executable": sys.executable,
    }


def _probe(python_executable: str | os.PathLike[str]) -> dict[str, str | None]:
    exe = Path(python_executable)
    if exe == Path(sys.executable):
        return _probe_current()
    try:
        out = subprocess.run(
            [str(exe), str(Path(__file__).resolve()), "--probe"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise TritonRuntimeError(f"cannot query Python interpreter {exe}: {exc}") from exc
    return json.loads(out.strip().splitlines()[-1])


def _find_libpython(soname: str, libdir: str | None, base_prefix: str | None) -> Path | None:
    """Directory holding ``soname``: the interpreter's LIBDIR first, then the dynamic linker's cache."""
    candidates = [libdir, f"{base_prefix}/lib" if base_prefix else None]
    for d in candidates:
        if d and (Path(d) / soname).exists():
            return Path(d)
    try:
        cache = subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        cache = ""
    for line in cache.splitlines():
        line = line.strip()
        if line.startswith(soname + " ") and "=>" in line:
            path = Path(line.split("=>", 1)[1].strip())
            if path.exists():
                return path.parent
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        if (Path(d) / soname).exists():
            return Path(d)
    return None


def restricted_header_names(key: str) -> tuple[str, str]:
    """(HTTP header, gRPC metadata key) that carry the value of restricted API key ``key``.

    tritonserver 2.51 checks the HTTP header ``key`` and, over gRPC, the metadata key
    ``triton-grpc-protocol-<key>``.
    """
    return key, f"triton-grpc-protocol-{key}"


def _restriction_args(apis: Sequence[str], header: tuple[str, str] | None) -> list[str]:
    apis = [a.strip() for a in apis if a.strip()]
    if not apis:
        return []
    unknown = sorted(set(apis) - set(TRITON_APIS))
    if unknown:
        raise ValueError(f"unknown API group(s) {unknown}; tritonserver 2.51 knows {list(TRITON_APIS)}")
    if header is None:
        raise ValueError(f"restricting {apis} needs a header key and value")
    key, value = header
    if not _HEADER_KEY.fullmatch(key):
        raise ValueError(f"API key header {key!r}: use lower-case letters, digits, '-' and '_' "
                         "(gRPC metadata keys are lower case)")
    if not _HEADER_VALUE.fullmatch(value):
        raise ValueError("API key: use letters, digits and . _ ~ + / - only (no spaces, ':', ',' or '=')")
    spec = f"{','.join(dict.fromkeys(apis))}:{key}={value}"
    return [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]


def _join_paths(*parts: str | os.PathLike[str] | None) -> str:
    seen: list[str] = []
    for part in parts:
        if not part:
            continue
        for p in str(part).split(os.pathsep):
            if p and p not in seen:
                seen.append(p)
    return os.pathsep.join(seen)


def _place(src: Path, dst: Path, mode: str) -> None:
    """Put ``src`` at ``dst`` as a symlink or a copy, replacing what is there."""
    if dst.is_symlink() or dst.is_file():
        if mode == "symlink" and dst.is_symlink() and os.readlink(dst) == str(src):
            return
        dst.unlink()
    elif dst.exists():
        shutil.rmtree(dst)
    if mode == "symlink":
        dst.symlink_to(src)
    elif mode == "copy":
        shutil.copy2(src, dst)
    else:
        raise ValueError(f"link mode must be 'symlink' or 'copy', not {mode!r}")


@dataclass(frozen=True)
class TritonRuntime:
    """Paths of the Triton server shipped by ``nvidia-pytriton`` for one Python interpreter."""

    python_executable: Path  #: the interpreter whose environment the python-backend models use
    python_version: str  #: "3.11"
    tritonserver: Path  #: .../pytriton/tritonserver/bin/tritonserver
    python_backend_dir: Path  #: .../pytriton/tritonserver/backends/python
    stub: Path  #: .../pytriton/tritonserver/python_backend_stubs/3.X/triton_python_backend_stub
    libs_dir: Path  #: .../site-packages/nvidia_pytriton.libs
    libpython_dir: Path  #: directory of libpython3.X.so.1.0 for that interpreter
    perf_analyzer: Path | None = field(default=None)  #: tritonclient's perf_analyzer, if installed

    # ------------------------------------------------------------------ discovery
    @classmethod
    def locate(cls, python_executable: str | os.PathLike[str] = sys.executable) -> TritonRuntime:
        """Find the runtime installed for ``python_executable`` (default: this interpreter).

        Raises :class:`TritonRuntimeError` with an actionable message when nvidia-pytriton, the stub
        for this Python version or the interpreter's shared libpython is missing.
        """
        exe = Path(python_executable)
        info = _probe(exe)
        version = str(info["version"])
        if not info["pytriton_dir"]:
            raise TritonRuntimeError(
                f"nvidia-pytriton is not installed for {exe} (Python {version}); "
                f"install it with: {exe} -m pip install 'nvidia-pytriton==0.7.0' 'numpy<2'"
            )
        pytriton_dir = Path(str(info["pytriton_dir"]))
        server_dir = pytriton_dir / "tritonserver"
        tritonserver = server_dir / "bin" / "tritonserver"
        backend_dir = server_dir / "backends" / "python"
        stubs_dir = server_dir / "python_backend_stubs"
        stub = stubs_dir / version / STUB_NAME
        libs_dir = pytriton_dir.parent / "nvidia_pytriton.libs"
        if not tritonserver.is_file():
            raise TritonRuntimeError(
                f"{tritonserver} is missing: this nvidia-pytriton install has no tritonserver binary "
                "(only the Linux wheels ship one; reinstall nvidia-pytriton==0.7.0)"
            )
        for name in PYTHON_BACKEND_FILES:
            if not (backend_dir / name).is_file():
                raise TritonRuntimeError(f"python backend file {backend_dir / name} is missing")
        if not stub.is_file():
            have = sorted(p.name for p in stubs_dir.iterdir()) if stubs_dir.is_dir() else []
            raise TritonRuntimeError(
                f"no python-backend stub for Python {version} in {stubs_dir} (available: {have})"
            )
        if not libs_dir.is_dir():
            raise TritonRuntimeError(f"{libs_dir} (the wheel's bundled shared libraries) is missing")
        soname = str(info["libpython_soname"])
        libpython_dir = _find_libpython(soname, info.get("libdir"), info.get("base_prefix"))
        if libpython_dir is None:
            raise TritonRuntimeError(
                f"{soname} not found (interpreter LIBDIR {info.get('libdir')}, ldconfig): the stub "
                f"needs a shared libpython. Install it (Debian/Ubuntu: apt-get install libpython{version}) "
                "or use a Python built with --enable-shared"
            )
        bin_dir = exe.parent
        pa = bin_dir / "perf_analyzer"
        if not pa.is_file():
            found = shutil.which("perf_analyzer")
            pa = Path(found) if found else None
        return cls(
            python_executable=exe,
            python_version=version,
            tritonserver=tritonserver,
            python_backend_dir=backend_dir,
            stub=stub,
            libs_dir=libs_dir,
            libpython_dir=libpython_dir,
            perf_analyzer=pa,
        )

    # ------------------------------------------------------------------ backends
    def prepare(
        self,
        work_dir: str | os.PathLike[str],
        extra_backends: Mapping[str, str | os.PathLike[str]] | None = None,
        link_mode: str = "symlink",
    ) -> Path:
        """Build ``work_dir/backends`` and return it (pass it as ``--backend-directory``).

        ``backends/python/`` receives a copy of ``libtriton_python.so`` (a symlink there breaks
        python-based backends) and ``triton_python_backend_utils.py`` plus the stub matching this Python,
        symlinked by default or copied with ``link_mode="copy"`` (both work: :meth:`environment` puts the
        bundled libraries on ``LD_LIBRARY_PATH``, which a copied stub, losing its RPATH, needs).

        ``extra_backends`` maps a backend name to a directory that contains ``model.py``: it is placed
        as ``backends/<name>/model.py`` (the directory's other ``*.py`` files travel with it), which
        makes ``backend: "<name>"`` in config.pbtxt a Python-based backend served by the python
        backend with that shared ``model.py``. Models using it need only ``config.pbtxt`` and an
        (optionally empty) version directory.
        """
        root = Path(work_dir).resolve() / "backends"
        py = root / "python"
        py.mkdir(parents=True, exist_ok=True)
        # libtriton_python.so is always copied: Triton resolves a backend library's real path and
        # refuses one outside the backend directory for python-based backends ("backend library name
        # 'libtriton_python.so' escapes backend directory ..."). The other files may be symlinks.
        _place(self.python_backend_dir / "libtriton_python.so", py / "libtriton_python.so", "copy")
        _place(
            self.python_backend_dir / "triton_python_backend_utils.py",
            py / "triton_python_backend_utils.py",
            link_mode,
        )
        _place(self.stub, py / STUB_NAME, link_mode)
        stub = py / STUB_NAME
        if not os.access(stub, os.X_OK):  # a copy keeps the mode, but make sure
            stub.resolve().chmod(stub.resolve().stat().st_mode | 0o755)
        for name, src in (extra_backends or {}).items():
            if name == "python" or not name or "/" in name:
                raise ValueError(f"invalid python-based backend name {name!r}")
            src = Path(src).resolve()
            if not (src / "model.py").is_file():
                raise TritonRuntimeError(f"python-based backend {name!r}: {src / 'model.py'} not found")
            dst = root / name
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if f.is_file() and f.suffix == ".py":
                    _place(f, dst / f.name, link_mode)
        return root

    # ------------------------------------------------------------------ processes
    def environment(self, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for ``tritonserver``: LD_LIBRARY_PATH and PATH with the interpreter's bin first."""
        env = dict(os.environ if base_env is None else base_env)
        env["LD_LIBRARY_PATH"] = _join_paths(self.libpython_dir, self.libs_dir, env.get("LD_LIBRARY_PATH"))
        # the stub's embedded Python locates its prefix (and a venv's pyvenv.cfg) via `python3` on PATH
        env["PATH"] = _join_paths(self.python3_dir(), env.get("PATH", os.defpath))
        env.pop("PYTHONHOME", None)
        return env

    def python3_dir(self) -> Path:
        """A directory whose ``python3`` is :attr:`python_executable` (for the front of ``PATH``).

        Normally the interpreter's own ``bin`` (always so for a virtualenv). When that directory's
        ``python3`` is missing or another interpreter (e.g. ``/usr/bin/python3.12`` next to a
        ``python3`` of another version), a shim directory ``~/.cache/adrenaline/python3-shim/<hash>``
        with a ``python3`` symlink is made; a symlink keeps a non-venv interpreter's prefix, but a venv
        interpreter must be given by its own ``bin`` path.
        """
        exe = self.python_executable
        cand = exe.parent / "python3"
        if cand.exists() and os.path.realpath(cand) == os.path.realpath(exe):
            return exe.parent
        digest = hashlib.sha1(str(exe).encode()).hexdigest()[:12]
        shim = Path.home() / ".cache" / "adrenaline" / "python3-shim" / digest
        shim.mkdir(parents=True, exist_ok=True)
        _place(exe.absolute(), shim / "python3", "symlink")
        return shim

    def server_command(
        self,
        model_repository: str | os.PathLike[str],
        backend_dir: str | os.PathLike[str],
        http_port: int,
        grpc_port: int,
        metrics_port: int | None,
        address: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        python_backend_config: Mapping[str, str | int] | None = None,
        log_verbose: int = 0,
        exit_timeout_s: int = 15,
        restricted_apis: Sequence[str] = (),
        restricted_header: tuple[str, str] | None = None,
    ) -> list[str]:
        """Command line for ``tritonserver`` serving ``model_repository``.

        HTTP, gRPC and metrics bind to ``address`` (``--http-address``/``--grpc-address``/
        ``--metrics-address``, all present in 2.51). ``metrics_port=None`` disables metrics.
        ``python_backend_config`` overrides/extends :data:`DEFAULT_PYTHON_BACKEND_CONFIG`.
        ``exit_timeout_s`` is ``--exit-timeout-secs``: on SIGTERM tritonserver closes its listening
        sockets, then waits up to that long, in all, for open HTTP connections, in-flight
        inferences and the unloading of the models before it exits anyway.
        ``restricted_apis`` (names from :data:`TRITON_APIS`) answer only requests that carry the
        header ``restricted_header = (key, value)`` (``--http-restricted-api`` and
        ``--grpc-restricted-protocol``; see :func:`restricted_header_names`).
        Model control mode is always ``none``: no model can be loaded or unloaded through the API.
        ``extra_args`` come last, so they win over the defaults here.
        """
        cmd = [
            str(self.tritonserver),
            f"--model-repository={Path(model_repository).resolve()}",
            f"--backend-directory={Path(backend_dir).resolve()}",
            "--allow-http=true",
            f"--http-address={address}",
            f"--http-port={int(http_port)}",
            "--allow-grpc=true",
            f"--grpc-address={address}",
            f"--grpc-port={int(grpc_port)}",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--model-control-mode=none",
            f"--exit-timeout-secs={int(exit_timeout_s)}",
            f"--log-verbose={int(log_verbose)}",
        ]
        cmd += _restriction_args(restricted_apis, restricted_header)
        if metrics_port is None:
            cmd.append("--allow-metrics=false")
        else:
            cmd += [
                "--allow-metrics=true",
                f"--metrics-address={address}",
                f"--metrics-port={int(metrics_port)}",
            ]
        cfg = dict(DEFAULT_PYTHON_BACKEND_CONFIG)
        cfg.update({k: str(v) for k, v in (python_backend_config or {}).items()})
        cmd += [f"--backend-config=python,{k}={v}" for k, v in cfg.items()]
        cmd += list(extra_args)
        return cmd

    def perf_analyzer_environment(
        self,
        work_dir: str | os.PathLike[str] | None = None,
        base_env: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Environment for ``perf_analyzer``.

        Creates ``<work_dir>/perf_analyzer_libs/libcudart.so.12`` pointing at the wheel's bundled
        ``libcudart-*.so.12.*`` (default work_dir: ``~/.cache/adrenaline``) and puts that directory first
        on ``LD_LIBRARY_PATH``. ``libb64.so.0d`` must come from Debian's
        ``libb64-0d`` package (``tools/install_system_deps.sh``).
        """
        base = Path(work_dir) if work_dir is not None else Path.home() / ".cache" / "adrenaline"
        libdir = base / "perf_analyzer_libs"
        libdir.mkdir(parents=True, exist_ok=True)
        cudart = sorted(self.libs_dir.glob("libcudart*.so.12*"))
        if not cudart:
            raise TritonRuntimeError(f"no bundled libcudart*.so.12* in {self.libs_dir}")
        link = libdir / "libcudart.so.12"
        _place(cudart[-1], link, "symlink")
        env = dict(os.environ if base_env is None else base_env)
        env["LD_LIBRARY_PATH"] = _join_paths(libdir, env.get("LD_LIBRARY_PATH"))
        return env

    def install_perf_analyzer_wrapper(self) -> Path | None:
        """Make a plain ``perf_analyzer`` start (and genai-perf, which runs it from ``PATH``).

        tritonclient's binary needs ``libcudart.so.12``, which a CPU host lacks; the nvidia-pytriton
        wheel bundles one. The binary is moved to ``perf_analyzer.bin`` and replaced by a two-line
        wrapper that puts a directory holding a ``libcudart.so.12`` link first on
        ``LD_LIBRARY_PATH``. Idempotent; returns the wrapper, or None without tritonclient's binary.
        """
        bin_dir = self.python_executable.parent
        wrapper, real = bin_dir / "perf_analyzer", bin_dir / "perf_analyzer.bin"
        if wrapper.is_file() and wrapper.read_bytes()[:4] == b"\x7fELF":
            wrapper.replace(real)  # a (re)installed binary: move it aside again
        if not real.is_file():
            return None
        env = self.perf_analyzer_environment(bin_dir.parent / "lib", base_env={})  # <venv>/lib/perf_analyzer_libs
        libs = env["LD_LIBRARY_PATH"].split(os.pathsep)[0]
        wrapper.write_text('#!/bin/sh\n# adrenaline: perf_analyzer with the libcudart.so.12 of nvidia-pytriton\n'
                           f'LD_LIBRARY_PATH="{libs}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" exec "{real}" "$@"\n')
        wrapper.chmod(0o755)
        return wrapper


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        print(json.dumps(_probe_current()))
    elif sys.argv[1:] == ["--install-perf-analyzer"]:
        installed = TritonRuntime.locate().install_perf_analyzer_wrapper()
        print(f"perf_analyzer: {installed}" if installed else "perf_analyzer: not installed (tritonclient[all])")
    else:
        rt = TritonRuntime.locate()
        for k, v in rt.__dict__.items():
            print(f"{k}: {v}")
