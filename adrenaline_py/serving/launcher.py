"""`adrenaline serve`: fill the model repository's templates, start tritonserver, stop it cleanly.

One server run owns a run directory on /dev/shm: engine.json (the one config every model
reads), the filled model repository, the backend directory, the KV pools and offload buffers
(shared memory), the executor's socket and, on GPUs, the MPS pipes. Everything is removed when
the server stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from string import Template

from adrenaline_py.config import EngineConfig
from adrenaline_py.serving.triton_runtime import TritonRuntime

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
BACKEND_DIR = PROJECT_ROOT / "backends" / "adrenaline"


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
        if not engine.run_dir or engine.run_dir == EngineConfig().run_dir:
            base = "/dev/shm" if Path("/dev/shm").is_dir() else None
            run_dir = tempfile.mkdtemp(prefix=f"adrenaline-{options.http_port}-", dir=base)
            engine = EngineConfig(**{**engine.__dict__, "run_dir": run_dir})
        self.engine = engine
        self.run_dir = Path(engine.run_dir)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.mps = MPSDaemon(self.run_dir) if engine.device == "cuda" and options.use_mps else None
        self._log_file = None

    @property
    def http_url(self) -> str:
        return f"http://{self.options.address}:{self.options.http_port}"

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "engine.json"
        self.engine.save(config_path)
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
        if self.mps is not None:
            self.mps.start()
            env.update(self.mps.env)
        cmd = runtime.server_command(repo, backends, o.http_port, o.grpc_port, o.metrics_port,
                                     address=o.address, log_verbose=o.log_verbose)
        stdout = None
        if self.log_path is not None:
            self._log_file = open(self.log_path, "ab")
            stdout = self._log_file
        # Own process group: stopping it also ends the python-backend stubs.
        self.process = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.options.startup_timeout_s
        url = f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} during start-up"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver was not ready within {self.options.startup_timeout_s:.0f}s")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        if self.process is not None:
            try:  # stubs left behind by a crashed server
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.mps is not None:
            self.mps.stop()
        if self._log_file is not None:
            self._log_file.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

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


def serve_forever(engine: EngineConfig, options: ServerOptions) -> int:
    server = Server(engine, options)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    # Explicit handlers: a launcher started in the background inherits SIGINT ignored.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
        print(f"adrenaline: starting tritonserver (model {engine.model}, device {engine.device}, "
              f"offload {engine.offload}); run dir {server.run_dir}", file=sys.stderr, flush=True)
        server.wait_ready()
        o = options
        print(
            f"\nadrenaline: ready.\n"
            f"  HTTP    {server.http_url}/v2/models/ensemble/generate  (and /generate_stream)\n"
            f"  gRPC    {o.address}:{o.grpc_port}  (model 'ensemble', streaming supported)\n"
            f"  metrics http://{o.address}:{o.metrics_port}/metrics\n"
            f"  try:    curl -s -X POST {server.http_url}/v2/models/ensemble/generate "
            f"-d '{{\"text_input\": \"The capital of France is\", \"max_tokens\": 16}}'\n"
            f"Ctrl-C stops the server.",
            file=sys.stderr, flush=True,
        )
        return server.process.wait()
    except KeyboardInterrupt:
        print("\nadrenaline: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        server.stop()
