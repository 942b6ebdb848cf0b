"""Prometheus metrics on Triton's metrics port (pb_utils.MetricFamily), updated off the hot path.

Each role samples its engine state from a background thread every `PERIOD_S`; the decode loop
itself only appends batch sizes to a list.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import triton_python_backend_utils as pb_utils

PERIOD_S = 0.5
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]

log = logging.getLogger("adrenaline.metrics")

_families: dict[str, object] = {}


def family(name: str, description: str, kind: str):
    """One MetricFamily per name per process (creating it twice is an error in Triton)."""
    if name not in _families:
        _families[name] = pb_utils.MetricFamily(name=name, description=description,
                                                kind=getattr(pb_utils.MetricFamily, kind))
    return _families[name]


class Sampler:
    """Calls ``update()`` every PERIOD_S on a daemon thread until stopped."""

    def __init__(self, update: Callable[[], None], period_s: float = PERIOD_S) -> None:
        self._update = update
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                self._update()
            except Exception:  # metrics must never take a role down
                log.exception("metrics update failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class WorkerMetrics:
    """Restarts and liveness of a supervised role's worker process (supervisor.py)."""

    def __init__(self, model: str, supervisor) -> None:
        self.supervisor = supervisor
        self.restarts = family("adrenaline_worker_restarts_total",
                               "worker processes restarted after one died, per model", "COUNTER"
                               ).Metric(labels={"model": model})
        self.up = family("adrenaline_worker_up", "1 while the model's worker process serves (and beats), 0 while "
                         "it is stalled or restarting", "GAUGE").Metric(labels={"model": model})
        self._seen = 0

    def update(self) -> None:
        self.up.set(1 if self.supervisor.ready else 0)
        n = self.supervisor.restarts
        if n > self._seen:
            self.restarts.increment(n - self._seen)
            self._seen = n


class PendingCounters:
    """Counters summed where things happen and pushed to Triton by ``update()`` from the sampler
    thread: each push is an IPC to tritonserver, which the request path should not pay."""

    def __init__(self, specs: dict[str, tuple[str, str]]) -> None:
        """``specs``: key -> (metric name, description)."""
        self._counters = {k: family(name, text, "COUNTER").Metric() for k, (name, text) in specs.items()}
        self._lock = threading.Lock()
        self._pending = dict.fromkeys(specs, 0.0)

    def add(self, **values: float) -> None:
        with self._lock:
            for key, value in values.items():
                self._pending[key] += value

    def update(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, dict.fromkeys(self._pending, 0.0)
        for key, value in pending.items():
            if value:
                self._counters[key].increment(value)


#: what prefill did, so `bench serve` reports how busy it was and at what prompt load (the load rule
#: of the SM shares, adrenaline_py/profile.py); the busy time is a pass's time in the worker process
PREFILL_COUNTERS = {
    "passes": ("adrenaline_prefill_passes_total", "batched prefill passes run"),
    "prompts": ("adrenaline_prefill_prompts_total", "prompts prefilled"),
    "tokens": ("adrenaline_prefill_tokens_total", "prompt tokens prefilled"),
    "busy_s": ("adrenaline_prefill_busy_seconds_total",
               "seconds the prefill worker spent on passes (busy fraction: its rate)"),
}
