"""The engine's greedy tokens equal transformers' on the same weights (fp32, CPU)."""

import pytest
import torch
from conftest import greedy, small_engine_config

from adrenaline_py.engine.local import LocalEngine


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("offload", ["never", "always", "ratio:0.5"])
def test_tiny_gqa_greedy_matches_transformers(tiny_hf, offload):
    hf, ckpt = tiny_hf
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 5, 17, 33, 64, 100]
    prompts = [torch.randint(3, ckpt.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    n_new = 24
    expected = [hf_greedy(hf, p, n_new) for p in prompts]
    with LocalEngine(ckpt, small_engine_config(offload=offload)) as engine:
        got = engine.generate(prompts, [greedy(n_new) for _ in prompts])
    assert [c.output_ids for c in got] == expected
    assert all(c.finish_reason == "length" for c in got)
    if offload == "always":
        assert all(c.offloaded for c in got)
    if offload == "ratio:0.5":
        assert sum(c.offloaded for c in got) == len(prompts) // 2
