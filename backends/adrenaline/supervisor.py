"""A role's worker process: started by the role's (long-lived) Triton stub, restarted when it dies.

tritonserver 2.51 never restarts a Python stub that died (a request to it answers "Stub process
'<model>_0_0' is not healthy", and reloading the model through the model-control API neither
restarts it nor lets the server unload it). So the stubs of ``attention`` and ``prefill`` stay
thin supervisors, and the real work runs in a child process (worker.py) that they restart:
the attention executor with its KV pool; the prefill model. The worker owns
those (on GPUs: the CUDA memory behind the IPC handles), so a restarted worker creates them anew.

The stub talks to its worker over a socket pair: length-prefixed pickles, one request, one reply.
The worker exits when the stub's end closes, so a dead stub leaves no worker behind. A second
socket pair carries the worker's heartbeat (a byte every HEARTBEAT_PERIOD_S from a thread of its
own): a worker that stops beating for ``stall_timeout_s`` (SIGSTOP, a wedged process) is reported
not ready and killed, and the restart follows as for a dead one. No Triton import here: this
module and worker.py also run (and are tested) without tritonserver.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("adrenaline.supervisor")

WORKER = Path(__file__).resolve().with_name("worker.py")
PYTHON_ENV = "ADRENALINE_PYTHON"  # the interpreter for workers (set by the launcher)
HEARTBEAT_PERIOD_S = 0.5
_LEN = struct.Struct("<Q")


class WorkerGone(RuntimeError):
    """The worker died (or is restarting) before it answered."""


class Channel:
    """Length-prefixed pickles over a stream socket (both ends are our own processes)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(_LEN.pack(len(data)) + data)

    def recv(self) -> Any:
        (n,) = _LEN.unpack(self._exact(_LEN.size))
        return pickle.loads(self._exact(n))

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError("the other end closed the channel")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()


def python_executable() -> str:
    """The interpreter for workers: the launcher's (a Python stub's ``sys.executable`` is not
    necessarily an interpreter), else this one, else ``python3`` on PATH (the venv's under Triton)."""
    if os.environ.get(PYTHON_ENV):
        return os.environ[PYTHON_ENV]
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    return shutil.which("python3") or sys.executable


