"""`adrenaline_py/profile.py` on synthetic profiles: schema, interpolation, the paper's rules, resolution.

Expected values are worked out by hand from the synthetic figures below (comments show the sums).
"""

import copy
import json
from dataclasses import replace

import pytest

from adrenaline_py.config import NAMED_SHAPES, EngineConfig
from adrenaline_py.profile import (
    PROFILE_DIR_ENV,
    GpuInfo,
    Profile,
    ProfileError,
    find,
    gpu_slug,
    needs_gpus,
    ob_mem,
    offload_bound_in_force,
    resolve_engine,
    resolve_offload_bound,
    resolve_sm_shares,
    shape_name,
)

GIB = 1 << 30

SYNTHETIC = {
    "version": 1, "gpu": "NVIDIA Test GPU", "gpu_slug": "nvidia-test-gpu", "num_sms": 100, "memory_gib": 80.0,
    "shape": "llama-2-7b", "dtype": "bfloat16", "block_size": 16, "date": "2026-12-01", "torch": "t", "triton": "t",
    "copy_gbs": 5000.0,
    "attention": [{"sm_share": 30, "gbs": 2000.0, "default_gbs": 1.0}, {"sm_share": 10, "gbs": 1000.0},
                  {"sm_share": 100, "gbs": 4000.0}],  # unsorted on purpose; extra keys are ignored
    "prefill": [
        {"sm_share": 30, "prompt_len": 512, "ms": 60.0}, {"sm_share": 30, "prompt_len": 2048, "ms": 240.0},
        {"sm_share": 60, "prompt_len": 512, "ms": 30.0}, {"sm_share": 60, "prompt_len": 2048, "ms": 120.0},
        {"sm_share": 100, "prompt_len": 512, "ms": 20.0}, {"sm_share": 100, "prompt_len": 2048, "ms": 80.0},
    ],
    "decode_step": [
        *({"batch": b, "context": 1024, "ms": ms, "dense_ms": dense}
          for b, ms, dense in ((16, 10.0, 8.0), (32, 14.0, 9.0), (64, 22.0, 11.0), (128, 38.0, 15.0))),
        *({"batch": b, "context": 2048, "ms": ms, "dense_ms": dense}
          for b, ms, dense in ((16, 12.0, 8.0), (32, 18.0, 9.0), (64, 30.0, 11.0), (128, 54.0, 15.0))),
    ],
}


@pytest.fixture
def prof():
    return Profile.from_dict(copy.deepcopy(SYNTHETIC), "synthetic")


def variant(**changes):
    d = copy.deepcopy(SYNTHETIC)
    d.update(changes)
    return d


# --- schema --------------------------------------------------------------------------------------

def test_load_reads_every_field(tmp_path, prof):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(SYNTHETIC))
    p = Profile.load(path)
    assert (p.gpu, p.gpu_slug, p.shape, p.dtype, p.block_size) == ("NVIDIA Test GPU", "nvidia-test-gpu", "llama-2-7b",
                                                                   "bfloat16", 16)
    assert (p.num_sms, p.memory_gib, p.copy_gbs, p.date, p.source) == (100, 80.0, 5000.0, "2026-12-01", str(path))
    assert [a.sm_share for a in p.attention] == [10, 30, 100]  # sorted
    assert len(p.prefill) == 6 and len(p.decode_step) == 8


def test_optional_fields_may_be_null_or_missing():
    d = variant(copy_gbs=None, decode_step=[{"batch": 8, "context": 64, "ms": None, "dense_ms": 2.0}])
    for key in ("num_sms", "memory_gib", "date", "torch", "triton"):
        del d[key]
    p = Profile.from_dict(d)
    assert p.copy_gbs is None and p.num_sms is None and p.decode_step[0].ms is None


