"""Graceful shutdown of `adrenaline serve` (real tritonserver, dummy:tiny model, loopback only).

On SIGTERM the launcher has tritonserver stop accepting requests, lets in-flight requests finish
within the drain timeout, and afterwards no process of the server and nothing it created in
/dev/shm (its run directory, the python backend's `triton_*_shm_region_*`) is left.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_ports, small_engine_config

from adrenaline_py.serving.launcher import Server, ServerOptions

pytestmark = pytest.mark.server

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
START_TIMEOUT_S = 300
REGION = re.compile(r"triton_[A-Za-z0-9_]+_shm_region_[0-9A-Fa-f-]+")
# dummy:tiny decodes about 500-1500 tokens/s on a CPU core: a few thousand tokens keep a request
# in flight for a few seconds.
LONG_CONTEXT = ["--max-model-len", "4096", "--max-tokens-limit", "4000", "--num-decode-blocks", "1024",
                "--num-executor-blocks", "1024", "--max-decode-batch", "8"]


# --- processes and /dev/shm ----------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process, None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = stat[stat.rindex(")") + 2:].split()
    return f[0], int(f[1]), int(f[2])


def _alive(pid: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    return [(pid, _cmdline(pid)) for pid in _pids() if text in _cmdline(pid) and _alive(pid)]


def _group(pgid: int) -> list[int]:
    out = []
    for pid in _pids():
        st = _proc_stat(pid)
        if st is not None and st[2] == pgid and st[0] not in ("Z", "X"):
            out.append(pid)
    return out


def _mapped_regions(pid: int) -> set[str]:
    try:
        return set(REGION.findall(Path(f"/proc/{pid}/maps").read_text()))
    except OSError:
        return set()


def _in_use_by_someone_else(entry: str) -> bool:
    """An entry of /dev/shm that another live server owns (tests may run beside other servers)."""
    path = str(SHM / entry)
    for pid in _pids():
        if entry.startswith("adrenaline-") and path in _cmdline(pid):
            return True
        if REGION.fullmatch(entry) and entry in _mapped_regions(pid):
            return True
    return False


def _shm_listing() -> set[str]:
    return set(os.listdir(SHM)) if SHM.is_dir() else set()


def _leftovers(before: set[str]) -> set[str]:
    """Entries that appeared in /dev/shm since ``before`` and that no live process holds."""
    return {e for e in _shm_listing() - before if not _in_use_by_someone_else(e)}


# --- the launcher as a subprocess ----------------------------------------------------------------


class Launcher:
    def __init__(self, tmp_path: Path, *args: str, drain_timeout: float = 30.0, stop_grace: float = 30.0):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log_path = tmp_path / "launcher.log"
        self.drain_timeout = drain_timeout
        self.stop_grace = stop_grace
        cmd = [sys.executable, "-m", "adrenaline_py.cli", "serve", "--model", "dummy:tiny",
               "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
               "--drain-timeout", str(drain_timeout), "--stop-grace", str(stop_grace), *args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                                          os.environ.get("PYTHONPATH")]))}
        env.pop("ADRENALINE_API_KEY", None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.triton_pid: int | None = None
        self.stub_pids: set[int] = set()
        self.regions: set[str] = set()
        self.run_dir: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"launcher exited with {self.proc.returncode} during start-up:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"server not ready within {START_TIMEOUT_S}s:\n{self.log()[-4000:]}")
        # the launcher's own readiness check comes a moment after ours
        assert _wait(lambda: "adrenaline: ready" in self.log(), 30), self.log()[-4000:]
        self.run_dir = re.search(r"run dir (\S+)", self.log()).group(1)
        children = [p for p in _pids() if (_proc_stat(p) or ("", 0, 0))[1] == self.proc.pid]
        self.triton_pid = next(p for p in children if "tritonserver" in _cmdline(p))
        self.snapshot()

    def snapshot(self) -> None:
        """Record the server's processes and shared-memory regions (to check them after exit)."""
        self.stub_pids |= set(_group(self.triton_pid)) - {self.triton_pid}
        self.regions |= _mapped_regions(self.triton_pid)

    def server_processes_left(self) -> list[tuple[int, str]]:
        left = [(p, _cmdline(p)) for p in {self.triton_pid, *self.stub_pids} if _alive(p)]
        left += _processes_mentioning(self.run_dir)
        return left

    def cleanup(self) -> None:
        for pid in (self.proc.pid, self.triton_pid):
            if pid is not None:
                try:
                    os.killpg(pid, signal.SIGKILL) if pid == self.triton_pid else os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


