"""`adrenaline serve`: fill the model repository's templates, start tritonserver, stop it cleanly.

One server run owns a run directory on /dev/shm: engine.json (the one config every model
reads), the API key, the filled model repository, the backend directory, the KV pools and
exchange buffers (shared memory), the executor's socket and, on GPUs, the MPS pipes. Everything is
removed when the server stops, and so are the python backend's shared-memory regions
(``/dev/shm/triton_*_shm_region_*``) that a tritonserver which did not exit cleanly leaves behind.

Security defaults: HTTP, gRPC and metrics bind 127.0.0.1; the model-repository, shared-memory,
logging and trace APIs answer only requests carrying the API key header; model control mode is
``none``; what tritonserver creates is owner-only and the API key is on no command line
(private.py). Shutdown: SIGTERM drains (tritonserver's ``--exit-timeout-secs`` is the drain
timeout; requests left just before it get an explicit error, health.py), then the launcher makes
sure no process of the server's process group and no shared memory of the run is left. A stub
that died or stopped beating makes ``adrenaline serve`` drain and restart tritonserver.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from string import Template

from adrenaline_py.config import EngineConfig
from adrenaline_py.profile import needs_gpus, probe_gpus, resolve_engine
from adrenaline_py.serving.health import HEARTBEAT_DIR, drain_acked, heartbeat_age, write_drain_deadline
from adrenaline_py.serving.private import child_setup, hide_args, split_secret_args
from adrenaline_py.serving.triton_runtime import (
    DEFAULT_RESTRICTED_APIS,
    TritonRuntime,
    _restriction_args,
    restricted_header_names,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
BACKEND_DIR = PROJECT_ROOT / "backends" / "adrenaline"

API_KEY_ENV = "ADRENALINE_API_KEY"
DEFAULT_API_KEY_HEADER = "x-adrenaline-api-key"
SHM_DIR = Path("/dev/shm")
#: the python backend's per-stub shared-memory regions, as named in /proc/<pid>/maps
_TRITON_REGION = re.compile(r"/dev/shm/(triton_[A-Za-z0-9_]+_shm_region_[0-9A-Fa-f-]+)")


@dataclass(frozen=True)
class ServerOptions:
    address: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch_size: int = 64          # ensemble max_batch_size (requests per Triton batch)
    vllm_model_name: str = "vllm_model"  # the vLLM-backend-style entry; "" leaves it out
    preprocessing_instances: int = 2
    prefill_queue_delay_us: int = 2000
    log_verbose: int = 0
    use_mps: bool = True              # only with --device cuda
    startup_timeout_s: float = 600.0
    # security
    restricted_apis: tuple[str, ...] = DEFAULT_RESTRICTED_APIS  # need the API key; () restricts none
    api_key: str | None = None        # None: a random key per run (Server.api_key)
    api_key_header: str = DEFAULT_API_KEY_HEADER
    # shutdown
    drain_timeout_s: float = 30.0     # tritonserver --exit-timeout-secs (rounded up to whole seconds)
    stop_grace_s: float = 30.0        # after the drain timeout, before the process group is killed
    die_with_parent: bool = False     # tritonserver gets SIGTERM when the launching thread dies
    # The HTTP front (adrenaline_py/serving/front.py) on http_port: crash guards for tritonserver 2.51's
    # HTTP and the OpenAI API. tritonserver's HTTP then listens on 127.0.0.1:triton_http_port.
    front: bool = True
    http_max_body_bytes: int = 1 << 20   # front.DEFAULT_MAX_BODY_BYTES (2.51 crashes at 4 MB)
    http_max_json_depth: int = 32        # front.DEFAULT_MAX_JSON_DEPTH
    served_model_name: str | None = None  # the OpenAI API's model name; None: the --model value
    triton_http_port: int | None = None   # None: a free loopback port (only with the front)
    # The front's gRPC half (adrenaline_py/serving/grpc_front.py) on grpc_port: a message-size limit
    # (2.51 has none); tritonserver's gRPC then listens on 127.0.0.1:triton_grpc_port.
    grpc_max_message_bytes: int = 4 << 20
    triton_grpc_port: int | None = None   # None: a free loopback port (only with the front)
    max_restarts: int = 5             # serve_forever: restarts of tritonserver (and of the front) per 10 min


def resolve_for_serving(engine: EngineConfig) -> EngineConfig:
    """engine with its open settings resolved (adrenaline_py/profile.py: resolve_engine): on cuda
    from the model's shape, the GPUs' memory and names (read in a child process, before the MPS
    daemon starts) and the GPU's profile; the reasons are in ``extra["resolution"]``."""
    if not needs_gpus(engine):
        return resolve_engine(engine)
    from adrenaline_py.loader import load_checkpoint

    model = load_checkpoint(engine.model, with_weights=False).config
    try:
        gpus = probe_gpus({engine.prefill_gpu, engine.decode_gpu})
    except (RuntimeError, subprocess.TimeoutExpired) as e:  # no usable GPU: a bad --device (exit status 2)
        raise ValueError(f"--device cuda: {e}") from None
    return resolve_engine(engine, model, gpus)


