"""The sampler's CUDA kernels against the sort path: the radix-searched top-k / top-p / min-p
threshold keeps what a descending sort keeps, does not depend on the rest of the batch, and the
sampled tokens are the sort path's (GPU, or CPU under TRITON_INTERPRET=1: slow, so smaller)."""

from __future__ import annotations

import pytest
import torch

from adrenaline_py import sampler, sampler_kernels
from adrenaline_py.request import SamplingParams
from adrenaline_py.triton_support import interpreting, triton_available

ON_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not triton_available() or not (ON_GPU or interpreting()),
    reason="the sampler's Triton kernels: need the triton package and a CUDA GPU, or TRITON_INTERPRET=1 "
           "(`make test` runs them so, with triton in .venv/triton-interpreter)")
DEVICE = "cuda" if ON_GPU else "cpu"
ROWS, VOCAB = (64, 128_256) if ON_GPU else (8, 9_000)   # the interpreter is slow

CASES = {   # what the batch asks for: (top-k, top-p, min-p)
    "top-p": (False, True, False),
    "top-k": (True, False, False),
    "min-p": (False, False, True),
    "all": (True, True, True),
}


def make_batch(dtype: torch.dtype, seed: int = 0):
    """Logits of peaked and flat rows, one row of ties, and each row's settings (some rows do not cut)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.3, 1.0, 3.0, 8.0])[torch.arange(ROWS) % 4]
    logits = torch.randn(ROWS, VOCAB, generator=g) * scale[:, None]
    logits[1, : VOCAB // 3] = logits[1, VOCAB // 3]   # a third of the row ties
    temps = 0.4 + torch.rand(ROWS, generator=g) * 1.2
    k = torch.randint(1, 400, (ROWS,), generator=g)
    k[::5] = VOCAB   # rows without top-k
    top_p = 0.5 + torch.rand(ROWS, generator=g) * 0.49
    top_p[::3] = 1.0   # rows without top-p
    min_p = torch.rand(ROWS, generator=g) * 0.2
    min_p[::2] = 0.0
    return logits.to(dtype).to(DEVICE), temps.to(DEVICE), k.to(DEVICE), top_p.to(DEVICE), min_p.to(DEVICE)


def sort_reference(logits, temps, k, top_p, min_p, case):
    use_k, use_p, use_min_p = CASES[case]
    scores = logits.float() / temps[:, None]
    floor = scores.max(-1).values + torch.log(min_p if use_min_p else torch.zeros_like(min_p))
    scores = scores.masked_fill(scores < floor[:, None], float("-inf"))
    if not (use_k or use_p):
        return scores, floor
    kept = sampler.sort_threshold(scores, k if use_k else torch.full_like(k, VOCAB), top_p if use_p else None)
    return scores, torch.maximum(kept, floor)


def kernel_threshold(logits, temps, k, top_p, min_p, case):
    use_k, use_p, use_min_p = CASES[case]
    return sampler_kernels.cut_threshold(logits, temps, torch.log(min_p) if use_min_p else None,
                                         k if use_k else None, top_p if use_p else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_cut_threshold_keeps_what_the_sort_keeps(case, dtype):
    logits, temps, k, top_p, min_p = make_batch(dtype)
    scores, ref = sort_reference(logits, temps, k, top_p, min_p, case)
    got = kernel_threshold(logits, temps, k, top_p, min_p, case)
    kept_ref, kept_got = scores >= ref[:, None], scores >= got[:, None]
    differ = (kept_ref != kept_got).any(-1).nonzero().flatten().tolist()
    # The kernel sums the mass in another order than the sort's cumsum: a row may differ only where
    # the top-p boundary falls within float rounding of the cumulative mass (none did when written).
    for r in differ:
        probs = scores[r].double().softmax(-1)
        edge = probs[kept_ref[r] ^ kept_got[r]].sum().item()
        boundary = probs[kept_ref[r] & kept_got[r]].sum().item()
        assert CASES[case][1] and abs(boundary - top_p[r].item()) < 1e-5 and edge < 1e-3, (r, ref[r], got[r])
    assert len(differ) <= 1, differ
    assert bool(kept_got.any(-1).all()), "every row keeps at least its best token"


def test_cut_threshold_of_a_row_does_not_depend_on_its_batch():
    logits, temps, k, top_p, min_p = make_batch(torch.bfloat16, seed=1)
    whole = kernel_threshold(logits, temps, k, top_p, min_p, "all")
    pick = torch.tensor([5, 0, 3], device=DEVICE)
    part = kernel_threshold(logits[pick], temps[pick], k[pick], top_p[pick], min_p[pick], "all")
    assert torch.equal(part, whole[pick])


@pytest.mark.parametrize("cut", ["search", "sort"])
def test_sampled_tokens_on_the_kernels_are_the_torch_paths(cut, monkeypatch):
    """The CUDA path (the cut by the radix search or by the sort, the draw by the Gumbel-max kernel)
    draws the torch path's tokens (sort, torch noise)."""
    monkeypatch.setattr(sampler_kernels, "RADIX_MIN_VOCAB", 0 if cut == "search" else VOCAB + 1)
    logits, temps, k, top_p, min_p = make_batch(torch.bfloat16, seed=2)
    rows = [sampler.SamplingRow(SamplingParams(max_tokens=100, temperature=float(temps[i]), top_k=int(k[i]) % VOCAB,
                                               top_p=float(top_p[i]), min_p=float(min_p[i]), seed=100 + i), [0] * i)
            for i in range(ROWS)]
    on_kernels = sampler.sample(logits, rows)
    assert sampler._fused["ok"], "the kernels ran (no fallback to the torch path)"
    try:
        sampler._fused["ok"] = False   # the torch path: sort threshold, torch noise
        on_torch = sampler.sample(logits, rows)
    finally:
        sampler._fused["ok"] = True
    same = sum(a == b for a, b in zip(on_kernels, on_torch))
    assert same >= ROWS - 1, (on_kernels, on_torch)