@pytest.mark.parametrize("changes, message", [
    ({"version": 2}, "unsupported profile version 2"),
    ({"gpu": ""}, "'gpu' must be a non-empty string"),
    ({"block_size": 16.5}, "'block_size' must be an integer"),
    ({"attention": []}, "'attention' must not be empty"),
    ({"attention": [{"sm_share": 0, "gbs": 1.0}]}, r"attention\[0\]: 'sm_share' must be > 0 and <= 100, got 0"),
    ({"attention": [{"sm_share": 101, "gbs": 1.0}]}, "must be > 0 and <= 100, got 101"),
    ({"attention": [{"sm_share": 10, "gbs": -1.0}]}, "'gbs' must be > 0"),
    ({"attention": [{"sm_share": 10, "gbs": 1.0}, {"sm_share": 10, "gbs": 2.0}]}, r"sm_share \(10,\) appears twice"),
    ({"attention": [{"sm_share": True, "gbs": 1.0}]}, "'sm_share' must be an integer, got True"),
    ({"prefill": [{"sm_share": 30, "prompt_len": 512}]}, r"prefill\[0\]: missing 'ms'"),
    ({"prefill": {"sm_share": 30}}, "'prefill' must be a list of objects"),
    ({"decode_step": [{"batch": 1, "context": 1, "ms": float("nan")}]}, "'ms' must be a number"),
    ({"decode_step": [{"batch": 1, "context": 8, "ms": 1.0}, {"batch": 1, "context": 8, "ms": 2.0}]},
     r"\(batch, context\) \(1, 8\) appears twice"),
])
def test_invalid_profiles_say_what_is_wrong(changes, message):
    with pytest.raises(ProfileError, match=message):
        Profile.from_dict(variant(**changes), "bad.json")