def fill_model_repository(dst: Path, values: dict[str, str], src: Path = MODEL_REPOSITORY) -> Path:
    """Copy the repository, substituting ``${name}`` placeholders in every config.pbtxt."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    for cfg in dst.glob("*/config.pbtxt"):
        cfg.write_text(Template(cfg.read_text()).substitute(values))
    return dst


def name_vllm_model(repo: Path, name: str) -> None:
    """Triton wants a model's directory to carry its name: rename (or, for "", drop) vllm_model."""
    src = repo / "vllm_model"
    if not name:
        shutil.rmtree(src)
    elif name != src.name:
        if name == "ensemble" or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or (repo / name).exists():
            raise ValueError(f"--vllm-model-name {name!r}: not a free model name")
        src.rename(repo / name)


class MPSDaemon:
    """CUDA MPS control daemon with pipes under the run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.env = {
            "CUDA_MPS_PIPE_DIRECTORY": str(run_dir / "mps_pipe"),
            "CUDA_MPS_LOG_DIRECTORY": str(run_dir / "mps_log"),
        }
        self.started = False

    def start(self) -> None:
        for d in self.env.values():
            Path(d).mkdir(parents=True, exist_ok=True)
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env={**os.environ, **self.env}, check=True)
        self.started = True

    def stop(self) -> None:
        if self.started:
            subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env={**os.environ, **self.env},
                           timeout=30, check=False)
            self.started = False


class Server:
    """A running tritonserver serving the Adrenaline model repository."""

    def __init__(self, engine: EngineConfig, options: ServerOptions = ServerOptions(),
                 log_path: Path | None = None) -> None:
        self.options = options
        if options.drain_timeout_s < 0 or options.stop_grace_s < 0:
            raise ValueError("drain timeout and stop grace must be >= 0")
        self.api_key: str | None = None
        self.api_key_generated = False
        if options.restricted_apis:
            self.api_key = options.api_key or secrets.token_urlsafe(32)
            self.api_key_generated = not options.api_key
            if len(self.api_key) < 16:
                raise ValueError("the API key must have at least 16 characters")
            # fail now, not in tritonserver, on a bad API name, header or key
            _restriction_args(options.restricted_apis, (options.api_key_header, self.api_key))
        # SM shares, pool sizes and OB, once for every role (roles attach the pools by size)
        engine = resolve_for_serving(engine)
        if not engine.run_dir or engine.run_dir == EngineConfig().run_dir:
            base = str(SHM_DIR) if SHM_DIR.is_dir() else None
            run_dir = tempfile.mkdtemp(prefix=f"adrenaline-{options.http_port}-", dir=base)
            engine = EngineConfig(**{**engine.__dict__, "run_dir": run_dir})
        self.engine = engine
        if not engine.internal_token:  # internal models refuse requests without it (see role_scheduler)
            engine = EngineConfig(**{**engine.__dict__, "internal_token": secrets.token_hex(16)})
            self.engine = engine
        self.run_dir = Path(engine.run_dir)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        #: the HTTP front's process (options.front), and tritonserver's own HTTP port behind it
        self.front_process: subprocess.Popen | None = None
        if options.front and (options.http_max_body_bytes < 1 or options.http_max_json_depth < 1):
            raise ValueError("--http-max-body-bytes and --http-max-json-depth must be >= 1")
        if options.front and options.grpc_max_message_bytes < 1024:
            raise ValueError("--grpc-max-message-bytes must be >= 1024")
        if options.front and importlib.util.find_spec("aiohttp") is None:
            raise ValueError("the HTTP front needs aiohttp (pip install 'aiohttp>=3.13.4'); --no-front serves "
                             "without it, unsafely with tritonserver 2.51 (docs/reliability.md)")
        #: the front's gRPC half runs where grpcio is installed (a dependency; the GPU bundle lacks it):
        #: without it tritonserver's gRPC is public, with no message limit (said at start-up)
        self.grpc_front = options.front and importlib.util.find_spec("grpc") is not None
        self.triton_http_port = (options.triton_http_port or _free_port()) if options.front else options.http_port
        self.triton_grpc_port = (options.triton_grpc_port or _free_port()) if self.grpc_front else options.grpc_port
        self.served_model_name = options.served_model_name or engine.model
        self.mps = MPSDaemon(self.run_dir) if engine.device == "cuda" and options.use_mps else None
        self._log_file = None
        self._lock = threading.Lock()
        self.drain_announced = threading.Event()
        self._stopped = False
        #: python-backend shared-memory regions (names in /dev/shm) seen mapped by tritonserver
        self.shm_regions: set[str] = set()
        #: after stop(): regions tritonserver left behind that the launcher removed
        self.removed_shm_regions: list[str] = []
        #: after stop(): tritonserver's exit status (negative: killed by that signal)
        self.exit_code: int | None = None
        #: after stop(): False when the drain did not finish in time or processes had to be killed
        self.clean_stop: bool | None = None
        self._known_stubs: dict[int, str] = {}
        self._known_stubs_of: int | None = None  # the tritonserver pid _known_stubs belong to
        #: True when ptrace was refused and the API key is on tritonserver's command line
        self.api_key_on_command_line = False
        #: shm regions found readable by others and made 0600 after the fact (no seccomp filter)
        self.regions_made_private: set[str] = set()

    @property
    def http_url(self) -> str:
        return f"http://{self.options.address}:{self.options.http_port}"

    @property
    def triton_http_url(self) -> str:
        """tritonserver's own HTTP: on loopback behind the front, or the public one with ``front=False``."""
        if not self.options.front:
            return self.http_url
        return f"http://127.0.0.1:{self.triton_http_port}"

    @property
    def api_key_path(self) -> Path:
        return self.run_dir / "api_key"

    @property
    def http_auth_headers(self) -> dict[str, str]:
        """HTTP header that opens the restricted APIs (empty when none are restricted)."""
        if self.api_key is None:
            return {}
        return {restricted_header_names(self.options.api_key_header)[0]: self.api_key}

    @property
    def grpc_auth_headers(self) -> dict[str, str]:
        """gRPC metadata that opens the restricted protocols (``triton-grpc-protocol-<header>``)."""
        if self.api_key is None:
            return {}
        return {restricted_header_names(self.options.api_key_header)[1]: self.api_key}

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        config_path = self.run_dir / "engine.json"
        self.engine.save(config_path)
        if self.api_key is not None:
            fd = os.open(self.api_key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, (self.api_key + "\n").encode())
            finally:
                os.close(fd)
        o = self.options
        repo = fill_model_repository(self.run_dir / "model_repository", {
            "engine_config": str(config_path),
            "max_batch_size": str(o.max_batch_size),
            "preprocessing_instances": str(o.preprocessing_instances),
            "prefill_queue_delay_us": str(o.prefill_queue_delay_us),
            "vllm_model_name": o.vllm_model_name or "vllm_model",
        })
        name_vllm_model(repo, o.vllm_model_name)
        runtime = TritonRuntime.locate()
        backends = runtime.prepare(self.run_dir, extra_backends={"adrenaline": BACKEND_DIR})
        env = runtime.environment()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        env.pop(API_KEY_ENV, None)  # the models have no use for it
        # The interpreter that attention and prefill start their worker processes with (a stub's
        # sys.executable is not necessarily a Python): backends/adrenaline/supervisor.py.
        env["ADRENALINE_PYTHON"] = str(runtime.python_executable)
        if self.mps is not None:
            self.mps.start()
            env.update(self.mps.env)
        cmd = runtime.server_command(
            repo, backends, self.triton_http_port, self.triton_grpc_port, o.metrics_port, address=o.address,
            # behind the front, tritonserver's HTTP and gRPC are reachable from this host only (last flag wins)
            extra_args=(("--http-address=127.0.0.1",) if o.front else ())
            + (("--grpc-address=127.0.0.1",) if self.grpc_front else ()),
            log_verbose=o.log_verbose, exit_timeout_s=math.ceil(o.drain_timeout_s),
            restricted_apis=o.restricted_apis,
            restricted_header=(o.api_key_header, self.api_key) if self.api_key is not None else None,
        )
        stdout = None
        if self.log_path is not None:
            self._log_file = open(self.log_path, "ab")
            stdout = self._log_file
        # Own process group (and session): the python-backend stubs that tritonserver starts stay in
        # it, so stop() can find and end all of them, and a Ctrl-C on the terminal reaches only the
        # launcher, which then drains tritonserver.
        _owner_only(self.run_dir)  # copies keep their source's mode (0644); tritonserver's own get umask 077
        self.process = self._spawn_tritonserver(cmd, env, stdout)
        if o.front and (self.front_process is None or self.front_process.poll() is not None):
            self.start_front()
        _owner_only(self.run_dir)  # and what the front's start wrote

    def start_front(self) -> None:
        """Start (or start again) the HTTP front on the public HTTP port, forwarding to tritonserver."""
        from adrenaline_py.serving.front import FrontConfig  # aiohttp only where the front runs

        o = self.options
        config = FrontConfig(
            upstream=self.triton_http_url, host=o.address, port=o.http_port, model=self.engine.model,
            served_model_name=self.served_model_name, max_body_bytes=o.http_max_body_bytes,
            max_json_depth=o.http_max_json_depth, max_model_len=self.engine.max_model_len,
            max_tokens_limit=self.engine.max_tokens_limit, api_key_header=o.api_key_header,
            drain_timeout_s=o.drain_timeout_s, grpc_port=o.grpc_port if self.grpc_front else None,
            grpc_upstream=f"127.0.0.1:{self.triton_grpc_port}", max_grpc_message_bytes=o.grpc_max_message_bytes)
        config.validate()
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.run_dir / "front.json"
        config.save(path)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                                          os.environ.get("PYTHONPATH")]))}
        env.pop(API_KEY_ENV, None)  # the front never needs the key: tritonserver checks it
        if self._log_file is None and self.log_path is not None:
            self._log_file = open(self.log_path, "ab")
        # Its own session, so that a Ctrl-C reaches only the launcher, which then drains the front.
        self.front_process = subprocess.Popen(
            [sys.executable, "-m", "adrenaline_py.serving.front", "--config", str(path)], env=env,
            stdout=self._log_file, stderr=subprocess.STDOUT if self._log_file is not None else None,
            start_new_session=True, preexec_fn=_die_with_parent() if o.die_with_parent else None)

    def restart_tritonserver(self) -> None:
        """Start tritonserver again after it died. Its stubs and workers are killed and its
        shared-memory regions and run directory removed, as stop() does, then start() builds the run
        anew (same run directory, API key and ports). The front keeps listening meanwhile and answers
        503 until tritonserver is back."""
        self.kill()
        if self.process is not None:
            self.process.wait()
        _wait_until(lambda: not self.process_group(), 10.0)
        _remove_shm_regions(self.shm_regions)
        self.shm_regions.clear()
        if self.mps is not None:
            self.mps.stop()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        for entry in self.run_dir.iterdir() if self.run_dir.exists() else ():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        self.start()

    def track_shm_regions(self) -> set[str]:
        """Record the python backend's shared-memory regions that tritonserver has mapped now.

        The python backend names each stub's region ``triton_<backend>_backend_shm_region_<uuid>``
        and unlinks it when the model unloads; a tritonserver that is killed or gives up at its
        exit timeout leaves them in /dev/shm. stop() removes the recorded ones that are left.
        """
        if self.process is not None and self.process.poll() is None:
            try:
                maps = Path(f"/proc/{self.process.pid}/maps").read_text()
            except OSError:
                return self.shm_regions
            found = set(_TRITON_REGION.findall(maps))
            for name in found - self.shm_regions:
                _make_private(SHM_DIR / name, self.regions_made_private)
            self.shm_regions.update(found)
        return self.shm_regions

    def wait_ready(self, cancel: threading.Event | None = None) -> None:
        """Wait for /v2/health/ready; raises RuntimeError when tritonserver exits, TimeoutError
        after ``startup_timeout_s`` and InterruptedError when ``cancel`` is set."""
        deadline = time.monotonic() + self.options.startup_timeout_s
        url = f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                raise InterruptedError("start-up cancelled")
            if self.front_process is not None and self.front_process.poll() is not None:
                raise RuntimeError(f"the HTTP front exited with code {self.front_process.returncode} during "
                                   "start-up" + (f"; see {self.log_path}" if self.log_path else ""))
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} during start-up"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            self.track_shm_regions()
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        self.track_shm_regions()
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver was not ready within {self.options.startup_timeout_s:.0f}s")

    def process_group(self) -> list[int]:
        """Live (non-zombie) processes of tritonserver's process group: tritonserver and its stubs."""
        if self.process is None:
            return []
        return _group_members(self.process.pid)

    def kill(self) -> None:
        """SIGKILL tritonserver and every stub now (no drain)."""
        # The group id is tritonserver's pid: safe to signal while tritonserver is not reaped or any
        # member lives (a pid in use as a group id is not reused).
        if self.process is not None and (self.process.returncode is None or self.process_group()):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def kill_front(self) -> None:
        """SIGKILL the HTTP front now (no drain)."""
        if self.front_process is not None and self.front_process.poll() is None:
            self.front_process.kill()
            self.front_process.wait()

    def stop(self, timeout: float | None = None) -> bool:
        """Drain and stop tritonserver, then remove everything of this run; returns ``clean_stop``.

        SIGTERM goes to tritonserver alone (the stubs ignore it anyway): it stops taking HTTP
        connections, waits for the open ones, stops taking requests, lets in-flight requests finish
        and unloads the models, in all for at most ``drain_timeout_s`` (its ``--exit-timeout-secs``;
        docs/configuration.md, Shutdown, has the details of 2.51). If it has not exited ``timeout``
        seconds after the signal (default: drain timeout + ``stop_grace_s``), the whole process group
        is killed. Stubs still alive after tritonserver exited are killed too, then the python
        backend's shared-memory regions of this server that are left, the MPS daemon and the run
        directory are removed. Safe to call more than once.
        """
        with self._lock:
            if self._stopped:
                return bool(self.clean_stop)
            self._stopped = True
        o = self.options
        clean = True
        if timeout is None:
            timeout = o.drain_timeout_s + o.stop_grace_s
        deadline = time.monotonic() + timeout
        try:
            # The front stops listening at once and lets its in-flight requests finish (up to the drain
            # timeout), while tritonserver drains them on its side.
            if self.front_process is not None and self.front_process.poll() is None:
                self.front_process.send_signal(signal.SIGTERM)
            if self.process is not None:
                if self.process.poll() is None:
                    self.track_shm_regions()
                    self._announce_drain()
                    try:
                        self.process.send_signal(signal.SIGTERM)
                        self.process.wait(timeout)
                    except subprocess.TimeoutExpired:
                        clean = False
                        self.kill()
                        self.process.wait()
                else:
                    clean = False  # it had exited (crashed) before stop()
                self.exit_code = self.process.returncode
                clean = clean and self.exit_code == 0
                # After a clean exit the stubs are gone; after an exit at the timeout or a crash
                # they notice their parent is gone only after a while: do not wait for that.
                if not _wait_until(lambda: not self.process_group(), 5.0 if clean else 0.5):
                    clean = False
                    self.kill()
                    _wait_until(lambda: not self.process_group(), 10.0)
                for name in sorted(self.shm_regions):
                    try:
                        (SHM_DIR / name).unlink()
                        self.removed_shm_regions.append(name)
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        print(f"adrenaline: cannot remove /dev/shm/{name}: {e}", file=sys.stderr)
                if self.removed_shm_regions:
                    clean = False
            if self.front_process is not None:
                try:
                    self.front_process.wait(max(0.0, deadline - time.monotonic()) + 1.0)
                except subprocess.TimeoutExpired:
                    clean = False
                if self.front_process.returncode not in (0, None) and self.front_process.returncode != -signal.SIGTERM:
                    clean = False
        finally:
            self.kill_front()
            if self.mps is not None:
                self.mps.stop()
            if self._log_file is not None:
                self._log_file.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.clean_stop = clean
        return clean

    def stubs(self) -> dict[int, str]:
        """Live python-backend stubs of tritonserver: pid → model instance (from its heartbeat file)."""
        out = {}
        for pid in self.process_group():
            try:
                exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue
            if exe.endswith(b"triton_python_backend_stub"):
                try:
                    out[pid] = (self.run_dir / HEARTBEAT_DIR / str(pid)).read_text() or f"stub {pid}"
                except OSError:
                    out[pid] = f"stub {pid}"
        return out

    def check_stubs(self) -> str | None:
        """Why the server no longer serves every model, or None. Call it once the server is ready.

        tritonserver 2.51 keeps a model ready after its stub died or stopped, and never restarts one
        (docs/reliability.md). A stub of the ready server that is gone, or whose heartbeat
        (health.py) is older than the engine's ``heartbeat_timeout_s``, is reported; a stalled one is
        killed first, so that requests waiting on it fail instead of waiting forever.
        """
        if self.process is None or self.process.poll() is not None:
            return None  # tritonserver itself is gone: the caller sees that
        if self._known_stubs_of != self.process.pid:  # the first check of this tritonserver
            self._known_stubs, self._known_stubs_of = self.stubs(), self.process.pid
        timeout = self.engine.heartbeat_timeout_s
        for pid, name in self._known_stubs.items():
            if not _alive(pid):
                return f"the stub of {name} (pid {pid}) died"
            age = heartbeat_age(self.run_dir, pid)
            if age is not None and age > timeout:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return f"the stub of {name} (pid {pid}) sent no heartbeat for {age:.1f}s (killed)"
        return None

    def drain_tritonserver(self) -> bool:
        """SIGTERM tritonserver with the drain deadline announced; kill it if it has not exited after
        the drain timeout plus the stop grace. True when it exited by itself."""
        if self.process is None or self.process.poll() is not None:
            return True
        self._announce_drain()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(self.options.drain_timeout_s + self.options.stop_grace_s)
            return True
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait()
            return False

    def _announce_drain(self) -> None:
        """Tell decode and the scheduler when the drain timeout ends what is still in flight, so that
        those requests get an explicit error just before (health.py) rather than a closed connection."""
        try:
            write_drain_deadline(self.run_dir, self.options.drain_timeout_s)
        except OSError as e:
            print(f"adrenaline: cannot announce the drain deadline: {e}", file=sys.stderr, flush=True)
        finally:
            self.drain_announced.set()  # a second stop signal's forced deadline goes after this one

    def _spawn_tritonserver(self, cmd: list[str], env: dict[str, str], stdout) -> subprocess.Popen:
        """tritonserver with umask 077 and owner-only chmods (its shm regions stay 0600), and the
        API key out of its command line where ptrace allows (adrenaline_py/serving/private.py)."""
        die = self.options.die_with_parent
        shown, secret_env = split_secret_args(cmd, self.api_key or "")
        self.api_key_on_command_line = False
        if secret_env:
            try:
                proc = subprocess.Popen(shown, env={**env, **secret_env}, stdout=stdout, stderr=subprocess.STDOUT,
                                        start_new_session=True,
                                        preexec_fn=child_setup(die_with_parent=die, stop_at_exec=True))
            except (OSError, subprocess.SubprocessError) as e:  # ptrace refused in the child
                print(f"adrenaline: cannot keep the API key off tritonserver's command line ({e}); local users "
                      "can read it with ps", file=sys.stderr, flush=True)
            else:
                try:
                    hide_args(proc.pid, list(secret_env))
                    return proc
                except OSError as e:
                    proc.kill()  # stopped at its exec with placeholders: it never ran
                    proc.wait()
                    print(f"adrenaline: cannot keep the API key off tritonserver's command line ({e}); local "
                          "users can read it with ps", file=sys.stderr, flush=True)
            self.api_key_on_command_line = True
        return subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=child_setup(die_with_parent=die))

    def __enter__(self) -> Server:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent():
    """A preexec_fn: the child gets SIGTERM when the thread that started it dies (Linux
    PR_SET_PDEATHSIG), so a launcher killed with SIGKILL still has tritonserver drain and exit.
    None where prctl is not available."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1

    return preexec


def _owner_only(root: Path) -> None:
    """Take group and other access away from everything under ``root`` (symlinks, which point
    into the installation, are left alone)."""
    for path in [root, *root.rglob("*")]:
        try:
            if not path.is_symlink():
                mode = path.stat().st_mode
                if mode & 0o077:
                    path.chmod(mode & 0o700)
        except OSError:
            pass


def _make_private(path: Path, fixed: set[str]) -> None:
    """The fallback where the seccomp filter (private.py) could not be installed: take group and
    other access away from a region as soon as it is seen (a reader that opened it before keeps it)."""
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            path.chmod(mode & 0o700)
            if not fixed:
                print(f"adrenaline: {path.name} was readable by other users (no seccomp filter here); "
                      "made 0600 after the fact", file=sys.stderr, flush=True)
            fixed.add(path.name)
    except OSError:
        pass


def _free_port() -> int:
    """A TCP port free on loopback now (for tritonserver's HTTP behind the front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _remove_shm_regions(names: set[str]) -> list[str]:
    """Unlink the python-backend regions ``names`` that are still in /dev/shm; returns those removed."""
    removed = []
    for name in sorted(names):
        try:
            (SHM_DIR / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
        except OSError as e:
            print(f"adrenaline: cannot remove /dev/shm/{name}: {e}", file=sys.stderr)
    return removed


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")


def _group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes whose process group is ``pgid``."""
    members = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
        if len(fields) > 2 and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(d.name))
    return members


def _wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _print_ready(server: Server) -> None:
    o = server.options
    print(
        f"\nadrenaline: ready.\n"
        f"  HTTP    {server.http_url}/v2/models/ensemble/generate  (and /generate_stream)\n"
        f"  gRPC    {o.address}:{o.grpc_port}  (model 'ensemble', streaming supported)\n"
        + (f"  vLLM-backend-style entry: model '{o.vllm_model_name}' (no batch dimension)\n"
           if o.vllm_model_name else "") +
        f"  metrics http://{o.address}:{o.metrics_port}/metrics\n"
        f"  try:    curl -s -X POST {server.http_url}/v2/models/ensemble/generate "
        f"-d '{{\"text_input\": \"The capital of France is\", \"max_tokens\": 16}}'",
        file=sys.stderr, flush=True,
    )
    if server.api_key is not None:
        http_h, grpc_h = restricted_header_names(o.api_key_header)
        # The key itself is never printed (logs are read by more people than the server's user).
        where = ("API key: generated for this run" if server.api_key_generated
                 else "API key: as given (--api-key or $ADRENALINE_API_KEY)")
        print(f"  restricted APIs ({', '.join(o.restricted_apis)}) need the header '{http_h}' "
              f"(gRPC metadata '{grpc_h}').\n  {where}; read it from {server.api_key_path} (mode 0600)",
              file=sys.stderr, flush=True)
    if o.front:
        print(f"  OpenAI  {server.http_url}/v1  (model '{server.served_model_name}': /v1/models, /v1/completions, "
              f"/v1/chat/completions)\n"
              f"  HTTP front on {server.http_url}: Triton and OpenAI APIs on one port; bodies up to "
              f"{o.http_max_body_bytes} bytes, JSON up to {o.http_max_json_depth} levels deep; tritonserver's own "
              f"HTTP on {server.triton_http_url} (loopback)", file=sys.stderr, flush=True)
        if server.grpc_front:
            print(f"  gRPC front on {o.address}:{o.grpc_port}: messages up to {o.grpc_max_message_bytes} bytes; "
                  f"tritonserver's own gRPC on 127.0.0.1:{server.triton_grpc_port}", file=sys.stderr, flush=True)
        else:
            print("  gRPC front off (grpcio is not installed): tritonserver 2.51's gRPC is exposed directly and "
                  "takes messages of up to 2 GB (docs/reliability.md)", file=sys.stderr, flush=True)
    else:
        print("  front off (--no-front): tritonserver 2.51's HTTP and gRPC are exposed directly: a body of 4 MB "
              "or JSON nested 100,000 deep crashes it, and gRPC takes messages of up to 2 GB (docs/reliability.md)",
              file=sys.stderr, flush=True)
    print(f"Ctrl-C or SIGTERM stops the server (in-flight requests get up to "
          f"{o.drain_timeout_s:g}s).", file=sys.stderr, flush=True)


class RestartBudget:
    """At most ``limit`` restarts in any ``window_s`` seconds: a crash loop ends instead of spinning."""

    def __init__(self, limit: int, window_s: float = 600.0) -> None:
        self.limit, self.window_s = limit, window_s
        self.times: list[float] = []

    def take(self) -> int | None:
        """The number of this restart in the window, or None when the budget is spent."""
        now = time.monotonic()
        self.times = [t for t in self.times if now - t < self.window_s]
        if len(self.times) >= self.limit:
            return None
        self.times.append(now)
        return len(self.times)


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _supervise(server: Server, stop_requested: threading.Event) -> int | None:
    """Watch tritonserver and the front until a stop is requested (returns None). A dead one is
    restarted with a log line, within ``max_restarts`` per 10 minutes each; past that the launcher gives
    up and returns the exit status to leave with."""
    o = server.options
    triton_budget, front_budget = RestartBudget(o.max_restarts), RestartBudget(o.max_restarts)
    while not stop_requested.wait(1.0):
        if server.process.poll() is not None:
            code = server.process.returncode
            n = triton_budget.take()
            if n is None:
                print(f"adrenaline: tritonserver exited with {_exit_status(code)}; {o.max_restarts} restarts in "
                      f"10 minutes already: giving up", file=sys.stderr, flush=True)
                return code if code > 0 else 1
            print(f"adrenaline: tritonserver exited with {_exit_status(code)}; its in-flight requests are lost. "
                  f"Restarting it (restart {n} of at most {o.max_restarts} in 10 minutes)",
                  file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                server.restart_tritonserver()
                server.wait_ready(cancel=stop_requested)
            except InterruptedError:
                return None
            except (RuntimeError, TimeoutError, OSError) as e:
                print(f"adrenaline: the restart failed: {e}", file=sys.stderr, flush=True)
                continue  # the next round sees it dead and tries again, within the budget
            print(f"adrenaline: tritonserver is serving again ({time.monotonic() - t0:.1f}s after the restart "
                  f"began)", file=sys.stderr, flush=True)
        elif (problem := server.check_stubs()) is not None:
            # tritonserver 2.51 neither restarts a stub nor stops calling its model ready: drain it (its
            # health answers "not ready" from now on); the next round restarts it as after an exit.
            print(f"adrenaline: {problem}; draining tritonserver (up to {o.drain_timeout_s:g}s) to start it "
                  "again", file=sys.stderr, flush=True)
            server.drain_tritonserver()
        front = server.front_process
        if front is not None and front.poll() is not None:
            n = front_budget.take()
            if n is None:
                print(f"adrenaline: the HTTP front exited with {_exit_status(front.returncode)}; "
                      f"{o.max_restarts} restarts in 10 minutes already: giving up", file=sys.stderr, flush=True)
                return 1
            print(f"adrenaline: the HTTP front exited with {_exit_status(front.returncode)}; restarting it "
                  f"(restart {n} of at most {o.max_restarts} in 10 minutes)", file=sys.stderr, flush=True)
            server.start_front()
        server.track_shm_regions()
    return None


#: after a second stop signal, the kill waits until decode says every request's error is out
#: (`health.drain_acked`), at most STOP_NOW_MAX_WAIT_S, then STOP_NOW_FLUSH_S for the front to pass it on
STOP_NOW_MAX_WAIT_S = 10.0
STOP_NOW_FLUSH_S = 0.3


def serve_forever(engine: EngineConfig, options: ServerOptions) -> int:
    """Run the server until SIGTERM/SIGINT/SIGHUP, then drain and clean up. A tritonserver or HTTP
    front that dies is restarted (``max_restarts`` per 10 minutes each). Exit status: 0 after a
    requested stop (also when the drain timeout cut requests off: that is reported), tritonserver's
    status (1 if it was 0) when it kept dying, 1 when start-up failed."""
    server = Server(engine, replace(options, die_with_parent=True))
    stop_requested = threading.Event()

    def on_signal(signum, frame):
        if stop_requested.is_set():  # a second signal: stop now
            print(f"\nadrenaline: {signal.Signals(signum).name} again: ending every request with an error, "
                  f"then killing tritonserver (within {STOP_NOW_MAX_WAIT_S:g}s)", file=sys.stderr, flush=True)

            def stop_now() -> None:
                # After the drain's own announcement, or this would be overwritten by it (the first
                # signal's stop may not have reached it yet).
                server.drain_announced.wait(STOP_NOW_MAX_WAIT_S / 2)
                try:  # decode and the scheduler end what they hold with an explicit error at once
                    write_drain_deadline(server.run_dir, options.drain_timeout_s, forced=True)
                except OSError:
                    pass
                _wait_until(lambda: drain_acked(server.run_dir), STOP_NOW_MAX_WAIT_S)
                time.sleep(STOP_NOW_FLUSH_S)
                server.kill()
                server.kill_front()

            threading.Thread(target=stop_now, name="stop-now", daemon=True).start()
        stop_requested.set()

    # Explicit handlers: a launcher started in the background inherits SIGINT ignored.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    o = options
    try:
        server.start()
        print(f"adrenaline: starting tritonserver (model {engine.model}, device {engine.device}, "
              f"offload {engine.offload}); run dir {server.run_dir}", file=sys.stderr, flush=True)
        for note in server.engine.extra.get("resolution", []):
            print(f"adrenaline: {note}", file=sys.stderr, flush=True)
        try:
            server.wait_ready(cancel=stop_requested)
        except InterruptedError:
            print("adrenaline: stop requested during start-up", file=sys.stderr, flush=True)
        else:
            _print_ready(server)
            code = _supervise(server, stop_requested)
            if code is not None:
                return code
        print(f"\nadrenaline: stopping: no new requests; in-flight requests get up to "
              f"{o.drain_timeout_s:g}s (a second Ctrl-C or SIGTERM stops at once)", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        clean = server.stop()
        took = time.monotonic() - t0
        if clean:
            print(f"adrenaline: stopped cleanly in {took:.1f}s", file=sys.stderr, flush=True)
        else:
            print(f"adrenaline: stopped in {took:.1f}s, not cleanly: tritonserver exit status "
                  f"{server.exit_code} (the drain timeout may have cut requests off); "
                  f"removed {len(server.removed_shm_regions)} leftover shared-memory region(s)",
                  file=sys.stderr, flush=True)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"adrenaline: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        server.stop()
