"""The offline profile of one (GPU, model shape), and the settings the launcher derives from it.

Adrenaline (arXiv 2503.20552; design.md §1) sizes two things from offline measurements: the SM
share prefill gets on the prefill GPU (the smallest that meets the TTFT SLO; the attention
executor gets the rest) and the offload bound OB of the ``auto`` policy (adrenaline_py/policy.py).
`adrenaline profile` (adrenaline_py/bench_profile.py) measures a GPU and writes one JSON per model
shape; this module reads it and `resolve_engine` turns it, the SLOs and the GPUs' memory into the
concrete values every role reads from engine.json.

Profile files: ``adrenaline_py/profiles/<gpu_slug>/<shape>.json`` in the package, and the same
layout under ``$ADRENALINE_PROFILE_DIR``, which is searched first (`find`). Schema, version 1
(keys not listed here are allowed and ignored, so the profiler may add its own):

    {"version": 1,                     # required, must be 1
     "gpu": "NVIDIA H200",             # required: torch.cuda.get_device_name
     "gpu_slug": "nvidia-h200",        # required: gpu_slug(gpu), the directory name
     "shape": "llama-2-7b",            # required: a name of config.NAMED_SHAPES, the file name
     "dtype": "bfloat16",              # required: the dtype measured; a profile serves only that dtype
     "block_size": 16,                 # required: KV block (page) size of the kernels measured
     "num_sms": 132, "memory_gib": 139.8, "date": "2026-11-30", "torch": "...", "triton": "...",
     "copy_gbs": 4279.0,               # optional (number or null): device-to-device copy bandwidth, the roofline
     "attention": [{"sm_share": 10, "gbs": 1234.5}, ...],
         # required, non-empty: decode-attention bandwidth (GB/s) of the paged kernel in a process
         # capped at sm_share % of the SMs (CUDA MPS), sm_share in 1..100, unique
     "prefill": [{"sm_share": 30, "prompt_len": 512, "ms": 40.1}, ...],
         # prefill latency (ms) of ONE prompt of prompt_len tokens at sm_share %; unique pairs
     "prefill_loaded": [{"sm_share": 30, "prompt_len": 512, "ms": 75.3}, ...],
         # optional: the same beside an attention load (decode attention without pause in another
         # MPS client at 100 - sm_share %), as prefill runs beside a working executor
     "decode_step": [{"batch": 64, "context": 1024, "ms": 13.9, "dense_ms": 8.1}, ...]
         # the all-local decode step (ms) of `batch` requests at `context` tokens each, at 100 %,
         # and dense_ms, the same step without attention; either may be null (not measured);
         # unique (batch, context) pairs
    }

Interpolation (all piecewise-linear between profiled points):

- `attention_gbs(share)`: linear in the share; below the smallest profiled share, linear down to
  0 GB/s at 0 %; above the largest, the largest's value.
- latencies (`prefill_ms`, `step_ms`, `dense_ms`): linear in the prompt length / batch /
  context; below the profiled range the smallest point's value (latency does not fall much there),
  above it the last segment extended (latency keeps growing). `prefill_ms` between two profiled
  shares is linear in the share, and clamped outside them.

The rules the paper gives, with the exact definitions used here:

- prefill share: `smallest_prefill_share(ttft_slo_ms, prompt_len)`, the smallest *profiled* share
  whose prefill of one prompt of ``prompt_len`` tokens meets the SLO. `resolve_sm_shares` uses the
  longest pass prefill runs, ``min(max_prefill_tokens, max_model_len)`` tokens, so that every
  single prompt meets the SLO when it is prefilled alone (queueing and batching are not modelled),
  and gives the executor 100 − it, at least MIN_EXECUTOR_SHARE.
- prefill load (not in the paper): the rule above looks at one prompt alone and picked a share
  that prefill could not keep up with under load (docs/performance.md, ninth run). Given the
  prompt tokens per second the deployment is planned for (``--prompt-tokens-per-s``),
  `smallest_prefill_share_for_load` is the smallest profiled share at which prefill is busy at
  most a given fraction of the time, its cost per token read from the longest pass; the share
  in force is the larger of the two rules. With ``prefill_loaded`` figures the rule reads them
  (prefill beside a working executor; at most PREFILL_MAX_LOAD_BESIDE_EXECUTOR busy, among the
  shares measured that way); without, the figures of prefill alone (at most PREFILL_MAX_LOAD).
- `offload_bound`: OB = min(OB_mem, OB_comp).
  OB_mem = min(HBM_p / HBM_d, BW_p / BW_d): HBM_p, HBM_d are the KV capacities of the executor's
  and decode's pools (blocks; both pools have the same block size and dtype), BW_p the attention
  bandwidth at the executor's share, BW_d at 100 % (decode owns its GPU). With one GPU each.
  OB_comp = (B_max − B_TPOT) / B_TPOT: B_TPOT is the largest batch whose all-local step
  (``ms``) at the reference context meets the TPOT SLO, B_max the largest whose step without
  attention (``dense_ms``) does — the batch decode could run if the attention of the rows beyond
  B_TPOT went to the executor. Both are solved on the piecewise-linear curves within the profiled
  batches and rounded down to whole requests. The reference context is ``max_model_len // 2``
  (`reference_context`: the mean context of requests that grow through the whole length; the
  nearest profiled context is used when only one was measured). OB_comp does not bind (OB = OB_mem)
  when there is no TPOT SLO, no decode-step figures, when the all-local step meets the SLO even at
  the largest profiled batch (the bound lies beyond the profile), or when it misses the SLO even at
  the smallest (offloading is then the only way to meet it); when only the dense part meets it at
  the largest profiled batch, B_max is that batch and OB_comp a lower bound.
- Without a profile (CPU, an unprofiled GPU or shape, another dtype): OB = HBM_p / HBM_d.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from adrenaline_py.config import (
    DEFAULT_EXECUTOR_SM_SHARE,
    DEFAULT_PREFILL_SM_SHARE,
    NAMED_SHAPES,
    EngineConfig,
    ModelConfig,
)

PROFILE_VERSION = 1
PROFILE_DIR_ENV = "ADRENALINE_PROFILE_DIR"
PACKAGE_PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
#: the executor keeps at least this SM share when the TTFT SLO picks the prefill share
MIN_EXECUTOR_SHARE = 10
#: the largest fraction of time prefill may be busy at the planned prompt load. Below 1 for the
#: queue (at 0.5 an M/D/1 queue waits half a service time on average) and for what the profile
#: does not see: it times prefill alone, where served it shares the GPU with the executor. Measured
#: (llama-2-7b, ShareGPT lengths at 60 req/s, two H200s): 0.84 by the profile at a 10 % share
#: overloaded prefill (TTFT p50 10.8 s and growing), 0.39 at 20 % held it (TTFT p99 1.25 s).
PREFILL_MAX_LOAD = 0.5
#: the same for figures of prefill beside an attention load (``prefill_loaded``), which carry the
#: executor's interference. Still an estimate from the cheapest tokens (those of the longest
#: pass): served passes are shorter. Measured (the same served runs; llama-2-7b on H200, 2048-token
#: pass beside the load): 1.31 at 10 % (fell behind), 0.52 at 20 % (held; prefill was busy 0.81
#: of the time in passes of ~240 tokens).
PREFILL_MAX_LOAD_BESIDE_EXECUTOR = 0.6


class ProfileError(ValueError):
    """A profile file that does not follow the schema."""


@dataclass(frozen=True)
class AttentionPoint:
    sm_share: int
    gbs: float


@dataclass(frozen=True)
class PrefillPoint:
    sm_share: int
    prompt_len: int
    ms: float


@dataclass(frozen=True)
class StepPoint:
    batch: int
    context: int
    ms: float | None
    dense_ms: float | None


@dataclass(frozen=True)
class OffloadBound:
    """OB and how it was reached (`Profile.offload_bound`)."""

    value: float
    ob_mem: float
    ob_comp: float | None  # None: no compute bound (why: see `note`)
    hbm_ratio: float
    bw_ratio: float | None
    b_tpot: int | None
    b_max: int | None
    note: str


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': lower case, runs of other characters become one '-'."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def shape_name(model: ModelConfig) -> str | None:
    """The name of the NAMED_SHAPES entry with the same kernel-relevant dimensions, if any."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim")
    for name, shape in NAMED_SHAPES.items():
        if all(getattr(shape, k) == getattr(model, k) for k in keys):
            return name
    return None


