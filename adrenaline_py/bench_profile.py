"""`adrenaline profile`: the offline profile of one GPU and model shape (design.md §1, the paper's
resource-efficient prefill colocation and load-aware offloading).

The attention executor and prefill share the prefill GPU under CUDA MPS, each capped at a share of
the SMs. What the launcher and the ``auto`` policy need to know about that GPU is measured here:

- **decode-attention bandwidth against the executor's SM share** (10-100 %): the Triton paged kernel
  on random paged K/V, in a process of its own started with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``.
  At each share the kernel's launch configurations are swept on one case and the best one is then
  timed on every case; the default configuration is timed next to it (the sweep is how the kernel's
  few-SM configuration was chosen);
- **prefill latency against the SM share and the prompt length**: one prompt through every layer
  (dummy weights of the real shape), its K/V stored into a pool, the LM head on its last row;
  alone on the GPU (``prefill``), and again beside an attention load (``prefill_loaded``): another
  MPS client at the rest of the SMs (100 − share %) running the decode kernel without pause, as
  the executor does when served under load (served, prefill beside a working executor took about
  2 × its time alone; docs/performance.md, tenth run);
- **decode step against the batch** at 100 % (decode owns its GPU): the all-local step (CUDA graphs,
  host to host, as ``adrenaline bench engine``) at a reference context, and the same step at a
  16-token context, which is the step without attention (``dense_ms``): the paper's B_max is the
  largest batch whose dense part meets the TPOT SLO once attention is offloaded.

One JSON per shape, ``<out>/<gpu_slug>/<shape>.json``, in the schema `adrenaline_py/profile.py`
reads; profiles shipped with the repository live in ``adrenaline_py/profiles/``. A markdown report
with every figure is written next to them.

    adrenaline profile --shapes llama-2-7b llama-3.1-8b --out $OUT/profiles
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHARES = (10, 20, 30, 40, 50, 60, 80, 100)
PROMPT_LENS = (128, 512, 1024, 2048, 4096)
STEP_BATCHES = (1, 16, 32, 64, 96, 128, 192, 256, 384, 512)
STEP_CONTEXT = 1024
DENSE_CONTEXT = 16
ATTENTION_CASES = ((64, 1024), (128, 2048), (256, 1024), (64, 4096))
TUNE_CASE = (128, 2048)
PAGE = 16
# the attention load beside prefill: the profiled shape's heads, one layer's K/V of 128 requests ×
# 2048 tokens (4.3 GB for llama-2-7b, 1.1 GB for llama-3.1-8b: beyond L2), the decode kernel
# launched without pause
LOAD_CASE = (128, 2048)
LOAD_READY_S = 300  # the load's start (a Triton compile with an empty cache) before the profile gives up


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (the directory of a GPU's profiles)."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def _bench(fn, warmup: int, rep: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events, after warm-up)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _configs():
    from adrenaline_py.attention.triton_decode import DecodeKernelConfig

    for block_n, warps, stages, split in itertools.product((32, 64), (4, 8), (2, 3, 4), (False, True)):
        # split: 512-token partitions (more, shorter programs plus a merge) instead of one per sequence
        yield DecodeKernelConfig(partition=512 if split else 1 << 20, block_n=block_n, num_warps=warps,
                                 num_stages=stages, use_dot=True)


def _attention(shape: str, dtype, device) -> dict:
    """Best and default decode-attention bandwidth (GB/s) of one shape in this process's SM share."""
    import torch

    from adrenaline_py.attention.triton_decode import default_config, paged_decode_attention_triton, sm_count
    from adrenaline_py.loader import load_checkpoint

    cfg = load_checkpoint(f"dummy:{shape}").config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    elem = torch.finfo(dtype).bits // 8
    num_blocks = max(b * math.ceil(c / PAGE) for b, c in ATTENTION_CASES) + 1
    k = torch.randn(num_blocks, PAGE, hkv, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    gen = torch.Generator(device=device).manual_seed(0)

    def case(batch: int, ctx: int):
        nb = math.ceil(ctx / PAGE)
        tables = torch.randperm(num_blocks, generator=gen, device=device)[: batch * nb].view(batch, nb)
        lens = torch.full((batch,), ctx, dtype=torch.long, device=device)
        q = torch.randn(batch, hq, d, generator=gen, device=device, dtype=dtype)
        return q, tables, lens, batch * ctx * hkv * d * 2 * elem + 2 * batch * hq * d * elem

    def gbs(c, ctx: int, config) -> float:
        q, tables, lens, nbytes = c
        ms = _bench(lambda: paged_decode_attention_triton(q, k, v, tables, lens, ctx, config=config), 10, 60)
        return nbytes / ms / 1e6

    tune = case(*TUNE_CASE)
    sweep = []
    for config in _configs():
        try:
            sweep.append((gbs(tune, TUNE_CASE[1], config), config))
        except Exception as e:  # noqa: BLE001 - a configuration the compiler or the GPU refuses
            print(f"  {shape} {config}: {type(e).__name__}", flush=True)
    sweep.sort(key=lambda x: -x[0])
    best = sweep[0][1]
    rows = []
    for batch, ctx in ATTENTION_CASES:
        c = case(batch, ctx)
        default = default_config(batch, hkv, hq // hkv, d, PAGE, ctx, sm_count(device))
        rows.append({"batch": batch, "context": ctx, "best_gbs": gbs(c, ctx, best), "default_gbs": gbs(c, ctx, default),
                     "default_config": default.__dict__})
    return {
        "best_config": best.__dict__,
        "sweep": [{"gbs": g, **c.__dict__} for g, c in sweep],
        "cases": rows,
        "gbs": statistics.median(r["best_gbs"] for r in rows),
        "default_gbs": statistics.median(r["default_gbs"] for r in rows),
    }


def _prefill(shape: str, dtype, device, prompt_lens) -> list[dict]:
    """Latency of one prompt through prefill (dummy weights), per prompt length."""
    import torch

    from adrenaline_py.attention import KVWrite, PrefillMetadata, make_attention_backend
    from adrenaline_py.loader import build_model, load_checkpoint

    ckpt = load_checkpoint(f"dummy:{shape}")
    cfg = ckpt.config
    model = build_model(ckpt, dtype, device, max_positions=max(prompt_lens) + 16)
    backend = make_attention_backend(device)
    n_max = max(prompt_lens)
    kv = torch.zeros(cfg.num_hidden_layers, 2, math.ceil(n_max / PAGE) + 1, PAGE, cfg.num_key_value_heads,
                     cfg.head_dim, dtype=dtype, device=device)
    out = []
    for n in prompt_lens:
        ids = torch.randint(0, cfg.vocab_size, (n,), device=device)
        pos = torch.arange(n, device=device)
        slots = torch.arange(PAGE, PAGE + n, device=device)  # block 0 spare, as the engine keeps it
        meta = PrefillMetadata(cu_seqlens=[0, n], kv_writes=[KVWrite(kv, pos, slots)])

        def run(ids=ids, pos=pos, meta=meta, model=model):
            hidden = model(ids, pos, backend, meta)
            return model.compute_logits(hidden[-1:]).argmax(-1)

        run()
        ms = _bench(run, 5, 100)
        out.append({"prompt_len": n, "ms": ms})
    del model, kv
    torch.cuda.empty_cache()
    return out


def _decode_steps(shape: str, dtype, device, batches) -> list[dict]:
    import torch

    from adrenaline_py.bench import bench_decode_step, copy_bandwidth_gbs
    from adrenaline_py.loader import build_model, load_checkpoint

    copy_gbs = copy_bandwidth_gbs(device)
    model = build_model(load_checkpoint(f"dummy:{shape}"), dtype, device, max_positions=STEP_CONTEXT + 16)
    rows = []
    for batch in batches:
        full = bench_decode_step(shape, model, dtype, device, batch, STEP_CONTEXT, copy_gbs, use_graphs=True)
        torch.cuda.empty_cache()
        dense = bench_decode_step(shape, model, dtype, device, batch, DENSE_CONTEXT, copy_gbs, use_graphs=True)
        torch.cuda.empty_cache()
        rows.append({"batch": batch, "context": STEP_CONTEXT, "ms": full.step_ms, "dense_ms": dense.step_ms,
                     "roofline_ms": full.roofline_ms, "note": full.note})
        print(f"  {shape} step batch {batch}: {full.step_ms} ms, dense {dense.step_ms} ms", flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


def attention_load_main(shape: str) -> None:
    """The attention load beside prefill (its own MPS client; its share set by the caller): the decode
    kernel on random paged K/V with ``shape``'s heads, launched without pause until the process is
    terminated or its parent exits. Prints ``ready`` once the kernel has run."""
    import torch

    from adrenaline_py.attention.triton_decode import paged_decode_attention_triton
    from adrenaline_py.loader import load_checkpoint

    parent = os.getppid()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    cfg = load_checkpoint(f"dummy:{shape}", with_weights=False).config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    batch, ctx = LOAD_CASE
    nb = math.ceil(ctx / PAGE)
    gen = torch.Generator(device=device).manual_seed(3)
    k = torch.randn(batch * nb + 1, PAGE, hkv, d, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(batch * nb + 1, PAGE, hkv, d, device=device, dtype=torch.bfloat16, generator=gen)
    tables = (torch.randperm(batch * nb, device=device, generator=gen) + 1).view(batch, nb)
    lens = torch.full((batch,), ctx, dtype=torch.int64, device=device)
    q = torch.randn(batch, hq, d, device=device, dtype=torch.bfloat16, generator=gen)
    out = torch.empty_like(q)
    paged_decode_attention_triton(q, k, v, tables, lens, ctx, out=out)
    torch.cuda.synchronize(device)
    print("ready", flush=True)
    while os.getppid() == parent:  # a profiling child killed hard leaves no load behind
        for _ in range(20):
            paged_decode_attention_triton(q, k, v, tables, lens, ctx, out=out)
        torch.cuda.synchronize(device)  # a bounded queue: the load stops soon after it is terminated


def _with_attention_load(share: int, shape: str, fn):
    """``fn()`` while an attention load of ``shape`` runs at the rest of the SMs (100 − share %)."""
    import select

    env = {**os.environ, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(100 - share)}
    code = f"from adrenaline_py.bench_profile import attention_load_main; attention_load_main({shape!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], LOAD_READY_S)
        if not ready or proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the attention load did not start within {LOAD_READY_S} s (exit {proc.poll()})")
        return fn()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()


def child_main(share: int, shapes: list[str], prompt_lens, batches, out_path: str, attention: bool = True,
               beside_load: bool = True) -> None:
    """One MPS client at one SM share (the variable was set by the parent before CUDA started).
    ``attention``: also the decode-attention figures; ``beside_load``: also prefill beside an
    attention load at the rest of the SMs (below 100 %)."""
    import torch
    import triton

    from adrenaline_py.attention.triton_decode import sm_count

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dtype = torch.bfloat16
    props = torch.cuda.get_device_properties(device)
    res: dict = {"share": share, "gpu": props.name, "num_sms": props.multi_processor_count,
                 "effective_sms": sm_count(device), "memory_gib": props.total_memory / 2**30,
                 "torch": torch.__version__, "triton": triton.__version__, "shapes": {}}
    for shape in shapes:
        r: dict = {}
        if attention:
            r["attention"] = _attention(shape, dtype, device)
            print(f"share {share}% {shape}: attention {r['attention']['gbs']:.0f} GB/s (default config "
                  f"{r['attention']['default_gbs']:.0f}), best {r['attention']['best_config']}", flush=True)
            torch.cuda.empty_cache()
        r["prefill"] = _prefill(shape, dtype, device, prompt_lens)
        print(f"share {share}% {shape}: prefill " + ", ".join(f"{p['prompt_len']}: {p['ms']:.1f} ms"
                                                             for p in r["prefill"]), flush=True)
        if beside_load and share < 100:
            try:
                r["prefill_loaded"] = _with_attention_load(
                    share, shape, lambda s=shape: _prefill(s, dtype, device, prompt_lens))
                print(f"share {share}% {shape}: prefill beside the attention load " + ", ".join(
                    f"{p['prompt_len']}: {p['ms']:.1f} ms" for p in r["prefill_loaded"]), flush=True)
            except Exception as e:  # the figures measured so far stay; the note says what is missing
                r["prefill_loaded_error"] = f"{type(e).__name__}: {e}"
                print(f"share {share}% {shape}: prefill beside the attention load failed: {e}", flush=True)
                torch.cuda.empty_cache()
        if batches:
            r["decode_step"] = _decode_steps(shape, dtype, device, batches)
        res["shapes"][shape] = r
    if share == 100:
        from adrenaline_py.bench import copy_bandwidth_gbs

        res["copy_gbs"] = copy_bandwidth_gbs(device)
    Path(out_path).write_text(json.dumps(res))


def _profile_of(shape: str, runs: list[dict]) -> dict:
    full = next(r for r in runs if r["share"] == max(x["share"] for x in runs))
    att = [{"sm_share": r["share"], "gbs": r["shapes"][shape]["attention"]["gbs"],
            "default_gbs": r["shapes"][shape]["attention"]["default_gbs"],
            "config": r["shapes"][shape]["attention"]["best_config"]}
           for r in runs if "attention" in r["shapes"].get(shape, {})]  # prefill-only shares have none
    prefill = [{"sm_share": r["share"], **p} for r in runs for p in r["shapes"][shape]["prefill"]]
    loaded = [{"sm_share": r["share"], **p} for r in runs for p in r["shapes"][shape].get("prefill_loaded", [])]
    return {
        "version": 1, "gpu": full["gpu"], "gpu_slug": gpu_slug(full["gpu"]), "num_sms": full["num_sms"],
        "memory_gib": round(full["memory_gib"], 1), "shape": shape, "dtype": "bfloat16", "block_size": PAGE,
        "date": datetime.date.today().isoformat(), "torch": full["torch"], "triton": full["triton"],
        "copy_gbs": full.get("copy_gbs"),
        "attention": att, "prefill": prefill, "prefill_loaded": loaded,
        "decode_step": full["shapes"][shape].get("decode_step", []),
    }


def report(profiles: list[dict], runs: list[dict]) -> str:
    lines = [f"# adrenaline profile — {profiles[0]['gpu']}, {profiles[0]['date']}", "",
             f"torch {profiles[0]['torch']}, triton {profiles[0]['triton']}; bf16; page {PAGE}; dummy weights; "
             f"copy bandwidth **{profiles[0]['copy_gbs']:.0f} GB/s**. SMs reported by torch at each share: "
             + ", ".join(f"{r['share']}%: {r['num_sms']}" for r in runs) + "."]
    for p in profiles:
        copy = p["copy_gbs"]
        lines += ["", f"## {p['shape']}: decode attention against the executor's SM share", "",
                  "Median over (batch, context) " + ", ".join(f"{b}×{c}" for b, c in ATTENTION_CASES)
                  + f"; best of the launch-configuration sweep on {TUNE_CASE[0]}×{TUNE_CASE[1]}.", "",
                  "| SM share | best GB/s | of copy | default config GB/s | of copy | best configuration |",
                  "|---:|---:|---:|---:|---:|---|"]
        for a in p["attention"]:
            c = a["config"]
            split = "512-token partitions" if c["partition"] <= 4096 else "one partition"
            lines.append(f"| {a['sm_share']} % | {a['gbs']:.0f} | {a['gbs'] / copy:.2f} | {a['default_gbs']:.0f} | "
                         f"{a['default_gbs'] / copy:.2f} | tile {c['block_n']}, {c['num_warps']} warps, "
                         f"{c['num_stages']} stages, {split} |")
        lens = sorted({x["prompt_len"] for x in p["prefill"]})
        lines += ["", f"## {p['shape']}: prefill latency (ms, one prompt) against the SM share", "",
                  "| SM share | " + " | ".join(f"{n} tokens" for n in lens) + " |",
                  "|---:|" + "---:|" * len(lens)]
        for share in sorted({x["sm_share"] for x in p["prefill"]}):
            ms = {x["prompt_len"]: x["ms"] for x in p["prefill"] if x["sm_share"] == share}
            lines.append(f"| {share} % | " + " | ".join(f"{ms[n]:.1f}" if n in ms else "—" for n in lens) + " |")
        if p["prefill_loaded"]:
            lens = sorted({x["prompt_len"] for x in p["prefill_loaded"]})
            lines += ["", f"## {p['shape']}: prefill latency (ms, one prompt) beside an attention load at the rest "
                      "of the SMs", "",
                      "| SM share | " + " | ".join(f"{n} tokens" for n in lens) + " | beside / alone (longest) |",
                      "|---:|" + "---:|" * (len(lens) + 1)]
            alone = {(x["sm_share"], x["prompt_len"]): x["ms"] for x in p["prefill"]}
            for share in sorted({x["sm_share"] for x in p["prefill_loaded"]}):
                ms = {x["prompt_len"]: x["ms"] for x in p["prefill_loaded"] if x["sm_share"] == share}
                solo = alone.get((share, lens[-1]))
                ratio = f"{ms[lens[-1]] / solo:.2f} ×" if solo and lens[-1] in ms else "—"
                lines.append(f"| {share} % | " + " | ".join(f"{ms[n]:.1f}" if n in ms else "—" for n in lens)
                             + f" | {ratio} |")
        if p["decode_step"]:
            lines += ["", f"## {p['shape']}: decode step (all local, 100 %) against the batch", "",
                      f"| batch | step ms (context {STEP_CONTEXT}) | dense ms (context {DENSE_CONTEXT}) "
                      "| roofline ms |",
                      "|---:|---:|---:|---:|"]
            for s in p["decode_step"]:
                step = f"{s['ms']:.2f}" if s["ms"] else s["note"] or "—"
                dense = f"{s['dense_ms']:.2f}" if s["dense_ms"] else "—"
                lines.append(f"| {s['batch']} | {step} | {dense} | {s['roofline_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", nargs="+", default=["llama-2-7b", "llama-3.1-8b"], help="dummy model shapes")
    p.add_argument("--shares", nargs="+", type=int, default=list(SHARES), help="MPS SM percentages")
    p.add_argument("--prompt-lens", nargs="+", type=int, default=list(PROMPT_LENS))
    p.add_argument("--batches", nargs="+", type=int, default=list(STEP_BATCHES), help="decode-step batches (100 %%)")
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--out", default=None, help="directory of the profiles (default: $OUT/profiles, else ./profiles)")
    p.add_argument("--prefill-only", action="store_true",
                   help="measure prefill alone (and beside the attention load) only: no attention figures, no "
                        "decode steps; combine with earlier runs through --merge")
    p.add_argument("--no-attention-load", action="store_true",
                   help="skip prefill beside an attention load at the rest of the SMs")
    p.add_argument("--merge", nargs="+", default=None, metavar="RUNS_JSON",
                   help="no GPU: build the profiles from profile_runs.json files of earlier runs (e.g. shares "
                        "measured in separate calls), or <out>/runs/share*.json files; a later file's figures "
                        "replace an earlier's for the same share and shape, the others are kept")


def main(a: argparse.Namespace) -> int:
    from adrenaline_py.serving.launcher import MPSDaemon

    out = Path(a.out or Path(os.environ.get("OUT", "."), "profiles"))
    out.mkdir(parents=True, exist_ok=True)
    if a.merge:
        loaded = [json.loads(Path(f).read_text()) for f in a.merge]
        return _write(merge_runs([r for x in loaded for r in (x if isinstance(x, list) else [x])]), a.shapes, out)
    # 100 % first: it also measures the copy bandwidth and the decode steps the profile needs
    shares = [100] + sorted(set(a.shares) - {100})
    runs = []
    Path(out, "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="adrenaline-profile-") as tmp:
        daemon = MPSDaemon(Path(tmp))
        daemon.start()
        try:
            for share in shares:
                # each share kept as soon as it is measured; prefill-only runs under names of their own,
                # so that they never replace the full runs they are to be merged with
                path = Path(out, "runs", f"{'prefill-' if a.prefill_only else ''}share{share}.json")
                env = {**os.environ, **daemon.env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(share),
                       "CUDA_VISIBLE_DEVICES": str(a.gpu)}
                code = ("import sys, json; from adrenaline_py.bench_profile import child_main; "
                        "child_main(*json.loads(sys.argv[1]))")
                args = [share, a.shapes, a.prompt_lens, a.batches if share == 100 and not a.prefill_only else [],
                        str(path), not a.prefill_only, not a.no_attention_load]
                proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, check=False)
                if proc.returncode or not path.exists():
                    print(f"share {share}%: the profiling process failed (exit {proc.returncode})", flush=True)
                    continue
                runs.append(json.loads(path.read_text()))
        finally:
            daemon.stop()
    if a.prefill_only:
        Path(out, "prefill_runs.json").write_text(json.dumps(runs, indent=1))
        print(f"prefill only: runs in {out / 'prefill_runs.json'}; build profiles with --merge <earlier "
              "profile_runs.json> <these runs>", flush=True)
        return 0
    Path(out, "profile_runs.json").write_text(json.dumps(runs, indent=1))
    return _write(runs, a.shapes, out)


def merge_runs(runs: list[dict]) -> list[dict]:
    """One run per share: later runs' figures replace earlier ones per (share, shape, figure; prefill
    figures per prompt length), the rest is kept (e.g. prefill re-measured beside an attention load
    over a full earlier profile)."""
    by_share: dict[int, dict] = {}
    for r in runs:
        base = by_share.setdefault(r["share"], {**r, "shapes": {}})
        base.update({k: v for k, v in r.items() if k != "shapes"})
        for shape, figures in r["shapes"].items():
            kept = base["shapes"].setdefault(shape, {})
            for name, value in figures.items():
                if name.startswith("prefill") and isinstance(kept.get(name), list):  # per prompt length
                    value = list({p["prompt_len"]: p for p in [*kept[name], *value]}.values())
                    value.sort(key=lambda p: p["prompt_len"])
                kept[name] = value
    return [by_share[s] for s in sorted(by_share)]


def _write(runs: list[dict], shapes: list[str], out: Path) -> int:
    if not any(r["share"] == 100 for r in runs):
        print("adrenaline profile: no run at 100 %; no profile written", file=sys.stderr)
        return 1
    profiles = [_profile_of(shape, runs) for shape in shapes]
    for p in profiles:
        Path(out, p["gpu_slug"]).mkdir(parents=True, exist_ok=True)
        Path(out, p["gpu_slug"], f"{p['shape']}.json").write_text(json.dumps(p, indent=1) + "\n")
    text = report(profiles, runs)
    Path(out, "profile.md").write_text(text)
    print("\n" + text)
    return 0