def test_not_json_is_a_profile_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{")
    with pytest.raises(ProfileError, match="not valid JSON"):
        Profile.load(path)


def test_find_prefers_the_override_dir_and_misses_cleanly(tmp_path, monkeypatch):
    package, override = tmp_path / "package", tmp_path / "override"
    for d, date in ((package, "2026-01-01"), (override, "2026-02-02")):
        (d / "nvidia-test-gpu").mkdir(parents=True)
        (d / "nvidia-test-gpu" / "llama-2-7b.json").write_text(json.dumps(variant(date=date)))
    assert find("nvidia-test-gpu", "llama-2-7b", [override, package]).date == "2026-02-02"
    assert find("nvidia-test-gpu", "llama-2-13b", [override, package]) is None
    monkeypatch.setenv(PROFILE_DIR_ENV, str(override))
    assert find("nvidia-test-gpu", "llama-2-7b").date == "2026-02-02"  # env dir, before the package's
    assert find("nvidia-h200", "tiny") is None


def test_gpu_slug_and_shape_name():
    assert gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_slug("  NVIDIA  A100-SXM4-80GB ") == "nvidia-a100-sxm4-80gb"
    assert shape_name(NAMED_SHAPES["llama-3.1-8b"]) == "llama-3.1-8b"
    assert shape_name(replace(NAMED_SHAPES["llama-2-7b"], rope_theta=1.0)) == "llama-2-7b"  # not kernel-relevant
    assert shape_name(replace(NAMED_SHAPES["llama-2-7b"], num_hidden_layers=31)) is None


# --- interpolation -------------------------------------------------------------------------------

def test_attention_bandwidth_is_piecewise_linear_in_the_share(prof):
    assert prof.attention_gbs(30) == 2000.0
    assert prof.attention_gbs(20) == 1500.0              # halfway 1000 → 2000
    assert prof.attention_gbs(65) == 3000.0              # 2000 + 35/70 × 2000
    assert prof.attention_gbs(5) == 500.0                # below 10 %: linear down to 0 at 0 %
    with pytest.raises(ValueError):
        prof.attention_gbs(0)


def test_prefill_latency_in_length_and_share(prof):
    assert prof.prefill_ms(30, 1024) == pytest.approx(120.0)   # 60 + 512/1536 × 180
    assert prof.prefill_ms(30, 256) == 60.0                    # below the profile: the shortest's value
    assert prof.prefill_ms(30, 4096) == pytest.approx(480.0)   # last segment extended: 240 + 2048 × 180/1536
    assert prof.prefill_ms(45, 1024) == pytest.approx(90.0)    # halfway between 120 (30 %) and 60 (60 %)
    assert prof.prefill_ms(20, 1024) == pytest.approx(120.0)   # shares are clamped to the profiled ones


def test_decode_step_bilinear_in_batch_and_context(prof):
    assert prof.step_ms(48, 1024) == pytest.approx(18.0)       # 14 + 16/32 × 8
    assert prof.step_ms(48, 2048) == pytest.approx(24.0)       # 18 + 16/32 × 12
    assert prof.step_ms(48, 1536) == pytest.approx(21.0)       # halfway
    assert prof.step_ms(48, 4096) == pytest.approx(36.0)       # contexts extended: 24 + 2048 × 6/1024
    assert prof.step_ms(256, 1024) == pytest.approx(70.0)      # 38 + 128 × 16/64
    assert prof.step_ms(8, 1024) == 10.0
    assert prof.dense_ms(48) == pytest.approx(10.0)            # 9 + 16/32 × 2
    assert prof.dense_ms(256) == pytest.approx(23.0)           # 15 + 128 × 4/64


# --- the paper's rules ---------------------------------------------------------------------------

@pytest.mark.parametrize("slo, share", [(130, 30), (120, 30), (100, 60), (50, 100), (30, None)])
def test_smallest_prefill_share_meeting_the_ttft_slo(prof, slo, share):
    # a 1024-token prompt takes 120 ms at 30 %, 60 ms at 60 %, 40 ms at 100 %
    assert prof.smallest_prefill_share(slo, 1024) == share


def test_ob_mem_is_the_smaller_of_capacity_and_bandwidth_ratios():
    assert ob_mem(3000, 2000) == 1.5
    assert ob_mem(3000, 2000, 2000.0, 4000.0) == 0.5
    assert ob_mem(1000, 4000, 2000.0, 4000.0) == 0.25
    with pytest.raises(ValueError):
        ob_mem(1, 0)


def test_offload_bound_memory_bound_binds(prof):
    ob = prof.offload_bound(30, 3000, 2000, tpot_slo_ms=12.0, context=1024)
    # OB_mem = min(3000/2000, 2000/4000) = 0.5. At 12 ms: all-local 16→10, 32→14 crosses at 16 + 2/4 × 16 = 24;
    # dense 64→11, 128→15 crosses at 64 + 1/4 × 64 = 80: OB_comp = (80 - 24) / 24.
    assert (ob.ob_mem, ob.b_tpot, ob.b_max) == (0.5, 24, 80)
    assert ob.ob_comp == pytest.approx(56 / 24)
    assert ob.value == 0.5
    assert ob.bw_ratio == 0.5 and ob.hbm_ratio == 1.5


def test_offload_bound_compute_bound_binds():
    heavy_dense = [{"batch": b, "context": 1024, "ms": ms, "dense_ms": dense}
                   for b, ms, dense in ((16, 10.0, 8.0), (32, 14.0, 12.0), (64, 22.0, 18.0), (128, 38.0, 30.0))]
    ob = Profile.from_dict(variant(decode_step=heavy_dense)).offload_bound(100, 3000, 2000, tpot_slo_ms=20.0,
                                                                            context=1024)
    # OB_mem = min(1.5, 4000/4000) = 1. All-local 32→14, 64→22 crosses 20 at 32 + 6/8 × 32 = 56; dense 64→18,
    # 128→30 crosses it at 64 + 2/12 × 64 = 74.7 → 74: OB_comp = (74 - 56) / 56.
    assert (ob.ob_mem, ob.b_tpot, ob.b_max) == (1.0, 56, 74)
    assert ob.value == ob.ob_comp == pytest.approx(18 / 56)
    assert "lower bound" not in ob.note


def test_offload_bound_dense_part_beyond_the_profile_gives_a_lower_bound(prof):
    ob = prof.offload_bound(100, 3000, 2000, tpot_slo_ms=20.0, context=1024)
    # B_TPOT = 56 as above; the dense part meets 20 ms up to the largest profiled batch, 128:
    # OB_comp = (128 - 56) / 56 = 1.29, a lower bound; OB_mem = 1 binds.
    assert (ob.b_tpot, ob.b_max) == (56, 128)
    assert ob.ob_comp == pytest.approx(72 / 56) and ob.value == 1.0
    assert "lower bound" in ob.note


def test_offload_bound_reads_the_step_at_the_reference_context(prof):
    ob = prof.offload_bound(100, 3000, 2000, tpot_slo_ms=20.0, context=1536)
    # at 1536: 32→16, 64→26 crosses 20 at 32 + 4/10 × 32 = 44.8 → 44 requests
    assert ob.b_tpot == 44 and ob.ob_comp == pytest.approx((128 - 44) / 44)


@pytest.mark.parametrize("tpot, why", [
    (None, "no TPOT SLO"),
    (40.0, "meets the TPOT SLO 40 ms up to the largest profiled batch 128"),
    (9.0, "misses the TPOT SLO 9 ms at every profiled batch"),
])
def test_offload_bound_falls_back_to_ob_mem_when_compute_does_not_bind(prof, tpot, why):
    ob = prof.offload_bound(30, 3000, 2000, tpot_slo_ms=tpot, context=1024)
    assert ob.ob_comp is None and ob.value == ob.ob_mem == 0.5
    assert why in ob.note


def test_offload_bound_without_decode_steps_uses_ob_mem():
    p = Profile.from_dict(variant(decode_step=[]))
    ob = p.offload_bound(30, 1000, 4000, tpot_slo_ms=20.0, context=1024)
    assert ob.value == 0.25 and "no decode-step figures" in ob.note


# --- resolution ----------------------------------------------------------------------------------

def engine(**kw):
    base = dict(model="dummy:llama-2-7b", dtype="bfloat16", max_model_len=2048, max_tokens_limit=1024)
    base.update(kw)
    return EngineConfig(**base)


@pytest.mark.parametrize("ttft, shares", [
    (250.0, (30, 70)),   # a 2048-token prefill: 240 ms at 30 %
    (150.0, (60, 40)),   # 120 ms at 60 %
    (100.0, (90, 10)),   # only 100 % (80 ms) meets it: prefill gets all but the executor's 10 %
    (50.0, (90, 10)),    # nothing meets it
])
def test_shares_from_the_ttft_slo(prof, ttft, shares):
    p, x, why = resolve_sm_shares(engine(ttft_slo_ms=ttft), prof)
    assert (p, x) == shares
    assert "profile synthetic" in why


def test_shares_use_the_longest_prefill_pass(prof):
    # max_prefill_tokens 512 < max_model_len: a 512-token pass takes 60 ms at 30 %
    assert resolve_sm_shares(engine(ttft_slo_ms=60.0, max_prefill_tokens=512), prof)[:2] == (30, 70)


def test_shares_given_or_defaulted(prof):
    assert resolve_sm_shares(engine(prefill_sm_share=50, executor_sm_share=60), prof)[:2] == (50, 60)
    assert resolve_sm_shares(engine(prefill_sm_share=80), prof)[:2] == (80, 20)
    assert resolve_sm_shares(engine(executor_sm_share=25), prof)[:2] == (75, 25)
    assert resolve_sm_shares(engine(), prof)[:2] == (40, 60)                 # no TTFT SLO
    assert resolve_sm_shares(engine(ttft_slo_ms=100.0), None)[:2] == (40, 60)  # no profile
    with pytest.raises(ValueError):
        resolve_sm_shares(engine(prefill_sm_share=100), prof)


# The synthetic profile's 2048-token pass costs 240 / 120 / 80 ms at 30 / 60 / 100 %: 117 / 59 / 39 µs a token
@pytest.mark.parametrize("load, shares", [
    (4000.0, (30, 70)),    # busy 0.47 of the time at 30 %
    (5000.0, (60, 40)),    # 0.59 at 30 % is too busy, 0.29 at 60 %
    (15000.0, (90, 10)),   # 0.59 even at 100 %: prefill gets all but the executor's 10 %
])
def test_shares_from_the_planned_prompt_load(prof, load, shares):
    p, x, why = resolve_sm_shares(engine(prompt_tokens_per_s=load), prof)
    assert (p, x) == shares
    assert f"{load:g} prompt tokens/s" in why and "profile synthetic" in why


def test_prefill_load_is_tokens_per_second_times_cost_per_token(prof):
    assert prof.prefill_load(30, 4000.0, 2048) == pytest.approx(4000 * 240 / 2048 / 1000)
    assert prof.smallest_prefill_share_for_load(4000.0, 2048, max_load=0.4) == 60
    assert prof.smallest_prefill_share_for_load(15000.0, 2048) is None


@pytest.mark.parametrize("ttft, load, share", [
    (250.0, 5000.0, 60),   # the SLO alone: 30 %; the load needs 60 %
    (150.0, 4000.0, 60),   # the load alone: 30 %; the SLO needs 60 %
    (250.0, 4000.0, 30),
])
def test_shares_take_the_larger_of_the_slo_and_the_load(prof, ttft, load, share):
    p, x, why = resolve_sm_shares(engine(ttft_slo_ms=ttft, prompt_tokens_per_s=load), prof)
    assert (p, x) == (share, 100 - share)
    assert "TTFT SLO" in why and "prompt tokens/s" in why


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_prompt_load_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="prompt_tokens_per_s"):
        engine(prompt_tokens_per_s=bad)