def ob_mem(hbm_p: float, hbm_d: float, bw_p: float | None = None, bw_d: float | None = None) -> float:
    """min(HBM_p / HBM_d, BW_p / BW_d); the bandwidth term only when both bandwidths are known."""
    if hbm_p < 0 or hbm_d <= 0:
        raise ValueError(f"pool capacities must be >= 0 and > 0, got {hbm_p} and {hbm_d}")
    ratio = hbm_p / hbm_d
    if bw_p is not None and bw_d is not None:
        if bw_d <= 0:
            raise ValueError(f"BW_d must be > 0, got {bw_d}")
        ratio = min(ratio, bw_p / bw_d)
    return ratio


# --- Validation ----------------------------------------------------------------------------------

def _number(d: Mapping[str, Any], key: str, where: str, *, integer: bool = False, optional: bool = False,
            low: float | None = 0.0, high: float | None = None) -> Any:
    """d[key] as a finite number > low (and <= high); None when optional and missing or null."""
    if key not in d or d[key] is None:
        if optional:
            return None
        raise ProfileError(f"{where}: missing {key!r}")
    v = d[key]
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds) or not math.isfinite(v):
        raise ProfileError(f"{where}: {key!r} must be {'an integer' if integer else 'a number'}, got {v!r}")
    if (low is not None and v <= low) or (high is not None and v > high):
        bounds = f"> {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ProfileError(f"{where}: {key!r} must be {bounds}, got {v!r}")
    return v


