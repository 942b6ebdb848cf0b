"""A bounded load generator for a running server (loopback only): capacity, then overload.

`measure_capacity` runs a closed loop (fixed concurrency) and reports completed requests/s.
`run_open_loop` sends Poisson arrivals at a given rate for a fixed time, each a streaming
`/generate_stream` request of mixed length, and classifies how every request ended: a full
response (a finish reason), an explicit error (with its message), or lost (neither — the
target is none). It also samples the server's memory (RSS of tritonserver and its stubs).
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

WORDS = ("the river light stone market engine quiet window garden number story signal bread "
         "mountain paper winter glass letter music bridge").split()


@dataclass
class LoadResult:
    sent: int = 0
    completed: int = 0
    errors: Counter = field(default_factory=Counter)  # first words of the error message → count
    lost: int = 0
    lost_reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    rss_mb: list[float] = field(default_factory=list)  # server memory samples over the run

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0


def _prompt(rng: random.Random) -> tuple[str, int]:
    words = rng.randint(3, 120)
    return " ".join(rng.choice(WORDS) for _ in range(words)), rng.randint(8, 64)


def stream_events(url: str, body: dict, timeout: float) -> Iterator[dict]:
    """The JSON events of one `/generate_stream` request (Server-Sent Events), as they arrive."""
    req = urllib.request.Request(f"{url}/v2/models/ensemble/generate_stream",
                                 data=json.dumps({**body, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode()
            if line.startswith("data: "):
                yield json.loads(line[6:])


def one_request(url: str, prompt: str, max_tokens: int, timeout: float) -> tuple[str, str | None]:
    """('completed', None) | ('error', message) | ('lost', why)."""
    try:
        for event in stream_events(url, {"text_input": prompt, "max_tokens": max_tokens}, timeout):
            if "error" in event:
                return "error", event["error"]
            if event.get("finish_reason"):
                return "completed", None
        return "lost", "stream ended without a finish reason"
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace").strip()
        body = body[len("data: "):] if body.startswith("data: ") else body
        try:
            return "error", json.loads(body).get("error", body)
        except ValueError:
            return "error", body or str(e)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        return "lost", f"{type(e).__name__}: {e}"


def server_rss_mb(run_dir: str | Path) -> float:
    """Resident memory of the tritonserver process tree of one run (matched by its run dir)."""
    total = 0
    marker = str(run_dir).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker not in (proc / "cmdline").read_bytes():
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _record(result: LoadResult, outcome: tuple[str, str | None], lock: threading.Lock) -> None:
    kind, message = outcome
    with lock:
        if kind == "completed":
            result.completed += 1
        elif kind == "error":
            result.errors[" ".join((message or "").split()[:3])] += 1
        else:
            result.lost += 1
            result.lost_reasons[(message or "")[:80]] += 1


def measure_capacity(url: str, concurrency: int, seconds: float, seed: int = 0) -> LoadResult:
    rng, lock, result = random.Random(seed), threading.Lock(), LoadResult()
    deadline = time.monotonic() + seconds

    def worker(i: int) -> None:
        local = random.Random(rng.random() + i)
        while time.monotonic() < deadline:
            with lock:
                result.sent += 1
            _record(result, one_request(url, *_prompt(local), timeout=300), lock)

    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    result.seconds = time.monotonic() - start
    return result


def run_open_loop(url: str, rate: float, seconds: float, run_dir: str | Path | None = None,
                  seed: int = 1, max_in_flight: int = 512) -> LoadResult:
    """Poisson arrivals at `rate` req/s for `seconds`; waits for every request to end."""
    rng, lock, result = random.Random(seed), threading.Lock(), LoadResult()
    start = time.monotonic()
    next_sample = start
    with ThreadPoolExecutor(max_in_flight) as pool:
        t = start
        while t - start < seconds:
            t += rng.expovariate(rate)
            time.sleep(max(0.0, t - time.monotonic()))
            result.sent += 1
            prompt, max_tokens = _prompt(rng)
            pool.submit(lambda p=prompt, m=max_tokens: _record(result, one_request(url, p, m, 300), lock))
            if run_dir is not None and time.monotonic() >= next_sample:
                result.rss_mb.append(server_rss_mb(run_dir))
                next_sample += 5.0
    result.seconds = time.monotonic() - start
    if run_dir is not None:
        result.rss_mb.append(server_rss_mb(run_dir))
    return result
