"""`adrenaline profile`'s CPU side: merging runs measured in separate calls into one profile."""

import json

from adrenaline_py.bench_profile import _profile_of, merge_runs
from adrenaline_py.profile import Profile


def _run(share, shapes, **top):
    return {"share": share, "gpu": "NVIDIA H200", "num_sms": 132, "memory_gib": 139.8, "torch": "t", "triton": "t",
            **top, "shapes": shapes}


def _attention(gbs):
    return {"gbs": gbs, "default_gbs": gbs, "best_config": {"partition": 1 << 20, "block_n": 64, "num_warps": 4,
                                                              "num_stages": 3}}


def test_a_prefill_only_run_adds_its_figures_to_an_earlier_full_profile():
    full = [_run(100, {"llama-2-7b": {"attention": _attention(4500.0),
                                      "prefill": [{"prompt_len": 2048, "ms": 46.0}],
                                      "decode_step": [{"batch": 64, "context": 1024, "ms": 13.0, "dense_ms": 5.0,
                                                       "roofline_ms": 11.0, "note": ""}]}}, copy_gbs=4270.0),
            _run(20, {"llama-2-7b": {"attention": _attention(1280.0), "prefill": [{"prompt_len": 2048, "ms": 169.0},
                                                                                  {"prompt_len": 4096, "ms": 361.0}]}})]
    later = [_run(20, {"llama-2-7b": {"prefill": [{"prompt_len": 2048, "ms": 170.0}],
                                      "prefill_loaded": [{"prompt_len": 2048, "ms": 400.0}]}}, torch="t2")]
    runs = merge_runs(full + later)
    assert [r["share"] for r in runs] == [20, 100]
    twenty = runs[0]
    assert twenty["torch"] == "t2"                                                  # the later run's
    assert twenty["shapes"]["llama-2-7b"]["attention"]["gbs"] == 1280.0             # kept from the earlier
    # replaced per prompt length: 2048 re-measured, 4096 kept
    assert twenty["shapes"]["llama-2-7b"]["prefill"] == [{"prompt_len": 2048, "ms": 170.0},
                                                         {"prompt_len": 4096, "ms": 361.0}]
    assert runs[1] == full[0]
    profile = Profile.from_dict(json.loads(json.dumps(_profile_of("llama-2-7b", runs))), "merged")
    assert profile.prefill_ms(20, 2048) == 170.0
    assert profile.prefill_ms(20, 2048, loaded=True) == 400.0
    assert profile.load_rule_beside_executor
    assert [a.sm_share for a in profile.attention] == [20, 100] and profile.copy_gbs == 4270.0