class WorkerSupervisor:
    """Runs ``worker.py <role> <engine.json> <generation> <fd>`` and restarts it when it exits.

    Generations count from 1; each start is a new one. Each worker first receives ``init`` (what the
    stub already knows, e.g. the model's shape, so that a restart is quick). ``on_exit(pid)`` runs
    after a worker died and before it is reaped (so its pid cannot have been reused yet) and before
    the next one starts. Restarts wait ``backoff_s`` (the first one none; a worker that served for
    ``stable_after_s`` resets it), so a worker that cannot start does not spin.
    """

    def __init__(
        self,
        role: str,
        config_path: str,
        init: Any = None,
        on_exit: Callable[[int], None] = lambda pid: None,
        ready_timeout_s: float = 600.0,
        backoff_s: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0),
        stable_after_s: float = 60.0,
        stall_timeout_s: float | None = None,
    ) -> None:
        self.role, self.config_path, self.init = role, config_path, init
        self.on_exit = on_exit
        self.ready_timeout_s = ready_timeout_s
        self.backoff_s = backoff_s
        self.stable_after_s = stable_after_s
        self.stall_timeout_s = stall_timeout_s  # None: only a worker's exit counts
        self.generation = 0
        self.restarts = 0          # workers started after the first one
        self.last_restart_s = 0.0  # death noticed → replacement ready, of the latest restart
        self.info: dict = {}       # what the current worker reported when it became ready
        self.stalls = 0            # workers killed because their heartbeat stopped
        self._hb: socket.socket | None = None  # the current worker's heartbeat socket
        self._proc: subprocess.Popen | None = None
        self._chan: Channel | None = None
        self._starting: tuple[subprocess.Popen | None, Channel | None] = (None, None)  # stop() ends it too
        self._ready = False
        self._cond = threading.Condition()
        self._call_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._monitor, name=f"{role}-supervisor", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name=f"{role}-heartbeat", daemon=True)

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the first worker and wait until it is ready (raises RuntimeError if it cannot)."""
        if not self._spawn():
            raise RuntimeError(f"the {self.role} worker did not start (see the log above)")
        self._thread.start()
        if self.stall_timeout_s is not None:
            self._watcher.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        with self._cond:
            procs = [p for p in (self._proc, self._starting[0]) if p is not None]
            chans = [c for c in (self._chan, self._starting[1]) if c is not None]
            self._ready = False
            hb, self._hb = self._hb, None
            self._cond.notify_all()
        if hb is not None:
            hb.close()
        for chan in chans:
            chan.close()  # a worker exits when its channel closes (one still starting, too)
        for proc in procs:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for thread in (self._thread, self._watcher):
            if thread.is_alive():
                thread.join(timeout=timeout_s)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def ready(self) -> bool:
        return self._ready

    def wait_ready(self, timeout_s: float, after_generation: int = 0) -> bool:
        """Wait until a worker newer than ``after_generation`` is ready."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._stop.is_set() or (self._ready and self.generation > after_generation), timeout_s
            ) and not self._stop.is_set()

    # --- requests ----------------------------------------------------------------------------------

    def call(self, message: Any, wait_s: float = 0.0) -> tuple[int, Any]:
        """Send one request to the worker, waiting up to ``wait_s`` for one to be ready; returns
        (generation that answered, reply). Raises WorkerGone if none is ready or it dies meanwhile."""
        if not self.wait_ready(wait_s):
            raise WorkerGone(f"the {self.role} worker is not running (restarting)")
        with self._call_lock:
            with self._cond:
                chan, generation = self._chan, self.generation
            if chan is None:
                raise WorkerGone(f"the {self.role} worker is not running")
            try:
                chan.send(message)
                return generation, chan.recv()
            except (OSError, ConnectionError, EOFError, pickle.UnpicklingError) as e:
                with self._cond:
                    if self.generation == generation:
                        self._ready = False  # the monitor restarts it; callers wait for the next one
                raise WorkerGone(f"the {self.role} worker (generation {generation}) died: {e}") from e

    # --- internals ---------------------------------------------------------------------------------

    def _spawn(self) -> bool:
        """Start the next generation and wait for its ready message."""
        generation = self.generation + 1
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        hb_parent, hb_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [python_executable(), str(WORKER), self.role, self.config_path, str(generation), str(child.fileno()),
               str(hb_child.fileno())]
        # Same process group as the stub (the launcher's stop() finds it); the two sockets' fds only.
        proc = subprocess.Popen(cmd, pass_fds=(child.fileno(), hb_child.fileno()), close_fds=True)
        child.close()
        hb_child.close()
        chan = Channel(parent)
        with self._cond:
            self.generation = generation  # never reused: a failed start may have left its files
            self._starting = (proc, chan)
        parent.settimeout(self.ready_timeout_s)
        try:
            if self._stop.is_set():
                raise ConnectionError("stopping")
            chan.send(self.init)
            kind, info = chan.recv()
            if kind != "ready":
                raise ConnectionError(f"unexpected first message {kind!r}")
            parent.settimeout(None)
            with self._cond:
                if self._stop.is_set():
                    raise ConnectionError("stopping")
                self._proc, self._chan, self.info, self._ready = proc, chan, info, True
                self._hb, hb_parent = hb_parent, None
                self._starting = (None, None)
                self._cond.notify_all()
        except (OSError, ConnectionError, EOFError, pickle.UnpicklingError, ValueError) as e:
            if not self._stop.is_set():
                log.error("%s worker (generation %d, pid %d) failed to start: %s", self.role, generation, proc.pid, e)
            with self._cond:
                self._starting = (None, None)
            chan.close()
            if hb_parent is not None:
                hb_parent.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            return False
        log.info("%s worker ready (generation %d, pid %d)", self.role, generation, proc.pid)
        return True

    def _monitor(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            proc = self._proc
            started = time.monotonic()
            if proc is not None:
                _wait_exited(proc)
            if self._stop.is_set():
                break
            died = time.monotonic()
            with self._cond:
                self._ready = False
                chan, self._chan = self._chan, None
            if chan is not None:
                chan.close()
            if proc is not None:
                try:
                    self.on_exit(proc.pid)
                except Exception:
                    log.exception("%s worker exit hook failed", self.role)
                code = proc.wait()
                log.error("%s worker (generation %d, pid %d) exited with status %s; restarting it",
                          self.role, self.generation, proc.pid, code)
                self._proc = None
            attempt = 0 if died - started > self.stable_after_s else attempt
            if self._stop.wait(self.backoff_s[min(attempt, len(self.backoff_s) - 1)]):
                break
            attempt += 1
            if self._spawn():
                self.restarts += 1
                self.last_restart_s = time.monotonic() - died
                log.warning("%s worker restarted in %.1fs (generation %d)", self.role, self.last_restart_s,
                            self.generation)


    def _watch(self) -> None:
        """Kill a ready worker whose heartbeat stopped for ``stall_timeout_s``: the monitor restarts it."""
        seen = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda seen=seen: self._stop.is_set() or (self._ready and self.generation > seen))
                if self._stop.is_set():
                    return
                hb, proc, seen = self._hb, self._proc, self.generation
            last = time.monotonic()
            while not self._stop.is_set() and hb is not None:
                try:
                    readable, _, _ = select.select([hb], [], [], HEARTBEAT_PERIOD_S)
                    if readable:
                        if not hb.recv(4096):
                            break  # the worker exited: the monitor restarts it
                        last = time.monotonic()
                except (OSError, ValueError):  # closed by stop()
                    break
                silent = time.monotonic() - last
                if silent > self.stall_timeout_s:
                    with self._cond:
                        if self.generation == seen:
                            self._ready = False  # reported down at once; calls wait for the next one
                    self.stalls += 1
                    log.error("%s worker (generation %d, pid %d) sent no heartbeat for %.1fs: killing it",
                              self.role, seen, proc.pid, silent)
                    proc.kill()  # also ends a SIGSTOPped process; the monitor reaps and restarts it
                    break
            with self._cond:
                if self._hb is hb:
                    self._hb = None
            if hb is not None:
                hb.close()


def _wait_exited(proc: subprocess.Popen) -> None:
    """Block until ``proc`` exits, without reaping it (its pid stays reserved for on_exit)."""
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # already reaped (e.g. SIGCHLD ignored): poll instead
        while proc.poll() is None:
            time.sleep(0.1)
    except InterruptedError:
        _wait_exited(proc)