def test_cuda_engine_reads_the_profile_for_the_prompt_load_alone(tmp_path):
    (tmp_path / "nvidia-test-gpu").mkdir()
    (tmp_path / "nvidia-test-gpu" / "llama-2-7b.json").write_text(json.dumps(SYNTHETIC))
    gpus = {i: GpuInfo(i, "NVIDIA Test GPU", 100 * GIB, 100 * GIB) for i in (0, 1)}
    # pools and OB given: only the load leaves something for the profile to decide
    e = engine(device="cuda", prefill_gpu=0, decode_gpu=1, num_decode_blocks=1000, num_executor_blocks=500,
               offload_bound=0.5, prompt_tokens_per_s=5000.0)
    assert needs_gpus(e)
    e = resolve_engine(e, NAMED_SHAPES["llama-2-7b"], gpus, dirs=[tmp_path])
    assert (e.prefill_sm_share, e.executor_sm_share) == (60, 40)
    assert not needs_gpus(replace(e, extra={}, prompt_tokens_per_s=None))


def test_cli_passes_the_prompt_load():
    import argparse

    from adrenaline_py.cli import _engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    _engine_args(parser)
    assert engine_config_from_args(parser.parse_args(["--prompt-tokens-per-s", "4700"])).prompt_tokens_per_s == 4700
    assert engine_config_from_args(parser.parse_args([])).prompt_tokens_per_s is None


