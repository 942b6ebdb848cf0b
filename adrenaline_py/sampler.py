"""The one sampler: logits processing (min tokens, bad words), greedy, temperature, top-k, top-p.

Randomness is reproducible per request and independent of batching and of which process samples
(prefill samples a request's first token, decode the rest): output token ``i`` of a request is
drawn with a generator seeded from ``(seed, i)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adrenaline_py.request import SamplingParams

_MASK_64 = (1 << 64) - 1


@dataclass
class SamplingRow:
    params: SamplingParams
    output_ids: list[int]   # tokens generated so far (the row samples token len(output_ids))


def _row_seed(seed: int, index: int) -> int:
    # splitmix64 of (seed, index): nearby seeds and indices give unrelated streams.
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK_64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _banned_tokens(row: SamplingRow) -> list[int]:
    p = row.params
    banned: list[int] = []
    if len(row.output_ids) < p.min_tokens:
        banned.extend(p.end_ids)
    for word in p.bad_words_ids:
        prefix = list(word[:-1])
        if not prefix or row.output_ids[-len(prefix):] == prefix:
            banned.append(word[-1])
    return banned


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """logits: [B, V] (any float dtype) for the rows' next tokens → one token id per row.

    Greedy rows take the argmax in the logits' own dtype (exact: widening to fp32 changes no order),
    so a greedy batch costs one pass over the logits; sampled rows are widened to fp32 one by one.
    """
    banned = {i: b for i, row in enumerate(rows) if (b := _banned_tokens(row))}
    if banned:
        logits = logits.clone()  # banning writes -inf: never into the caller's tensor
        for i, b in banned.items():
            logits[i, b] = float("-inf")
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for i, row in enumerate(rows):
        p = row.params
        if p.is_greedy:
            out.append(greedy[i])
            continue
        out.append(_sample_row(logits[i].float(), p, len(row.output_ids)))
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, index: int) -> int:
    scores = logits / p.temperature
    if p.top_k > 0 and p.top_k < scores.shape[-1]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = probs.cumsum(-1) - probs >= p.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = scores.softmax(-1)
    gen = torch.Generator(device="cpu").manual_seed(_row_seed(p.seed, index))
    return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())