def _string(d: Mapping[str, Any], key: str, where: str, optional: bool = False) -> str | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v:
        raise ProfileError(f"{where}: {key!r} must be a non-empty string, got {v!r}")
    return v


def _entries(d: Mapping[str, Any], key: str, where: str, non_empty: bool) -> list[Mapping[str, Any]]:
    v = d.get(key)
    if not isinstance(v, list) or not all(isinstance(e, dict) for e in v):
        raise ProfileError(f"{where}: {key!r} must be a list of objects")
    if non_empty and not v:
        raise ProfileError(f"{where}: {key!r} must not be empty")
    return v


def _unique(keys: list[tuple], what: str, where: str) -> None:
    seen = set()
    for k in keys:
        if k in seen:
            raise ProfileError(f"{where}: {what} {k} appears twice")
        seen.add(k)


# --- Interpolation -------------------------------------------------------------------------------

def _interp(xs: Sequence[float], ys: Sequence[float], x: float, extend_high: bool) -> float:
    """Piecewise-linear through (xs, ys) (xs ascending); the first value below xs[0]; above xs[-1]
    the last segment extended when ``extend_high``, else the last value."""
    if x <= xs[0] or len(xs) == 1:  # one point: no slope to extend
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    if not extend_high:
        return ys[-1]
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return ys[-1] + slope * (x - xs[-1])


_Found = tuple[int | None, bool]  # a whole batch (or None) and whether the profile capped it


def _largest_within(xs: Sequence[float], ys: Sequence[float], limit: float) -> tuple[float | None, bool]:
    """The largest x in [xs[0], xs[-1]] where the piecewise-linear curve is <= limit (None if
    nowhere), and whether that is xs[-1] (the curve meets the limit at the end of the profile)."""
    best = xs[0] if ys[0] <= limit else None
    for i in range(1, len(xs)):
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        if y1 <= limit:
            best = x1
        elif y0 <= limit:  # crosses the limit inside the segment
            best = x0 + (limit - y0) / (y1 - y0) * (x1 - x0)
    return best, best is not None and best == xs[-1]