def test_offload_bound_given_from_profile_or_from_pools(prof):
    e = engine(num_decode_blocks=2000, num_executor_blocks=3000, tpot_slo_ms=20.0, max_model_len=2048)
    assert resolve_offload_bound(replace(e, offload_bound=0.7), prof, 30)[0] == 0.7
    ob, why = resolve_offload_bound(e, prof, 30)     # reference context 2048 // 2: as the tests above
    assert ob == 0.5 and "OB_comp = (B_max 128 - B_TPOT 56) / B_TPOT = 1.286" in why
    ob, why = resolve_offload_bound(e, None, 30)
    assert ob == 1.5 and "HBM_p/HBM_d = 3000/2000 blocks" in why


def test_cpu_engine_resolves_ob_from_its_pools():
    e = resolve_engine(EngineConfig(num_decode_blocks=400, num_executor_blocks=100))
    assert (e.prefill_sm_share, e.executor_sm_share, e.num_decode_blocks, e.num_executor_blocks) == (40, 60, 400, 100)
    assert e.offload_bound == 0.25
    assert any("no profile" in n for n in e.extra["resolution"])
    assert resolve_engine(e) is e                           # resolved once
    assert offload_bound_in_force(e)[0] == 0.25


def test_engine_json_round_trip_keeps_resolved_and_open_values(tmp_path):
    for e in (resolve_engine(EngineConfig()), EngineConfig(device="cuda", ttft_slo_ms=200.0, tpot_slo_ms=50.0)):
        e.save(tmp_path / "engine.json")
        assert EngineConfig.load(tmp_path / "engine.json") == e
    assert EngineConfig().num_decode_blocks == 1024            # cpu default
    assert EngineConfig(device="cuda").num_decode_blocks is None  # sized from memory


def test_role_without_launcher_resolution_uses_ob_mem():
    bound, why = offload_bound_in_force(EngineConfig(num_decode_blocks=100, num_executor_blocks=50))
    assert bound == 0.5 and "OB_mem" in why


def test_cuda_engine_from_profile_and_gpu_memory(tmp_path, prof):
    (tmp_path / "nvidia-test-gpu").mkdir()
    (tmp_path / "nvidia-test-gpu" / "llama-2-7b.json").write_text(json.dumps(SYNTHETIC))
    gpus = {i: GpuInfo(i, "NVIDIA Test GPU", 100 * GIB, 100 * GIB) for i in (0, 1)}
    e = resolve_engine(engine(device="cuda", prefill_gpu=0, decode_gpu=1, ttft_slo_ms=150.0, tpot_slo_ms=20.0),
                       NAMED_SHAPES["llama-2-7b"], gpus, dirs=[tmp_path])
    assert (e.prefill_sm_share, e.executor_sm_share) == (60, 40)
    # pools from memory: the executor's GPU holds prefill's weights too, so it has fewer blocks than decode's
    assert 0 < e.num_executor_blocks < e.num_decode_blocks
    # OB = min(OB_mem, OB_comp): BW at 40 % (2000 + 10/70 × 2000) / 4000, the capacity ratio, (128 - 56) / 56
    bw = (2000 + 10 / 70 * 2000) / 4000
    assert e.offload_bound == pytest.approx(min(bw, e.num_executor_blocks / e.num_decode_blocks, 72 / 56))
    notes = e.extra["resolution"]
    assert any(n.startswith("profile ") for n in notes) and any(n.startswith("offload bound OB = ") for n in notes)