@pytest.fixture
def launch(tmp_path):
    started: list[Launcher] = []

    def start(*args: str, **kw) -> Launcher:
        launcher = Launcher(tmp_path, *args, **kw)
        started.append(launcher)
        launcher.wait_ready()
        return launcher

    yield start
    for launcher in started:
        launcher.cleanup()
        if launcher.run_dir:
            import shutil
            shutil.rmtree(launcher.run_dir, ignore_errors=True)


class Stream(threading.Thread):
    """A /generate_stream request read in a thread: its events, how it ended, when it started."""

    def __init__(self, url: str, max_tokens: int, timeout: float = 120.0):
        super().__init__(daemon=True)
        self.url, self.max_tokens, self.timeout = url, max_tokens, timeout
        self.events: list[dict] = []
        self.error: str | None = None
        self.started_streaming = threading.Event()

    def run(self) -> None:
        body = {"text_input": "Once upon a time", "max_tokens": self.max_tokens, "stream": True}
        req = urllib.request.Request(f"{self.url}/v2/models/ensemble/generate_stream", data=json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if line.startswith("data: "):
                        self.events.append(json.loads(line[len("data: "):]))
                        self.started_streaming.set()
        except Exception as e:  # noqa: BLE001 - any way the stream ends is recorded
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.started_streaming.set()

    @property
    def finish_reason(self) -> str | None:
        return next((e["finish_reason"] for e in self.events if e.get("finish_reason")), None)

    @property
    def event_error(self) -> str | None:
        return next((e["error"] for e in self.events if "error" in e), None)

    @property
    def tokens(self) -> int:
        return sum(e.get("num_output_tokens", 0) for e in self.events)

    def outcome(self) -> str:
        """'complete' (final event with a finish_reason and every token), 'error' (an error event or a
        connection error) or 'cut off' (the stream ended without its final event: a server that
        exits mid-stream closes the connection, which an SSE client sees as a missing final event)."""
        if self.event_error is not None or self.error is not None:
            return "error"
        if self.finish_reason is None:
            return "cut off"
        assert self.finish_reason == "length" and self.tokens == self.max_tokens, (self.finish_reason, self.tokens)
        return "complete"


def _refused(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/v2/health/live", timeout=2).close()
    except urllib.error.HTTPError:
        return False  # answered
    except (urllib.error.URLError, OSError):
        return True
    return False


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


# --- tests ---------------------------------------------------------------------------------------


def test_sigterm_lets_the_inflight_stream_finish_then_leaves_nothing(launch):
    before = _shm_listing()
    server = launch(*LONG_CONTEXT, drain_timeout=30)
    assert server.regions and server.stub_pids, "expected python-backend stubs and their shm regions"
    stream = Stream(server.url, max_tokens=3000)
    stream.start()
    assert stream.started_streaming.wait(60) and stream.events, stream.error
    server.snapshot()
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    # no new connections once the signal is handled (the stream keeps its own connection)
    assert _wait(lambda: _refused(server.url), 5.0), "HTTP still accepts connections during the drain"
    stream.join(server.drain_timeout + 10)
    assert not stream.is_alive(), "the in-flight stream hangs"
    assert stream.error is None and stream.event_error is None, (stream.error, stream.event_error)
    assert stream.finish_reason == "length" and stream.tokens == 3000, (stream.finish_reason, stream.tokens)
    rc = server.proc.wait(server.drain_timeout + server.stop_grace + 10)
    took = time.monotonic() - t0
    print(f"\nstream finished at +{took:.1f}s after SIGTERM; launcher exit {rc} after {took:.1f}s")
    assert rc == 0, server.log()[-3000:]
    assert took < server.drain_timeout + 5, f"stop took {took:.1f}s"
    assert "stopped cleanly" in server.log(), server.log()[-3000:]
    assert server.server_processes_left() == []
    assert not Path(server.run_dir).exists()
    assert not any((SHM / r).exists() for r in server.regions)
    assert _leftovers(before) == set()


@pytest.mark.parametrize("back_to_back", [False, True], ids=["after-stopping", "back-to-back"])
def test_second_sigterm_stops_at_once_and_cleans_up_what_tritonserver_left(launch, back_to_back):
    """The forced path: tritonserver is killed mid-request; the launcher still removes its stubs,
    the python backend's shm regions (which only a clean unload removes) and the run directory.
    Back to back: the second signal comes before the drain announced its own deadline, which must
    not overwrite the forced one."""
    before = _shm_listing()
    server = launch(*LONG_CONTEXT, drain_timeout=60)
    stream = Stream(server.url, max_tokens=3900)
    stream.start()
    assert stream.started_streaming.wait(60) and stream.events, stream.error
    # An idle keep-alive connection to tritonserver's own HTTP holds 2.51's drain to its exit timeout
    # (docs/reliability.md): tritonserver cannot stop by itself, so the launcher must kill it.
    internal = re.search(r"tritonserver's own HTTP on http://127\.0\.0\.1:(\d+)", server.log()).group(1)
    idle = http.client.HTTPConnection("127.0.0.1", int(internal), timeout=10)
    idle.request("GET", "/v2/health/live")
    assert idle.getresponse().read() == b""
    server.snapshot()
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    if not back_to_back:
        assert _wait(lambda: "adrenaline: stopping" in server.log(), 5.0)
    else:
        time.sleep(0.05)  # two handlers, in order
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(30)
    took = time.monotonic() - t0
    stream.join(30)
    assert not stream.is_alive()
    assert rc == 0, server.log()[-3000:]
    assert took < 20, f"a second SIGTERM should stop at once, took {took:.1f}s"
    print(f"\nsecond SIGTERM: launcher exit {rc} after {took:.1f}s; the stream: {stream.outcome()}")
    # the stream is not just cut: it gets an error saying why
    assert stream.event_error is not None and "second stop signal" in stream.event_error, (stream.error,
                                                                                          stream.events[-1:])
    log = server.log()
    idle.close()
    assert "killing tritonserver" in log and "not cleanly" in log, log[-3000:]
    assert server.server_processes_left() == []
    assert not Path(server.run_dir).exists()
    assert not any((SHM / r).exists() for r in server.regions)
    assert _leftovers(before) == set()


def test_drain_timeout_bounds_the_stop_and_ends_requests_clearly(launch):
    before = _shm_listing()
    server = launch(*LONG_CONTEXT, drain_timeout=1, stop_grace=10)
    streams = [Stream(server.url, max_tokens=3900, timeout=60) for _ in range(3)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started_streaming.wait(60) and s.events, s.error
    server.snapshot()
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(1 + 10 + 15)
    took = time.monotonic() - t0
    for s in streams:
        s.join(30)
        assert not s.is_alive(), "a request hangs after the server stopped"
    # each finished in time or ended with an explicit error event sent just before the timeout
    # (adrenaline_py/serving/health.py): never a short "complete", never a silently closed stream
    outcomes = [s.outcome() for s in streams]
    print(f"\nlauncher exit {rc} after {took:.1f}s; requests: {outcomes}")
    assert set(outcomes) <= {"complete", "error"}, outcomes
    for s in streams:
        if s.outcome() == "error":
            assert s.event_error is not None and "drain timeout (1s)" in s.event_error, (s.error, s.events[-1:])
    assert rc == 0, server.log()[-3000:]
    assert took < 1 + 10 + 5
    assert server.server_processes_left() == []
    assert not Path(server.run_dir).exists()
    assert not any((SHM / r).exists() for r in server.regions)
    assert _leftovers(before) == set()


def test_launcher_killed_with_sigkill_takes_tritonserver_down(launch):
    """PR_SET_PDEATHSIG: without its launcher, tritonserver drains and exits by itself."""
    server = launch(drain_timeout=10)
    server.proc.kill()
    server.proc.wait(10)
    assert _wait(lambda: not server.server_processes_left(), 10 + 30), server.server_processes_left()
    # a clean tritonserver exit unlinks its regions; only the run directory (the launcher's job) stays
    assert not any((SHM / r).exists() for r in server.regions)


def test_crashed_tritonserver_stubs_and_shm_regions_are_removed_by_stop(tmp_path):
    """SIGKILL of tritonserver leaves its stubs running and its shm regions in /dev/shm;
    Server.stop() ends the stubs (same process group) and removes the regions it recorded."""
    before = _shm_listing()
    http, grpc_port, metrics = free_ports(3)
    engine = small_engine_config(model="dummy:tiny", run_dir="")
    server = Server(engine, ServerOptions(http_port=http, grpc_port=grpc_port, metrics_port=metrics,
                                          startup_timeout_s=START_TIMEOUT_S), log_path=tmp_path / "server.log")
    try:
        server.__enter__()
        pgid = server.process.pid
        stubs = set(_group(pgid)) - {pgid}
        regions = _mapped_regions(pgid)  # one per stub (start-up also makes short-lived ones)
        assert stubs and regions and regions <= server.shm_regions
        assert all(_proc_stat(p)[2] == pgid for p in stubs), "stubs are not in tritonserver's process group"
        os.kill(pgid, signal.SIGKILL)
        server.process.wait(10)
        assert all((SHM / r).exists() for r in regions), "expected the crash to leave the regions"
        t0 = time.monotonic()
        assert server.stop() is False  # not a clean stop
        print(f"\nstop after crash: {time.monotonic() - t0:.1f}s; removed {len(server.removed_shm_regions)} regions")
        assert not any(_alive(p) for p in stubs)
        assert set(server.removed_shm_regions) <= server.shm_regions  # (a dying stub may unlink its own)
        assert not any((SHM / r).exists() for r in regions)
        assert not server.run_dir.exists()
        assert _leftovers(before) == set()
    finally:
        server.stop()


# --- health tells the truth: stalled workers, dead and stalled stubs ------------------------------------


def _stub_pids(run_dir: str) -> dict[str, int]:
    """model → pid of its python-backend stub (argv[1] is <run dir>/model_repository/<model>/1/model.py)."""
    out = {}
    for pid in _pids():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (len(args) > 1 and args[0].endswith(b"triton_python_backend_stub") and args[1].startswith(run_dir.encode())
                and _alive(pid)):
            out[Path(args[1].decode()).parts[-3]] = pid
    return out


def _worker_pid(run_dir: str, role: str) -> int | None:
    for pid in _pids():
        args = _cmdline(pid).split()
        if len(args) > 3 and args[1].endswith("worker.py") and args[2] == role and args[3].startswith(run_dir) \
                and _alive(pid):
            return pid
    return None


def _metric(server: Launcher, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    for line in text.split("\n"):
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _generate(url: str, timeout: float = 120.0) -> dict:
    body = json.dumps({"text_input": "Once upon a time", "max_tokens": 8}).encode()
    req = urllib.request.Request(f"{url}/v2/models/ensemble/generate", data=body)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def _in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def test_stalled_worker_and_dead_or_stalled_stubs_are_reported_and_restarted(launch):
    """tritonserver 2.51 keeps a model ready after its stub died or stopped and never restarts one;
    a SIGSTOPped worker is alive for waitid. Heartbeats make each of them visible and restarted."""
    server = launch("--heartbeat-timeout", "2", drain_timeout=3, stop_grace=10)
    up, restarts = 'adrenaline_worker_up{model="prefill"}', 'adrenaline_worker_restarts_total{model="prefill"}'
    assert _generate(server.url)["finish_reason"] == "length"

    # 1. prefill's worker stopped: worker_up 0, killed and restarted; the request waiting on it completes
    worker = _worker_pid(server.run_dir, "prefill")
    os.kill(worker, signal.SIGSTOP)
    t0 = time.monotonic()
    waiting, result = _in_thread(lambda: _generate(server.url))
    assert _wait(lambda: _metric(server, up) == 0, 15), "worker_up stayed 1 for a stopped worker"
    down_s = time.monotonic() - t0
    assert _wait(lambda: _metric(server, restarts) == 1 and _metric(server, up) == 1, 120)
    waiting.join(120)
    assert result and result[0].get("finish_reason") == "length", result
    assert not _alive(worker) and _worker_pid(server.run_dir, "prefill") not in (None, worker)
    worker_s = time.monotonic() - t0

    # 2. the attention stub killed: the launcher drains tritonserver (not ready from then on) and restarts it
    stubs = _stub_pids(server.run_dir)
    os.kill(stubs["attention"], signal.SIGKILL)
    t1 = time.monotonic()
    assert _wait(lambda: not _ready(server.url), 15), "still ready with a dead stub"
    not_ready_s = time.monotonic() - t1
    assert _wait(lambda: _ready(server.url), START_TIMEOUT_S)
    back_s = time.monotonic() - t1
    assert f"the stub of attention_0_0 (pid {stubs['attention']}) died" in server.log()
    assert _generate(server.url)["finish_reason"] == "length"
    assert not set(_stub_pids(server.run_dir).values()) & set(stubs.values())

    # 3. the scheduler stub stopped: killed at the heartbeat timeout, so the request waiting on it ends
    stubs = _stub_pids(server.run_dir)
    os.kill(stubs["scheduler"], signal.SIGSTOP)
    t2 = time.monotonic()
    waiting, result = _in_thread(lambda: _generate(server.url))
    waiting.join(30)
    ended_s = time.monotonic() - t2
    assert result and "error" in result[0], result  # bounded: an error, not a hang
    assert _wait(lambda: not _ready(server.url), 15)
    assert _wait(lambda: _ready(server.url), START_TIMEOUT_S)
    assert f"the stub of scheduler_0_0 (pid {stubs['scheduler']}) sent no heartbeat" in server.log()
    assert _generate(server.url)["finish_reason"] == "length"
    print(f"\nstopped prefill worker: worker_up 0 after {down_s:.1f}s, serving again after {worker_s:.1f}s; "
          f"killed attention stub: not ready after {not_ready_s:.1f}s, ready again after {back_s:.1f}s; "
          f"stopped scheduler stub: its request ended with an error after {ended_s:.1f}s "
          f"({result[0]['error']!r})")

    key = (Path(server.run_dir) / "api_key").read_text().strip()
    assert key and key not in server.log()  # neither printed by the launcher nor logged by tritonserver
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.log()[-3000:]


def test_a_second_stop_signal_moves_the_announced_cut_to_now(tmp_path):
    from adrenaline_py.serving.health import DrainWatch, write_drain_deadline

    watch = DrainWatch(tmp_path, check_every_s=0.0)
    assert watch.cut_due() is None                                  # no stop announced
    write_drain_deadline(tmp_path, 60.0)
    assert watch.cut_due() is None and watch.deadline is not None   # read, 59 s away
    write_drain_deadline(tmp_path, 60.0, forced=True)
    cut = watch.cut_due()
    assert cut is not None and cut.forced and "second stop signal" in cut.message