@dataclass(frozen=True)
class Profile:
    gpu: str
    gpu_slug: str
    shape: str
    dtype: str
    block_size: int
    attention: tuple[AttentionPoint, ...]
    prefill: tuple[PrefillPoint, ...]
    decode_step: tuple[StepPoint, ...]
    prefill_loaded: tuple[PrefillPoint, ...] = ()  # beside an attention load at the rest of the SMs
    num_sms: int | None = None
    memory_gib: float | None = None
    date: str | None = None
    torch: str | None = None
    triton: str | None = None
    copy_gbs: float | None = None
    source: str = ""  # the file it was read from

    @classmethod
    def from_dict(cls, d: Any, source: str = "profile") -> Profile:
        """Validate a parsed profile (schema version 1); raises ProfileError naming what is wrong."""
        where = source
        if not isinstance(d, dict):
            raise ProfileError(f"{where}: a profile is a JSON object")
        version = d.get("version")
        if version != PROFILE_VERSION:
            raise ProfileError(f"{where}: unsupported profile version {version!r} (this reader knows "
                               f"{PROFILE_VERSION})")
        attention = []
        for i, e in enumerate(_entries(d, "attention", where, non_empty=True)):
            w = f"{where}: attention[{i}]"
            attention.append(AttentionPoint(_number(e, "sm_share", w, integer=True, high=100),
                                            float(_number(e, "gbs", w))))
        _unique([(a.sm_share,) for a in attention], "attention sm_share", where)
        curves: dict[str, list[PrefillPoint]] = {}
        for key in ("prefill", "prefill_loaded"):
            if key == "prefill_loaded" and d.get(key) is None:
                curves[key] = []
                continue
            points = curves[key] = []
            for i, e in enumerate(_entries(d, key, where, non_empty=False)):
                w = f"{where}: {key}[{i}]"
                points.append(PrefillPoint(_number(e, "sm_share", w, integer=True, high=100),
                                           _number(e, "prompt_len", w, integer=True), float(_number(e, "ms", w))))
            _unique([(p.sm_share, p.prompt_len) for p in points], f"{key} (sm_share, prompt_len)", where)
        prefill, loaded = curves["prefill"], curves["prefill_loaded"]
        steps = []
        for i, e in enumerate(_entries(d, "decode_step", where, non_empty=False)):
            w = f"{where}: decode_step[{i}]"
            ms, dense = _number(e, "ms", w, optional=True), _number(e, "dense_ms", w, optional=True)
            steps.append(StepPoint(_number(e, "batch", w, integer=True), _number(e, "context", w, integer=True),
                                   None if ms is None else float(ms), None if dense is None else float(dense)))
        _unique([(s.batch, s.context) for s in steps], "decode_step (batch, context)", where)
        memory = _number(d, "memory_gib", where, optional=True)
        copy = _number(d, "copy_gbs", where, optional=True)
        return cls(
            gpu=_string(d, "gpu", where), gpu_slug=_string(d, "gpu_slug", where), shape=_string(d, "shape", where),
            dtype=_string(d, "dtype", where), block_size=_number(d, "block_size", where, integer=True),
            attention=tuple(sorted(attention, key=lambda a: a.sm_share)),
            prefill=tuple(sorted(prefill, key=lambda p: (p.sm_share, p.prompt_len))),
            prefill_loaded=tuple(sorted(loaded, key=lambda p: (p.sm_share, p.prompt_len))),
            decode_step=tuple(sorted(steps, key=lambda s: (s.context, s.batch))),
            num_sms=_number(d, "num_sms", where, integer=True, optional=True),
            memory_gib=None if memory is None else float(memory),
            date=_string(d, "date", where, optional=True), torch=_string(d, "torch", where, optional=True),
            triton=_string(d, "triton", where, optional=True), copy_gbs=None if copy is None else float(copy),
            source=source,
        )

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ProfileError(f"{path}: not valid JSON: {e}") from None
        return cls.from_dict(data, str(path))

    # --- the profiled curves ---

    def attention_gbs(self, share: float) -> float:
        """Decode-attention bandwidth (GB/s) at an SM share (%)."""
        if not 0 < share <= 100:
            raise ValueError(f"SM share must be in (0, 100], got {share}")
        xs = [a.sm_share for a in self.attention]
        ys = [a.gbs for a in self.attention]
        if share < xs[0]:
            return ys[0] * share / xs[0]  # no SMs, no bandwidth
        return _interp(xs, ys, share, extend_high=False)

    def _prefill_curve(self, share: int, loaded: bool = False) -> tuple[list[int], list[float]]:
        pts = [p for p in (self.prefill_loaded if loaded else self.prefill) if p.sm_share == share]
        return [p.prompt_len for p in pts], [p.ms for p in pts]

    def prefill_shares(self, loaded: bool = False) -> list[int]:
        return sorted({p.sm_share for p in (self.prefill_loaded if loaded else self.prefill)})

    def prefill_ms(self, share: float, prompt_len: int, loaded: bool = False) -> float:
        """Latency (ms) of prefilling one prompt of ``prompt_len`` tokens at an SM share (%), alone on
        the GPU or (``loaded``) beside an attention load at the rest of the SMs."""
        shares = self.prefill_shares(loaded)
        if not shares:
            raise ValueError(f"{self.source}: no prefill figures" + (" beside an attention load" if loaded else ""))
        at = {s: _interp(*self._prefill_curve(s, loaded), prompt_len, extend_high=True) for s in shares}
        return _interp(shares, [at[s] for s in shares], share, extend_high=False)

    def _step_rows(self, field: str) -> dict[int, tuple[list[int], list[float]]]:
        """context -> (batches, values) of the decode-step rows where ``field`` was measured."""
        out: dict[int, tuple[list[int], list[float]]] = {}
        for s in self.decode_step:  # sorted by (context, batch)
            v = getattr(s, field)
            if v is not None:
                xs, ys = out.setdefault(s.context, ([], []))
                xs.append(s.batch)
                ys.append(v)
        return out

    def step_ms(self, batch: float, context: float) -> float:
        """The all-local decode step (ms) of ``batch`` requests at ``context`` tokens each."""
        rows = self._step_rows("ms")
        if not rows:
            raise ValueError(f"{self.source}: no decode-step figures")
        contexts = sorted(rows)
        at = [_interp(*rows[c], batch, extend_high=True) for c in contexts]
        return _interp(contexts, at, context, extend_high=True)

    def dense_ms(self, batch: float) -> float:
        """The decode step without attention (ms) at ``batch`` (averaged over profiled contexts)."""
        by_batch: dict[int, list[float]] = {}
        for s in self.decode_step:
            if s.dense_ms is not None:
                by_batch.setdefault(s.batch, []).append(s.dense_ms)
        if not by_batch:
            raise ValueError(f"{self.source}: no dense decode-step figures")
        xs = sorted(by_batch)
        return _interp(xs, [sum(by_batch[b]) / len(by_batch[b]) for b in xs], batch, extend_high=True)

    # --- the paper's rules ---

    def smallest_prefill_share(self, ttft_slo_ms: float, prompt_len: int) -> int | None:
        """The smallest profiled share whose prefill of one ``prompt_len``-token prompt meets the SLO."""
        for share in self.prefill_shares():
            if _interp(*self._prefill_curve(share), prompt_len, extend_high=True) <= ttft_slo_ms:
                return share
        return None

    @property
    def load_rule_beside_executor(self) -> bool:
        """Whether the prompt-load rule reads figures of prefill beside an attention load."""
        return bool(self.prefill_loaded)

    @property
    def prefill_max_load(self) -> float:
        """The busy fraction the prompt-load rule allows with the figures it reads."""
        return PREFILL_MAX_LOAD_BESIDE_EXECUTOR if self.load_rule_beside_executor else PREFILL_MAX_LOAD

    def prefill_load(self, share: int, prompt_tokens_per_s: float, pass_tokens: int) -> float:
        """Fraction of time prefill is busy at ``share`` % with ``prompt_tokens_per_s`` prompt tokens
        arriving, each token costing what it costs in a ``pass_tokens``-token pass (beside an
        attention load when the profile has those figures)."""
        loaded = self.load_rule_beside_executor
        return prompt_tokens_per_s * self.prefill_ms(share, pass_tokens, loaded) / pass_tokens / 1000.0

    def smallest_prefill_share_for_load(self, prompt_tokens_per_s: float, pass_tokens: int,
                                        max_load: float | None = None) -> int | None:
        """The smallest profiled share at which prefill is busy at most ``max_load`` of the time
        (default `prefill_max_load`)."""
        limit = self.prefill_max_load if max_load is None else max_load
        for share in self.prefill_shares(self.load_rule_beside_executor):
            if self.prefill_load(share, prompt_tokens_per_s, pass_tokens) <= limit:
                return share
        return None

    def largest_batches(self, tpot_slo_ms: float, context: float) -> tuple[_Found, _Found]:
        """(B_TPOT, capped), (B_max, capped): the largest whole batches whose all-local step at
        ``context`` / whose dense part meets the TPOT SLO, within the profiled batches; capped: the
        curve still meets the SLO at the largest profiled batch."""
        batches = sorted({s.batch for s in self.decode_step if s.ms is not None})
        dense_batches = sorted({s.batch for s in self.decode_step if s.dense_ms is not None})
        b_tpot = b_max = (None, False)
        if batches:
            b_tpot = _largest_within(batches, [self.step_ms(b, context) for b in batches], tpot_slo_ms)
        if dense_batches:
            b_max = _largest_within(dense_batches, [self.dense_ms(b) for b in dense_batches], tpot_slo_ms)

        def whole(found: tuple[float | None, bool]) -> tuple[int | None, bool]:
            x, capped = found
            return (None if x is None else math.floor(x + 1e-9)), capped

        return whole(b_tpot), whole(b_max)

    def offload_bound(self, executor_share: float, hbm_p: float, hbm_d: float, tpot_slo_ms: float | None,
                      context: float) -> OffloadBound:
        """OB = min(OB_mem, OB_comp) (definitions in the module docstring).

        ``hbm_p``, ``hbm_d``: KV capacities of the executor's and decode's pools (same unit);
        ``context``: the reference context of the decode-step curve.
        """
        bw_p, bw_d = self.attention_gbs(executor_share), self.attention_gbs(100)
        mem = ob_mem(hbm_p, hbm_d, bw_p, bw_d)
        hbm_ratio, bw_ratio = hbm_p / hbm_d, bw_p / bw_d
        note = (f"OB_mem = min(HBM_p/HBM_d = {hbm_ratio:.3f}, BW_p/BW_d = {bw_p:.0f}/{bw_d:.0f} GB/s "
                f"at {executor_share:g}%/100% = {bw_ratio:.3f}) = {mem:.3f}")
        comp = b_tpot = b_max = None
        if tpot_slo_ms is None:
            why = "no TPOT SLO"
        elif not self._step_rows("ms") or not any(s.dense_ms is not None for s in self.decode_step):
            why = "no decode-step figures in the profile"
        else:
            (b_tpot, tpot_capped), (b_max, max_capped) = self.largest_batches(tpot_slo_ms, context)
            if b_tpot is None:
                why = f"the all-local step misses the TPOT SLO {tpot_slo_ms:g} ms at every profiled batch"
            elif tpot_capped:
                why = (f"the all-local step meets the TPOT SLO {tpot_slo_ms:g} ms up to the largest profiled "
                       f"batch {b_tpot}")
            else:
                b_max = max(b_max or 0, b_tpot)  # the dense part alone is never slower (noise aside)
                comp = (b_max - b_tpot) / b_tpot
                why = (f"OB_comp = (B_max {b_max} - B_TPOT {b_tpot}) / B_TPOT = {comp:.3f} at TPOT SLO "
                       f"{tpot_slo_ms:g} ms, context {context:g}")
                if max_capped:
                    why += " (a lower bound: the dense part meets the SLO at the largest profiled batch)"
        if comp is None:
            note += f"; OB_comp does not bind ({why})"
        else:
            note += f"; {why}"
        value = mem if comp is None else min(mem, comp)
        return OffloadBound(value, mem, comp, hbm_ratio, bw_ratio, b_tpot, b_max, f"OB = {value:.3f}: {note}")


