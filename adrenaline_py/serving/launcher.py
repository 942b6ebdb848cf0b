"""`adrenaline serve`: fill the model repository's templates, start tritonserver, stop it cleanly.

One server run owns a run directory on /dev/shm: engine.json (the one config every model
reads), the API key, the filled model repository, the backend directory, the KV pools and
exchange buffers (shared memory), the executor's socket and, on GPUs, the MPS pipes. Everything is
removed when the server stops, and so are the python backend's shared-memory regions
(``/dev/shm/triton_*_shm_region_*``) that a tritonserver which did not exit cleanly leaves behind.

Security defaults: HTTP, gRPC and metrics bind 127.0.0.1; the model-repository, shared-memory,
logging and trace APIs answer only requests carrying the API key header; model control mode is
``none``. Shutdown: SIGTERM drains (tritonserver's ``--exit-timeout-secs`` is the drain timeout),
then the launcher makes sure no process of the server's process group and no shared memory of the
run is left.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import secrets
import shutil
import signal
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
        self.mps = MPSDaemon(self.run_dir) if engine.device == "cuda" and options.use_mps else None
        self._log_file = None
        self._lock = threading.Lock()
        self._stopped = False
        #: python-backend shared-memory regions (names in /dev/shm) seen mapped by tritonserver
        self.shm_regions: set[str] = set()
        #: after stop(): regions tritonserver left behind that the launcher removed
        self.removed_shm_regions: list[str] = []
        #: after stop(): tritonserver's exit status (negative: killed by that signal)
        self.exit_code: int | None = None
        #: after stop(): False when the drain did not finish in time or processes had to be killed
        self.clean_stop: bool | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.options.address}:{self.options.http_port}"

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
        })
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
            repo, backends, o.http_port, o.grpc_port, o.metrics_port, address=o.address,
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
        self.process = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT,
                                        start_new_session=True,
                                        preexec_fn=_die_with_parent() if o.die_with_parent else None)

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
            self.shm_regions.update(_TRITON_REGION.findall(maps))
        return self.shm_regions

    def wait_ready(self, cancel: threading.Event | None = None) -> None:
        """Wait for /v2/health/ready; raises RuntimeError when tritonserver exits, TimeoutError
        after ``startup_timeout_s`` and InterruptedError when ``cancel`` is set."""
        deadline = time.monotonic() + self.options.startup_timeout_s
        url = f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                raise InterruptedError("start-up cancelled")
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
        try:
            if self.process is not None:
                if self.process.poll() is None:
                    self.track_shm_regions()
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
        finally:
            if self.mps is not None:
                self.mps.stop()
            if self._log_file is not None:
                self._log_file.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.clean_stop = clean
        return clean

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
        f"  metrics http://{o.address}:{o.metrics_port}/metrics\n"
        f"  try:    curl -s -X POST {server.http_url}/v2/models/ensemble/generate "
        f"-d '{{\"text_input\": \"The capital of France is\", \"max_tokens\": 16}}'",
        file=sys.stderr, flush=True,
    )
    if server.api_key is not None:
        http_h, grpc_h = restricted_header_names(o.api_key_header)
        where = (f"API key: {server.api_key}" if server.api_key_generated
                 else "API key: as given (--api-key or $ADRENALINE_API_KEY)")
        print(f"  restricted APIs ({', '.join(o.restricted_apis)}) need the header '{http_h}' "
              f"(gRPC metadata '{grpc_h}').\n  {where}; also in {server.api_key_path} (mode 0600)",
              file=sys.stderr, flush=True)
    print(f"Ctrl-C or SIGTERM stops the server (in-flight requests get up to "
          f"{o.drain_timeout_s:g}s).", file=sys.stderr, flush=True)


def serve_forever(engine: EngineConfig, options: ServerOptions) -> int:
    """Run the server until SIGTERM/SIGINT/SIGHUP, then drain and clean up. Exit status: 0 after a
    requested stop (also when the drain timeout cut requests off: that is reported), tritonserver's
    status (1 if it was 0) when it exited by itself, 1 when start-up failed."""
    server = Server(engine, replace(options, die_with_parent=True))
    stop_requested = threading.Event()

    def on_signal(signum, frame):
        if stop_requested.is_set():  # a second signal: stop now
            print(f"\nadrenaline: {signal.Signals(signum).name} again: killing tritonserver",
                  file=sys.stderr, flush=True)
            server.kill()
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
            while not stop_requested.wait(2.0):
                if server.process.poll() is not None:
                    code = server.process.returncode
                    print(f"adrenaline: tritonserver exited with code {code}", file=sys.stderr, flush=True)
                    return code if code > 0 else 1
                server.track_shm_regions()
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
