"""Liveness between the launcher and the server's processes, through files in the run directory.

tritonserver 2.51 keeps a model "ready" after its python-backend stub died or stopped, and never
restarts a stub. So every stub touches a heartbeat file (`Heartbeat`), and the launcher
(launcher.py) treats a stub whose process is gone, or whose heartbeat is older than the engine's
``heartbeat_timeout_s``, as a failure of the whole server: it stops tritonserver (its health
answers "not ready" from then on) and starts it again.

On SIGTERM the launcher also writes when the drain timeout will end in-flight requests
(`write_drain_deadline`); decode and the scheduler end them with an explicit error just before
that (`DrainWatch`), instead of tritonserver closing their connections without a final event.

No Triton import here: the launcher, the roles and the tests use it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT_DIR = "heartbeat"
HEARTBEAT_PERIOD_S = 0.5
DRAIN_FILE = "drain.json"
DRAIN_ACK_FILE = "drain_ack"  # decode wrote it: after a forced stop it holds no request and sent every error


def heartbeat_path(run_dir: str | Path, pid: int) -> Path:
    return Path(run_dir) / HEARTBEAT_DIR / str(pid)


class Heartbeat:
    """Touches ``<run_dir>/heartbeat/<pid>`` (content: the model instance) every period, from a
    daemon thread. A stopped (SIGSTOP) or wedged process stops touching it."""

    def __init__(self, run_dir: str | Path, name: str, period_s: float = HEARTBEAT_PERIOD_S) -> None:
        self.path = heartbeat_path(run_dir, os.getpid())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(name)
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                os.utime(self.path)
            except OSError:  # the run directory is going away: the server is stopping
                return

    def stop(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)


def heartbeat_age(run_dir: str | Path, pid: int, now: float | None = None) -> float | None:
    """Seconds since the process last beat; None when it never wrote one."""
    try:
        mtime = heartbeat_path(run_dir, pid).stat().st_mtime
    except OSError:
        return None
    return (time.time() if now is None else now) - mtime


@dataclass(frozen=True)
class DrainDeadline:
    cut_at: float          # time.time() at which in-flight requests are ended with an error
    drain_timeout_s: float
    forced: bool = False   # a second stop signal: end everything now

    @property
    def message(self) -> str:
        if self.forced:
            return "server shutting down: stopped at once (a second stop signal) before the request finished"
        return (f"server shutting down: the request did not finish within the drain timeout "
                f"({self.drain_timeout_s:g}s)")


def drain_cut_margin(drain_timeout_s: float) -> float:
    """How long before tritonserver's exit timeout the roles end what is left: room for the errors
    to reach the clients before the server exits."""
    return min(1.0, drain_timeout_s / 2)


def write_drain_deadline(run_dir: str | Path, drain_timeout_s: float, now: float | None = None,
                         forced: bool = False) -> DrainDeadline:
    """Announce when in-flight requests end; ``forced``: now (a second stop signal)."""
    now = time.time() if now is None else now
    cut_at = now if forced else now + drain_timeout_s - drain_cut_margin(drain_timeout_s)
    deadline = DrainDeadline(cut_at, drain_timeout_s, forced)
    path = Path(run_dir) / DRAIN_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"cut_at": deadline.cut_at, "drain_timeout_s": drain_timeout_s, "forced": forced}))
    tmp.replace(path)  # readers never see half a file
    return deadline


def write_drain_ack(run_dir: str | Path) -> None:
    (Path(run_dir) / DRAIN_ACK_FILE).touch()


def drain_acked(run_dir: str | Path) -> bool:
    return (Path(run_dir) / DRAIN_ACK_FILE).exists()


class DrainWatch:
    """Whether the launcher's drain deadline has passed (the file is read at most every 0.1 s)."""

    def __init__(self, run_dir: str | Path, check_every_s: float = 0.1) -> None:
        self.path = Path(run_dir) / DRAIN_FILE
        self._check_every_s = check_every_s
        self._checked = 0.0
        self.deadline: DrainDeadline | None = None

    def cut_due(self) -> DrainDeadline | None:
        """The deadline once it has passed, else None. Read again until it is forced: a second stop
        signal moves it to now."""
        now = time.monotonic()
        if (self.deadline is None or not self.deadline.forced) and now - self._checked >= self._check_every_s:
            self._checked = now
            try:
                d = json.loads(self.path.read_text())
                self.deadline = DrainDeadline(float(d["cut_at"]), float(d["drain_timeout_s"]), bool(d.get("forced")))
            except (OSError, ValueError, KeyError, TypeError):
                pass
        if self.deadline is not None and time.time() >= self.deadline.cut_at:
            return self.deadline
        return None
