"""The sampler: greedy, seeded reproducibility, top-k / top-p support, min_tokens and bad words.

Reference distributions are written down by hand (logits = log of chosen probabilities) or computed
with numpy, never with the sampler itself.
"""

import numpy as np
import pytest
import torch

from adrenaline_py.request import SamplingParams
from adrenaline_py.sampler import SamplingRow, sample

N_DRAWS = 1500


def params(**kw) -> SamplingParams:
    kw.setdefault("max_tokens", 10_000)
    return SamplingParams(**kw)


def logits_of(probs) -> torch.Tensor:
    """[V] logits whose softmax (at temperature 1) is ``probs``."""
    return torch.log(torch.tensor(probs, dtype=torch.float64)).float()


def draws(logits_row: torch.Tensor, p: SamplingParams, n: int = N_DRAWS, start: int = 0) -> list[int]:
    """Tokens number start..start+n-1 of one request (row i has already generated i tokens)."""
    rows = [SamplingRow(p, [0] * i) for i in range(start, start + n)]
    return sample(logits_row.expand(n, -1).clone(), rows)


def frequencies(tokens: list[int], vocab: int) -> np.ndarray:
    return np.bincount(tokens, minlength=vocab) / len(tokens)


def test_greedy_is_argmax_per_row():
    gen = np.random.default_rng(0)
    logits = gen.normal(size=(8, 300)).astype(np.float32)
    rows = [SamplingRow(params(temperature=0.0, top_k=0, top_p=0.5, seed=i), [1, 2]) for i in range(8)]
    assert sample(torch.from_numpy(logits.copy()), rows) == list(np.argmax(logits, axis=1))


def test_top_k_one_is_greedy_even_with_temperature():
    gen = np.random.default_rng(1)
    logits = gen.normal(size=(16, 100)).astype(np.float32)
    rows = [SamplingRow(params(temperature=2.0, top_k=1, seed=i), []) for i in range(16)]
    assert sample(torch.from_numpy(logits.copy()), rows) == list(np.argmax(logits, axis=1))


def test_same_seed_gives_same_tokens():
    uniform = torch.zeros(1000)
    p = params(temperature=1.0, seed=42)
    assert draws(uniform, p, 50) == draws(uniform, p, 50)


def test_different_seeds_and_indices_give_different_tokens():
    uniform = torch.zeros(1000)
    a = draws(uniform, params(temperature=1.0, seed=1), 50)
    b = draws(uniform, params(temperature=1.0, seed=2), 50)
    assert a != b
    assert sum(x == y for x, y in zip(a, b, strict=True)) < 5   # unrelated streams: ~0.05 matches expected
    assert len(set(a)) > 40                        # successive indices are not one repeated draw


def test_seeded_draw_does_not_depend_on_batch_composition_or_row_position():
    uniform = torch.zeros(1000)
    p = params(temperature=1.0, seed=7)
    alone = [sample(uniform[None].clone(), [SamplingRow(p, [5] * i)])[0] for i in range(30)]
    gen = torch.Generator().manual_seed(0)
    in_batch = []
    for i in range(30):
        others = [SamplingRow(params(temperature=0.9, seed=100 + j), [1] * j) for j in range(i % 4)]
        batch = torch.randn(len(others) + 1 + 2, 1000, generator=gen)
        batch[len(others)] = uniform
        rows = [*others, SamplingRow(p, [5] * i),
                SamplingRow(params(temperature=1.0, seed=7), [5] * (i + 1)), SamplingRow(params(), [])]
        in_batch.append(sample(batch, rows)[len(others)])
    assert in_batch == alone


def test_temperature_scales_the_distribution():
    # softmax(log([0.2, 0.8]) / 0.5) = [0.04, 0.64] / 0.68
    tokens = draws(logits_of([0.2, 0.8]), params(temperature=0.5, seed=3))
    assert frequencies(tokens, 2)[0] == pytest.approx(0.04 / 0.68, abs=0.025)


def test_top_k_restricts_the_support_to_the_k_best():
    gen = np.random.default_rng(5)
    logits = gen.normal(scale=0.3, size=64).astype(np.float32)
    k = 5
    top = set(np.argsort(-logits)[:k].tolist())
    tokens = draws(torch.from_numpy(logits), params(temperature=1.0, top_k=k, seed=11))
    assert set(tokens) == top
    # And the kept tokens keep their relative weights: softmax renormalised over the top k.
    expected = np.zeros(64)
    idx = np.array(sorted(top))
    expected[idx] = np.exp(logits[idx]) / np.exp(logits[idx]).sum()
    assert np.abs(frequencies(tokens, 64) - expected).max() < 0.05