def profile_dirs() -> list[Path]:
    """Where profiles are looked for, first match wins: $ADRENALINE_PROFILE_DIR, then the package's."""
    dirs = [Path(os.environ[PROFILE_DIR_ENV])] if os.environ.get(PROFILE_DIR_ENV) else []
    return [*dirs, PACKAGE_PROFILE_DIR]


def find(gpu_slug: str, shape: str, dirs: Iterable[Path] | None = None) -> Profile | None:
    """The profile ``<dir>/<gpu_slug>/<shape>.json`` of the first directory that has one (see
    `profile_dirs`), or None. A file that is there but invalid is an error, not a miss."""
    for d in profile_dirs() if dirs is None else dirs:
        path = Path(d) / gpu_slug / f"{shape}.json"
        if path.is_file():
            return Profile.load(path)
    return None


# --- What the launcher resolves ------------------------------------------------------------------

@dataclass(frozen=True)
class GpuInfo:
    """One GPU as torch sees it (indices as in CUDA_VISIBLE_DEVICES order)."""

    index: int
    name: str
    free_bytes: int
    total_bytes: int


_PROBE = """
import json, sys, torch
out = {}
for i in map(int, sys.argv[1:]):
    free, total = torch.cuda.mem_get_info(i)
    out[i] = {"name": torch.cuda.get_device_name(i), "free": free, "total": total}
print(json.dumps(out))
"""