def test_cuda_engine_without_a_matching_profile(tmp_path):
    gpus = {0: GpuInfo(0, "NVIDIA Other", 100 * GIB, 100 * GIB)}
    e = resolve_engine(engine(device="cuda", num_decode_blocks=1000, num_executor_blocks=500, ttft_slo_ms=100.0),
                       NAMED_SHAPES["llama-2-7b"], gpus, dirs=[tmp_path])
    assert (e.prefill_sm_share, e.executor_sm_share, e.offload_bound) == (40, 60, 0.5)
    assert any("no profile for nvidia-other/llama-2-7b" in n for n in e.extra["resolution"])


def test_profile_of_another_dtype_is_not_used(tmp_path):
    (tmp_path / "nvidia-test-gpu").mkdir()
    (tmp_path / "nvidia-test-gpu" / "llama-2-7b.json").write_text(json.dumps(SYNTHETIC))
    gpus = {0: GpuInfo(0, "NVIDIA Test GPU", 100 * GIB, 100 * GIB)}
    e = resolve_engine(engine(device="cuda", dtype="float16", num_decode_blocks=1000, num_executor_blocks=500),
                       NAMED_SHAPES["llama-2-7b"], gpus, dirs=[tmp_path])
    assert e.offload_bound == 0.5
    assert any("not used: measured with bfloat16" in n for n in e.extra["resolution"])


def test_cuda_engine_needs_gpu_figures():
    with pytest.raises(ValueError, match="needs the model's shape and the GPUs' memory"):
        resolve_engine(engine(device="cuda"))


# Prefill beside an attention load: the 2048-token pass costs 480 / 240 ms at 30 / 60 % (2 × alone)
LOADED = [{"sm_share": 30, "prompt_len": 512, "ms": 120.0}, {"sm_share": 30, "prompt_len": 2048, "ms": 480.0},
          {"sm_share": 60, "prompt_len": 512, "ms": 60.0}, {"sm_share": 60, "prompt_len": 2048, "ms": 240.0}]


@pytest.mark.parametrize("load, shares", [
    (2500.0, (30, 70)),    # beside the load 2500 × 480 / 2048 ms = 0.59 busy at 30 % (at most 0.6)
    (4000.0, (60, 40)),    # 0.94 at 30 %, 0.47 at 60 % (alone, 30 % would have been 0.47: the old answer)
    (8000.0, (90, 10)),    # 0.94 even at 60 %, the largest share measured beside the load
])
def test_planned_prompt_load_reads_prefill_beside_the_executor_when_profiled(load, shares):
    prof = Profile.from_dict(variant(prefill_loaded=copy.deepcopy(LOADED)), "synthetic")
    assert prof.load_rule_beside_executor and prof.prefill_max_load == 0.6
    assert prof.prefill_ms(30, 2048, loaded=True) == 480.0 and prof.prefill_ms(30, 2048) == 240.0
    p, x, why = resolve_sm_shares(engine(prompt_tokens_per_s=load), prof)
    assert (p, x) == shares
    assert "beside the executor" in why


def test_the_ttft_rule_keeps_reading_prefill_alone(prof):
    loaded = Profile.from_dict(variant(prefill_loaded=copy.deepcopy(LOADED)), "synthetic")
    for ttft in (250.0, 150.0, 100.0):
        assert resolve_sm_shares(engine(ttft_slo_ms=ttft), loaded)[:2] == resolve_sm_shares(engine(ttft_slo_ms=ttft),
                                                                                           prof)[:2]


def test_profile_without_loaded_figures_keeps_the_alone_rule(prof):
    assert not prof.load_rule_beside_executor and prof.prefill_max_load == 0.5
    assert "(profiled alone)" in resolve_sm_shares(engine(prompt_tokens_per_s=4000.0), prof)[2]


def test_bad_loaded_prefill_entries_are_named():
    with pytest.raises(ProfileError, match=r"prefill_loaded\[0\]: missing 'ms'"):
        Profile.from_dict(variant(prefill_loaded=[{"sm_share": 30, "prompt_len": 512}]), "synthetic")
    with pytest.raises(ProfileError, match="prefill_loaded"):
        Profile.from_dict(variant(prefill_loaded=[LOADED[0], LOADED[0]]), "synthetic")