PROBS = [0.05, 0.4, 0.25, 0.2, 0.1]   # sorted: 0.4 (id 1), 0.25 (id 2), 0.2 (id 3), 0.1 (id 4), 0.05 (id 0)


def renormalised(kept: set[int]) -> np.ndarray:
    """PROBS restricted to the ``kept`` ids and renormalised: the expected draw frequencies."""
    probs, expected = np.array(PROBS), np.zeros(len(PROBS))
    idx = np.array(sorted(kept))
    expected[idx] = probs[idx] / probs[idx].sum()
    return expected


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.3, {1}),            # 0.4 alone reaches 0.3
        (0.6, {1, 2}),         # 0.4 < 0.6, 0.4 + 0.25 = 0.65 reaches it
        (0.7, {1, 2, 3}),      # 0.65 < 0.7, + 0.2 = 0.85
        (0.9, {1, 2, 3, 4}),   # 0.85 < 0.9, + 0.1 = 0.95
        (0.99, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    tokens = draws(logits_of(PROBS), params(temperature=1.0, top_p=top_p, seed=9))
    assert set(tokens) == kept
    assert np.abs(frequencies(tokens, 5) - renormalised(kept)).max() < 0.05


def test_top_k_and_top_p_combine():
    # top_k=3 leaves 0.4, 0.25, 0.2 (mass 0.85): renormalised 0.47, 0.29, 0.24; top_p=0.7 keeps two.
    tokens = draws(logits_of(PROBS), params(temperature=1.0, top_k=3, top_p=0.7, seed=4))
    assert set(tokens) == {1, 2}


def test_min_p_keeps_the_tokens_at_least_min_p_times_as_likely_as_the_best():
    # the best is 0.4: min_p 0.5 keeps probabilities >= 0.2 (0.4, 0.25, 0.2), renormalised
    tokens = draws(logits_of(PROBS), params(temperature=1.0, min_p=0.5, seed=6))
    assert set(tokens) == {1, 2, 3}
    assert np.abs(frequencies(tokens, 5) - renormalised({1, 2, 3})).max() < 0.05


def test_min_p_applies_before_top_p_as_in_vllm():
    # min_p 0.3 keeps 0.4, 0.25, 0.2 (renormalised 0.47, 0.29, 0.24); top_p 0.7 then keeps two.
    # Without min_p first, top_p 0.7 over the full distribution would keep three (0.4 + 0.25 < 0.7).
    tokens = draws(logits_of(PROBS), params(temperature=1.0, min_p=0.3, top_p=0.7, seed=8))
    assert set(tokens) == {1, 2}


def test_min_p_is_measured_after_the_temperature():
    # temperature 0.5 squares the odds: 0.4^2 = 0.16, 0.25^2 = 0.0625, 0.2^2 = 0.04, 0.1^2 = 0.01;
    # min_p 0.3 keeps probabilities >= 0.3 x the best's, i.e. odds >= 0.048: tokens 1 and 2.
    tokens = draws(logits_of(PROBS), params(temperature=0.5, min_p=0.3, seed=10))
    assert set(tokens) == {1, 2}


def test_min_tokens_bans_end_ids_until_reached_greedy():
    logits = logits_of([0.1, 0.05, 0.6, 0.25])   # end ids 2 and 3 are the two best
    p = params(min_tokens=3, end_ids=(2, 3))
    rows = [SamplingRow(p, [0] * n) for n in range(5)]
    assert sample(logits.expand(5, -1).clone(), rows) == [0, 0, 0, 2, 2]


def test_min_tokens_bans_end_ids_when_sampling():
    logits = logits_of([0.01, 0.01, 0.98])
    p = params(temperature=1.0, min_tokens=400, end_ids=(2,), seed=1)
    early = draws(logits, p, 400)
    assert 2 not in early and set(early) == {0, 1}
    late = draws(logits, p, 200, start=400)
    assert late.count(2) > 180


def test_single_token_bad_word_is_never_produced():
    logits = logits_of([0.1, 0.7, 0.2])
    p = params(bad_words_ids=((1,),))
    rows = [SamplingRow(p, []), SamplingRow(p, [1]), SamplingRow(p, [0, 2])]
    assert sample(logits.expand(3, -1).clone(), rows) == [2, 2, 2]
    sampled = draws(logits, params(temperature=1.0, seed=5, bad_words_ids=((1,),)), 300)
    assert 1 not in sampled


def test_multi_token_bad_word_bans_its_last_token_only_after_its_prefix():
    logits = logits_of([0.1, 0.1, 0.1, 0.7])  # token 3 is the greedy choice
    p = params(bad_words_ids=((0, 1, 3),))
    cases = {
        (): 3,            # no prefix generated yet
        (0,): 3,          # partial prefix
        (1,): 3,
        (0, 1): 0,        # full prefix [0, 1] → 3 banned; ties among the rest go to the lowest id
        (2, 0, 1): 0,
        (0, 1, 2): 3,     # prefix not at the end
    }
    rows = [SamplingRow(p, list(out)) for out in cases]
    assert sample(logits.expand(len(cases), -1).clone(), rows) == list(cases.values())


def test_bad_words_and_min_tokens_ban_only_their_own_row():
    logits = logits_of([0.2, 0.8]).expand(2, -1).clone()
    rows = [SamplingRow(params(bad_words_ids=((1,),)), []), SamplingRow(params(), [])]
    assert sample(logits, rows) == [0, 1]


def _lowbias32(x: int) -> int:
    """The integer mix of the noise, in plain Python integers (the reference)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_noise_hash_is_the_32_bit_mix_computed_without_overflow():
    from adrenaline_py.sampler import _hash32

    values = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789, 2**32 - 12345]
    assert _hash32(torch.tensor(values, dtype=torch.int64)).tolist() == [_lowbias32(v) for v in values]


def test_seeds_beyond_32_bits_draw_different_streams():
    uniform = torch.zeros(1000)
    a = draws(uniform, params(temperature=1.0, seed=5), 50)
    b = draws(uniform, params(temperature=1.0, seed=5 + (1 << 32)), 50)
    assert sum(x == y for x, y in zip(a, b, strict=True)) < 5


def test_noise_uniforms_stay_inside_the_open_interval_for_every_hash():
    """Every 32-bit hash maps to a uniform strictly inside (0, 1), so every Gumbel noise is finite: a
    token with infinite noise would be drawn whatever its score, a banned (-inf) one included."""
    from adrenaline_py.sampler import uniform_of

    bits = torch.tensor([0, 1, 0x1FF, 0x200, 0x7FFFFFFF, 0xFFFFFDFF, 0xFFFFFE00, 0xFFFFFFFE, 0xFFFFFFFF],
                        dtype=torch.int64)
    u = uniform_of(bits)
    assert bool(((u > 0) & (u < 1)).all()), u
    assert bool(torch.isfinite(-torch.log(-torch.log(u))).all())
    assert bool((u[1:] >= u[:-1]).all())   # monotone in the hash



def test_warm_up_runs_every_cut_path_of_the_cuda_sampler_once(monkeypatch):
    # Where the kernels run, start-up must build each kernel variant a request can reach (min-p,
    # top-k, top-p on and off), so that none is first compiled and loaded mid-serving. Here the
    # kernels are spied on and answered by the torch path.
    from adrenaline_py import sampler, sampler_kernels

    cuts, draws_ = [], []

    def fake_cut(logits, temps, log_min_p, k, top_p):
        cuts.append((log_min_p is not None, k is not None, top_p is not None))
        return torch.full((logits.shape[0],), float("-inf"))

    def fake_draw(scores, keys, threshold=None, temps=None):
        draws_.append(threshold is not None)
        return scores.argmax(-1)

    monkeypatch.setattr(sampler, "runs_triton", lambda t: True)
    monkeypatch.setattr(sampler_kernels, "cut_threshold", fake_cut)
    monkeypatch.setattr(sampler_kernels, "gumbel_argmax", fake_draw)
    vocab = sampler_kernels.RADIX_MIN_VOCAB  # the radix path
    sampler.warm_up(vocab, torch.bfloat16, torch.device("cpu"))
    assert set(cuts) == {(m, k, p) for m in (False, True) for k in (False, True) for p in (False, True)} - {
        (False, False, False)}
    assert False in draws_ and True in draws_  # drawn with no cut and with one
    cuts.clear(), draws_.clear()
    sampler.warm_up(32000, torch.bfloat16, torch.device("cpu"))  # the sort path: only the draw is a kernel
    assert not cuts and False in draws_ and True in draws_