def probe_gpus(indices: Iterable[int], python: str = sys.executable) -> dict[int, GpuInfo]:
    """Name and memory (torch.cuda.mem_get_info) of GPUs, read in a child process, so that the
    launcher itself never holds a CUDA context (it starts the MPS daemon afterwards)."""
    r = subprocess.run([python, "-c", _PROBE, *map(str, sorted(set(indices)))], capture_output=True, text=True,
                       timeout=300, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"could not read the GPUs' memory: {r.stderr.strip()[-2000:]}")
    data = json.loads(r.stdout.strip().splitlines()[-1])
    return {int(k): GpuInfo(int(k), v["name"], int(v["free"]), int(v["total"])) for k, v in data.items()}


def measure_gpus(indices: Iterable[int]) -> dict[int, GpuInfo]:
    """`probe_gpus` in this process (for `adrenaline generate`, which allocates the pools itself)."""
    import torch

    out = {}
    for i in sorted(set(indices)):
        free, total = torch.cuda.mem_get_info(i)
        out[i] = GpuInfo(i, torch.cuda.get_device_name(i), free, total)
    return out


def reference_context(engine: EngineConfig) -> int:
    """Context at which the decode-step curve is read for OB_comp (see the module docstring)."""
    return max(1, engine.max_model_len // 2)


def prefill_pass_tokens(engine: EngineConfig) -> int:
    """Prompt length at which the TTFT SLO picks the prefill share: the longest prefill pass."""
    return min(engine.max_prefill_tokens, engine.max_model_len)


def resolve_sm_shares(engine: EngineConfig, profile: Profile | None) -> tuple[int, int, str]:
    """(prefill share, executor share, why): the MPS percentages of prefill and the executor.

    Given both: as given. Given one: the other gets the rest of 100. Neither: with a profile and a
    TTFT SLO and/or a planned prompt load (``prompt_tokens_per_s``), prefill gets the larger of the
    smallest profiled share that meets the SLO for a prompt of `prefill_pass_tokens` tokens and the
    smallest that keeps prefill busy at most `Profile.prefill_max_load` of the time at that load (at most
    100 − MIN_EXECUTOR_SHARE), and the executor the rest; otherwise the defaults (40/60,
    config.DEFAULT_*_SM_SHARE).
    """
    p, x = engine.prefill_sm_share, engine.executor_sm_share
    if p is not None and x is not None:
        return p, x, f"SM shares given: prefill {p}%, executor {x}%"
    if p is not None or x is not None:
        given = p if p is not None else x
        if given >= 100:
            role = "prefill" if p is not None else "executor"
            raise ValueError(f"--{role}-sm-share 100 leaves no SMs for the other role: give both shares to "
                             "let their MPS limits overlap")
        p, x = (p, 100 - p) if p is not None else (100 - x, x)
        return p, x, f"SM shares: prefill {p}%, executor {x}% (one given, the other the rest of 100)"
    default = DEFAULT_PREFILL_SM_SHARE, DEFAULT_EXECUTOR_SM_SHARE
    slo, load = engine.ttft_slo_ms, engine.prompt_tokens_per_s
    if slo is None and load is None:
        return (*default, f"SM shares: prefill {default[0]}%, executor {default[1]}% (defaults: no --ttft-slo "
                          "and no --prompt-tokens-per-s)")
    if profile is None or not profile.prefill:
        return (*default, f"SM shares: prefill {default[0]}%, executor {default[1]}% (defaults: no profile with "
                          "prefill figures for this GPU and model)")
    tokens = prefill_pass_tokens(engine)
    cap = 100 - MIN_EXECUTOR_SHARE
    reasons, shares = [], []
    if slo is not None:
        share = profile.smallest_prefill_share(slo, tokens)
        shares.append(cap if share is None else share)
        reasons.append(f"TTFT SLO {slo:g} ms for a {tokens}-token prefill: "
                       + ("no profiled share meets it: all but the executor's minimum" if share is None else
                          f"{share}% ({profile.prefill_ms(share, tokens):.1f} ms)"))
    if load is not None:
        share = profile.smallest_prefill_share_for_load(load, tokens)
        shares.append(cap if share is None else share)
        limit = profile.prefill_max_load
        beside = " beside the executor" if profile.load_rule_beside_executor else " (profiled alone)"
        reasons.append(f"{load:g} prompt tokens/s: " + (
            f"no profiled share keeps prefill{beside} busy at most {limit:g} of the time: all but the "
            "executor's minimum" if share is None else
            f"{share}% keeps prefill{beside} busy {profile.prefill_load(share, load, tokens):.2f} of the time "
            f"(at most {limit:g})"))
    share = min(max(shares), cap)
    capped = " (capped: the executor keeps its minimum)" if max(shares) > cap else ""
    asks = reasons[0] if len(reasons) == 1 else "the larger of what each asks: " + "; ".join(reasons)
    return share, 100 - share, (f"SM shares: prefill {share}%{capped}, executor {100 - share}% (smallest profiled "
                                f"shares: {asks}; profile {profile.source})")


def resolve_offload_bound(engine: EngineConfig, profile: Profile | None, executor_share: float) -> tuple[float, str]:
    """(OB, why): as given by --offload-bound, else from the profile, else OB_mem of the pools."""
    if engine.offload_bound is not None:
        return engine.offload_bound, f"offload bound OB = {engine.offload_bound:g} (given by --offload-bound)"
    if engine.num_decode_blocks is None or engine.num_executor_blocks is None:
        raise ValueError("the pools' sizes must be resolved before the offload bound")
    hbm_p, hbm_d = engine.num_executor_blocks, engine.num_decode_blocks
    if profile is None:
        ob = ob_mem(hbm_p, hbm_d)
        return ob, (f"offload bound OB = OB_mem = HBM_p/HBM_d = {hbm_p}/{hbm_d} blocks = {ob:.3f} (no profile for "
                    f"this {'GPU and model' if engine.device == 'cuda' else 'device (cpu)'}: bandwidth and compute "
                    "bounds unknown)")
    bound = profile.offload_bound(executor_share, hbm_p, hbm_d, engine.tpot_slo_ms, reference_context(engine))
    return bound.value, f"offload bound {bound.note} (profile {profile.source})"


def offload_bound_in_force(engine: EngineConfig) -> tuple[float, str]:
    """The OB a role applies: engine.json's (resolved by the launcher), else OB_mem of the pools."""
    if engine.offload_bound is not None:
        why = next((n for n in engine.extra.get("resolution", []) if n.startswith("offload bound")),
                   f"offload bound OB = {engine.offload_bound:g} (from engine.json)")
        return engine.offload_bound, why
    return resolve_offload_bound(engine, None, engine.executor_sm_share or DEFAULT_EXECUTOR_SM_SHARE)


def executor_fraction(engine: EngineConfig, executor_share: int) -> float:
    """The executor pool's part of the KV memory when one GPU holds both pools: none with
    ``never``, nearly all with ``always``, R with ``ratio:R``, the executor's SM share with
    ``auto`` (so OB_mem's capacity term equals the compute split)."""
    if engine.offload == "never":
        return 0.0
    if engine.offload == "always":
        return 1.0
    if engine.offload.startswith("ratio:"):
        return float(engine.offload.split(":", 1)[1])
    return executor_share / 100


def resolve_engine(engine: EngineConfig, model: ModelConfig | None = None, gpus: Mapping[int, GpuInfo] | None = None,
                   one_process: bool = False, dirs: Iterable[Path] | None = None) -> EngineConfig:
    """Fill what engine.json leaves open: SM shares, pool sizes (cuda), the offload bound.

    ``model`` and ``gpus`` (from `probe_gpus`) are needed on cuda; the profile is found by the
    prefill GPU's name and the model's shape. Every decision is explained, one line each, in
    ``extra["resolution"]`` (the launcher prints them, the scheduler logs the OB line). An engine
    already resolved is returned as it is.
    """
    from adrenaline_py.kv_cache import GpuMemory, plan_pool_blocks

    if "resolution" in engine.extra:
        return engine
    notes: list[str] = []
    profile = None
    if needs_gpus(engine):
        if gpus is None or model is None:
            raise ValueError("resolving a cuda engine needs the model's shape and the GPUs' memory")
        if _needs_profile(engine):
            profile = _find_profile(engine, model, gpus, dirs, notes)
    prefill_share, executor_share, why = resolve_sm_shares(engine, profile)
    notes.append(why)
    if engine.num_decode_blocks is None or engine.num_executor_blocks is None:  # cuda only: cpu has its default
        memory = {i: GpuMemory(g.free_bytes, g.total_bytes) for i, g in gpus.items()}
        plan = plan_pool_blocks(model, engine, memory, executor_fraction(engine, executor_share), one_process)
        notes.extend(plan.notes)
        notes.append(f"KV pools: decode {plan.num_decode_blocks} blocks, executor {plan.num_executor_blocks} blocks "
                     f"(from --gpu-memory-utilization {engine.gpu_memory_utilization:g})")
        engine = replace(engine, num_decode_blocks=plan.num_decode_blocks, num_executor_blocks=plan.num_executor_blocks)
    bound, why = resolve_offload_bound(engine, profile, executor_share)
    notes.append(why)
    return replace(engine, prefill_sm_share=prefill_share, executor_sm_share=executor_share, offload_bound=bound,
                   extra={**engine.extra, "resolution": notes})


def _needs_profile(engine: EngineConfig) -> bool:
    shares_open = engine.prefill_sm_share is None and engine.executor_sm_share is None
    return engine.offload_bound is None or (
        shares_open and (engine.ttft_slo_ms is not None or engine.prompt_tokens_per_s is not None))


def needs_gpus(engine: EngineConfig) -> bool:
    """Whether `resolve_engine` needs the model and `probe_gpus` (cuda, with something left open)."""
    pools_open = engine.num_decode_blocks is None or engine.num_executor_blocks is None
    return engine.device == "cuda" and "resolution" not in engine.extra and (pools_open or _needs_profile(engine))


def _find_profile(engine: EngineConfig, model: ModelConfig, gpus: Mapping[int, GpuInfo],
                  dirs: Iterable[Path] | None, notes: list[str]) -> Profile | None:
    p, d = gpus[engine.prefill_gpu], gpus[engine.decode_gpu]
    slug, shape = gpu_slug(p.name), shape_name(model)
    if gpu_slug(d.name) != slug:
        notes.append(f"no profile used: prefill GPU {p.name} and decode GPU {d.name} differ")
        return None
    if shape is None:
        notes.append("no profile used: the model's shape is none of the profiled shapes "
                     f"({', '.join(n for n in NAMED_SHAPES if n != 'tiny')})")
        return None
    profile = find(slug, shape, dirs)
    if profile is None:
        searched = ", ".join(str(Path(x) / slug / f"{shape}.json") for x in (profile_dirs() if dirs is None else dirs))
        notes.append(f"no profile for {slug}/{shape} (looked for {searched})")
        return None
    if profile.dtype != engine.dtype or profile.block_size != engine.block_size:
        notes.append(f"profile {profile.source} not used: measured with {profile.dtype}, block size "
                     f"{profile.block_size}; this server runs {engine.dtype}, block size {engine.block_size}")
        return None
    notes.append(f"profile {profile.source} ({profile.gpu}, {profile.shape}, {profile.date or 'undated'})")
    return profile
