"""Repetition, presence and frequency penalties in the one sampler, against hand-computed scores.

Both conventions on the same row (vocabulary of 5, logits [1, -1, 2, 0.5, -0.5], prompt [1, 3],
output so far [2, 2, 4], repetition 2, presence 0.5, frequency 0.25):

TensorRT-LLM (temperature first; every penalty counts prompt + output: counts 0, 1, 2, 1, 1)
  temperature 0.5:  [2, -2, 4, 1, -1]
  repetition:       [2, -4, 2, 0.5, -2]        (positive / 2, negative * 2, seen tokens only)
  presence:         [2, -4.5, 1.5, 0, -2.5]    (- 0.5 per seen token)
  frequency:        [2, -4.75, 1, -0.25, -2.75] (- 0.25 per occurrence)

vLLM (penalties first; repetition counts prompt + output, presence and frequency the output only:
output counts 0, 0, 2, 0, 1)
  repetition:       [1, -2, 1, 0.25, -1]
  presence:         [1, -2, 0.5, 0.25, -1.5]
  frequency:        [1, -2, 0, 0.25, -1.75]
  temperature 0.5:  [2, -4, 0, 0.5, -3.5]
"""

import numpy as np
import pytest
import torch

from adrenaline_py.request import SamplingParams
from adrenaline_py.sampler import SamplingRow, _apply_penalties, sample

LOGITS = [1.0, -1.0, 2.0, 0.5, -0.5]
PROMPT = [1, 3]
OUTPUT = [2, 2, 4]
PENALTIES = dict(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
EXPECTED = {
    "trtllm": [2.0, -4.75, 1.0, -0.25, -2.75],
    "vllm": [2.0, -4.0, 0.0, 0.5, -3.5],
}


def params(**kw) -> SamplingParams:
    kw.setdefault("max_tokens", 10_000)
    return SamplingParams(**kw)


@pytest.mark.parametrize("mode", ["trtllm", "vllm"])
def test_penalized_scores_match_the_hand_computed_ones(mode):
    p = params(temperature=0.5, penalty_mode=mode, **PENALTIES)
    out = _apply_penalties(torch.tensor([LOGITS]), [SamplingRow(p, OUTPUT, PROMPT)])
    # The temperature step divides what _apply_penalties returns.
    assert (out[0] / 0.5).tolist() == pytest.approx(EXPECTED[mode])


@pytest.mark.parametrize("mode", ["trtllm", "vllm"])
def test_sampled_frequencies_follow_the_penalized_distribution(mode):
    # The same history in every row (the penalties depend on it); independent draws from the seeds.
    n = 4000
    rows = [SamplingRow(params(temperature=0.5, seed=i, penalty_mode=mode, **PENALTIES), OUTPUT, PROMPT)
            for i in range(n)]
    tokens = sample(torch.tensor([LOGITS]).expand(n, -1).clone(), rows)
    expected = np.exp(EXPECTED[mode]) / np.exp(EXPECTED[mode]).sum()
    freq = np.bincount(tokens, minlength=5) / n
    assert np.abs(freq - expected).max() < 0.03, (freq, expected)


def test_greedy_rows_are_penalized_without_a_temperature():
    # Raw argmax is token 2; with the penalties (TensorRT-LLM: [1, -2.75, 0, -0.5, -1.75];
    # vLLM: [1, -2, 0, 0.25, -1.75]) token 0 wins.
    rows = [SamplingRow(params(penalty_mode=m, **PENALTIES), OUTPUT, PROMPT) for m in ("trtllm", "vllm")]
    assert sample(torch.tensor([LOGITS, LOGITS]), rows) == [0, 0]


def test_presence_counts_the_prompt_only_in_the_trtllm_convention():
    # Prompt [0], nothing generated: TensorRT-LLM penalizes token 0 (1.0 - 0.5 < 0.9), vLLM does not.
    logits = torch.tensor([[1.0, 0.9], [1.0, 0.9]])
    rows = [SamplingRow(params(presence_penalty=0.5, penalty_mode=m), [], [0]) for m in ("trtllm", "vllm")]
    assert sample(logits, rows) == [1, 0]


def test_repetition_counts_the_prompt_in_both_conventions():
    # 1.0 / 1.2 = 0.83 < 0.9: the prompt's token 0 loses in both.
    logits = torch.tensor([[1.0, 0.9], [1.0, 0.9]])
    rows = [SamplingRow(params(repetition_penalty=1.2, penalty_mode=m), [], [0]) for m in ("trtllm", "vllm")]
    assert sample(logits, rows) == [1, 1]


def test_frequency_subtracts_per_occurrence():
    # Token 0 generated 3 times: 3.0 - 3 * 0.4 = 1.8 < 2.0; generated twice it would still win (2.2).
    logits = torch.tensor([[3.0, 2.0], [3.0, 2.0]])
    rows = [SamplingRow(params(frequency_penalty=0.4, penalty_mode="vllm"), out, []) for out in ([0, 0, 0], [0, 0])]
    assert sample(logits, rows) == [1, 0]


def test_rows_without_penalties_and_the_callers_logits_are_untouched():
    logits = torch.tensor([LOGITS, LOGITS])
    before = logits.clone()
    rows = [SamplingRow(params(**PENALTIES), OUTPUT, PROMPT), SamplingRow(params(), OUTPUT, PROMPT)]
    assert sample(logits, rows) == [0, 2]
    assert torch.equal(logits, before)


def test_penalties_keep_banned_tokens_banned():
    # Token 0 is an end id and min_tokens is not reached: a negative penalty cannot bring it back.
    logits = torch.tensor([[5.0, 1.0]])
    p = params(min_tokens=3, end_ids=(0,), presence_penalty=-2.0, penalty_mode="vllm")
    assert sample(logits, [SamplingRow(p, [0], [])]) == [1]


def test_bf16_logits_are_penalized_in_full_precision():
    # bf16 has 1.0 and 1.0078125 as neighbours. Token 1, seen once, drops to 1.0018 and still wins;
    # rounded back to bf16 it would tie with token 0 and argmax would pick token 0.
    logits = torch.tensor([[1.0, 1.0078125]], dtype=torch.bfloat16)
    p = params(presence_penalty=0.006, penalty_mode="vllm")
    assert sample(logits, [SamplingRow(p, [1], [])]) == [1]
