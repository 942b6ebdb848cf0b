"""The one sampler: logits processing (min tokens, bad words, repetition / presence / frequency
penalties), greedy, temperature, min-p, top-k, top-p.

Vectorized: the whole batch is processed with batched tensor ops on the logits' device and the
chosen tokens come back to the host in one transfer; no per-row loop touches the logits.

Randomness is reproducible per request and independent of batching, of the row's position and of
which process samples (prefill samples a request's first token, decode the rest): output token
``i`` of a request is the Gumbel-max choice ``argmax(scores + g)``, where the noise ``g`` of each
vocabulary entry is a pure integer hash of ``(seed, i, token id)`` (counter-based: no generator
state), so a request draws the same token whatever else is in its batch, on CPU and GPU alike.
Gumbel-max picks token t with probability softmax(scores)[t], i.e. exactly the categorical draw.

Min-p, top-k and top-p become one threshold per row (the score of the last token kept), so no
[B, V] index is scattered back. One sort of the values gives it (`sort_threshold`); on CUDA, for
vocabularies of `sampler_kernels.RADIX_MIN_VOCAB` entries or more, Triton kernels find it instead by
a radix search over the logits, with no sort and no [B, V] copy. On CUDA one kernel then makes the
noise and takes the argmax in one pass (`gumbel_argmax`); elsewhere torch makes the [B, V] noise
(`gumbel_noise`), with the same integer hash.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adrenaline_py import sampler_kernels
from adrenaline_py.request import SamplingParams
from adrenaline_py.triton_support import runs_triton

_M32 = 0xFFFFFFFF
_fused = {"ok": True}  # cleared if the CUDA kernel ever fails to build
log = logging.getLogger(__name__)


@dataclass
class SamplingRow:
    params: SamplingParams
    output_ids: list[int]   # tokens generated so far (the row samples token len(output_ids))
    prompt_ids: Sequence[int] = ()  # read only by the penalties
    # Tokens generated so far when ``output_ids`` lags behind (decode's overlapped steps: the last
    # token is still on the GPU); only rows that need no history (`needs_history`) may lag.
    num_output: int | None = None

    @property
    def index(self) -> int:
        """Which output token of its request the row samples."""
        return len(self.output_ids) if self.num_output is None else self.num_output


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the GPU: a copy from pageable memory
    waits for the stream's earlier work (the step in flight); from pinned memory it is queued."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def needs_history(params: SamplingParams) -> bool:
    """Whether sampling reads the tokens generated so far on the host (penalties, bad words);
    min_tokens needs only their count."""
    return params.has_penalties or bool(params.bad_words_ids)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32, in int64 without overflow (16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32): nearby inputs give unrelated outputs."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


_TOKEN_HASHES: dict[tuple[int, str], torch.Tensor] = {}


def _token_hashes(vocab: int, device: torch.device) -> torch.Tensor:
    """The per-token half of the noise's key, computed once per vocabulary size and device."""
    key = (vocab, str(device))
    if key not in _TOKEN_HASHES:
        _TOKEN_HASHES[key] = _hash32(_mul32(torch.arange(vocab, device=device, dtype=torch.int64), 0x2545F491))
    return _TOKEN_HASHES[key]


def _row_keys(seeds: list[int], indices: list[int]) -> torch.Tensor:
    """[B] int64 (< 2**32): the per-row half of the noise's key, from (seed, output index)."""
    lo = torch.tensor([s & _M32 for s in seeds], dtype=torch.int64)
    hi = torch.tensor([(s >> 32) & _M32 for s in seeds], dtype=torch.int64)
    idx = torch.tensor([i & _M32 for i in indices], dtype=torch.int64)
    return _hash32(lo) ^ _hash32(hi ^ 0x85EBCA6B) ^ _hash32(idx + 0x9E3779B9)


def gumbel_noise(seeds: list[int], indices: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32 Gumbel noise, a pure function of each row's (seed, output index) and the token id."""
    return _noise_of(_row_keys(seeds, indices).to(device), vocab)


def _noise_of(key: torch.Tensor, vocab: int) -> torch.Tensor:
    """`gumbel_noise` from the rows' keys (`_row_keys`, on the noise's device)."""
    tok = _token_hashes(vocab, key.device)
    return -torch.log(-torch.log(uniform_of(_hash32(key[:, None] ^ tok[None, :]))))


def uniform_of(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hashes → float32 uniforms strictly inside (0, 1): the top 23 bits, centred in their
    cell. (With 24, the top cell's centre 2**24 - 0.5 rounds to 2**24 in float32: u = 1, noise
    +inf, and that token would win whatever its score, even -inf.) The kernel computes the same."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def _banned_tokens(row: SamplingRow) -> list[int]:
    p = row.params
    banned: list[int] = []
    if row.index < p.min_tokens:
        banned.extend(p.end_ids)
    for word in p.bad_words_ids:
        prefix = list(word[:-1])
        if not prefix or row.output_ids[-len(prefix):] == prefix:
            banned.append(word[-1])
    return banned


def _token_counts(lists: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(lists), vocab] fp32: how often each token occurs in each list."""
    counts = torch.zeros(len(lists), vocab, dtype=torch.float32, device=device)
    row = torch.tensor([r for r, ids in enumerate(lists) for _ in ids], dtype=torch.int64)
    if row.numel():
        tok = torch.tensor([t for ids in lists for t in ids], dtype=torch.int64)
        counts.index_put_((row.to(device), tok.to(device)), torch.ones(len(tok), device=device), accumulate=True)
    return counts


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition, presence and frequency penalties of the rows that ask for them (batched).

    Two conventions (``SamplingParams.penalty_mode``), as the entry model's backend does it:

    - ``"trtllm"`` (TensorRT-LLM's penalty kernel): the logits are divided by the temperature
      first, then penalized; all three penalties count prompt and output tokens together.
    - ``"vllm"`` (vLLM's sampler): penalized first, then divided by the temperature; repetition
      counts prompt and output, presence and frequency count the output only.

    Repetition divides a seen token's positive logit by the penalty and multiplies a negative one;
    presence subtracts the penalty once per seen token; frequency once per occurrence. A greedy
    row (temperature 0) is penalized without a temperature. The returned rows are in the scale
    that the temperature step then divides (a "trtllm" row is multiplied back by its temperature),
    so greedy and sampled rows go on as without penalties.
    """
    idx = [i for i, row in enumerate(rows) if row.params.has_penalties]
    if not idx:
        return logits
    dev, vocab = logits.device, logits.shape[-1]
    ps = [rows[i].params for i in idx]
    out_n = _token_counts([rows[i].output_ids for i in idx], vocab, dev)
    prompt_n = _token_counts([rows[i].prompt_ids for i in idx], vocab, dev)

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).to(dev)[:, None]

    trt = [p.penalty_mode == "trtllm" for p in ps]
    pre = column([p.temperature if t and p.temperature > 0 else 1.0 for p, t in zip(ps, trt)])
    rep = column([p.repetition_penalty for p in ps])
    scores = logits[idx].float() / pre
    scores = torch.where(out_n + prompt_n > 0, torch.where(scores > 0, scores / rep, scores * rep), scores)
    n = out_n + prompt_n * column([float(t) for t in trt])
    scores = scores - column([p.presence_penalty for p in ps]) * (n > 0) - column([p.frequency_penalty for p in ps]) * n
    # Full precision for every row from here: a penalized row written back into bf16 logits would
    # lose the small differences the penalties make.
    out = logits.to(torch.float32, copy=True)
    out[torch.tensor(idx, dtype=torch.int64).to(dev)] = scores * pre
    return out


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """logits: [B, V] (any float dtype) for the rows' next tokens → one token id per row (`choose`,
    then one host transfer for the whole batch)."""
    return choose(logits, rows).tolist()


def choose(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The rows' next tokens, [B] int64 on the logits' device (nothing waits for the GPU).

    Greedy rows take the argmax in the logits' own dtype (exact: widening to fp32 changes no order);
    sampled rows are widened to fp32 together.
    """
    banned = [(i, t) for i, row in enumerate(rows) for t in _banned_tokens(row)]
    if banned:
        logits = logits.clone()  # banning writes -inf: never into the caller's tensor
        where = to_device(torch.tensor(banned, dtype=torch.int64), logits.device)
        logits[where[:, 0], where[:, 1]] = float("-inf")
    logits = _apply_penalties(logits, rows)
    sampled = [i for i, row in enumerate(rows) if not row.params.is_greedy]
    choice = logits.argmax(dim=-1)
    if sampled:
        if len(sampled) == len(rows):
            choice = _sample_rows(logits, rows)
        else:
            idx = to_device(torch.tensor(sampled, dtype=torch.int64), logits.device)
            choice[idx] = _sample_rows(logits[idx], [rows[i] for i in sampled])
    return choice


def _sample_rows(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """[S, V] logits of sampled rows (any float dtype) → [S] token ids: temperature, min-p, top-k,
    top-p, Gumbel-max."""
    dev, vocab = logits.device, logits.shape[-1]
    ps = [r.params for r in rows]
    cut_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in ps]
    keys = _row_keys([p.seed for p in ps], [r.index for r in rows])
    # Every per-row setting in one host-to-device copy (a copy from pageable memory waits for the
    # stream; float64 holds each value exactly, the 32-bit keys and top-k included).
    settings = torch.tensor([[p.temperature, p.min_p, p.top_p, k] for p, k in zip(ps, cut_k)], dtype=torch.float64)
    on_dev = to_device(torch.cat([settings, keys[:, None].double()], dim=1), dev)
    temps, min_p, top_p = (on_dev[:, i].float().contiguous() for i in range(3))
    k, keys = on_dev[:, 3].long(), on_dev[:, 4].long().contiguous()
    any_min_p, any_k, any_p = any(p.min_p > 0 for p in ps), min(cut_k) < vocab, min(p.top_p for p in ps) < 1.0
    on_gpu = runs_triton(logits) and _fused["ok"]
    if on_gpu and vocab >= sampler_kernels.RADIX_MIN_VOCAB:
        try:
            threshold = None
            if any_min_p or any_k or any_p:
                threshold = sampler_kernels.cut_threshold(logits, temps, torch.log(min_p) if any_min_p else None,
                                                          k if any_k else None, top_p if any_p else None)
            return sampler_kernels.gumbel_argmax(logits, keys, threshold, temps)
        except Exception as e:  # a kernel that does not build here: the torch path draws the same tokens
            on_gpu = _kernels_failed(e)
    scores = logits.float() / temps[:, None]
    if any_min_p:
        # min-p first, as vLLM's sampler: drop tokens less likely than min_p x the most likely one
        # (a score under the row's best + log(min_p)); top-k and top-p then see what is left
        floor = scores.max(dim=-1).values + torch.log(min_p)  # log(0) = -inf: no cut
        scores = scores.masked_fill(scores < floor[:, None], float("-inf"))
    threshold = sort_threshold(scores, k, top_p if any_p else None) if any_k or any_p else None
    if on_gpu:
        try:
            return sampler_kernels.gumbel_argmax(scores, keys, threshold)
        except Exception as e:
            _kernels_failed(e)
    if threshold is not None:
        scores = scores.masked_fill(scores < threshold[:, None], float("-inf"))
    return (scores + _noise_of(keys, vocab)).argmax(-1)


def warm_up(vocab: int, dtype: torch.dtype, device: torch.device) -> None:
    """Run each CUDA sampling path once: every combination of min-p, top-k and top-p, and a batch
    mixing greedy and sampled rows. Their Triton kernels are then compiled and loaded at start-up,
    not when the first sampled request comes: a first launch compiles for seconds while the decode
    loop waits, and loading a kernel may synchronize the CUDA context, which hangs a process where
    decode and the executor share one (engine/local.py). Does nothing where the kernels do not run;
    a failure is logged, never raised (`choose` falls back to torch by itself)."""
    try:
        if not (_fused["ok"] and runs_triton(torch.empty(0, device=device))):
            return
        logits = torch.randn(2, vocab, device=device).to(dtype)
        for min_p, top_k, top_p in itertools.product((0.0, 0.05), (0, 50), (1.0, 0.9)):
            params = SamplingParams(max_tokens=2, temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p)
            choose(logits, [SamplingRow(params, []), SamplingRow(params, [1])])
        choose(logits, [SamplingRow(SamplingParams(max_tokens=2), []),
                        SamplingRow(SamplingParams(max_tokens=2, temperature=0.8), [])])
    except Exception:
        log.exception("sampler warm-up failed")


def _kernels_failed(e: Exception) -> bool:
    """Use the torch path from now on (it draws the same tokens); False, for ``on_gpu``."""
    _fused["ok"] = False
    log.warning("sampler: the CUDA sampling kernels failed (%s: %s); using the torch path", type(e).__name__, e)
    return False


def sort_threshold(scores: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor | None) -> torch.Tensor:
    """[S] each row's lowest kept score, from one batched sort of the values: keep each row's top
    ``k``, then the smallest prefix whose mass (renormalised over the top k) reaches ``top_p``;
    always at least the best token. What is kept is every token scoring at least the last kept one
    (ties at that score are all kept). The CUDA path finds the same threshold without sorting
    (`sampler_kernels.cut_threshold`)."""
    vocab = scores.shape[-1]
    ordered = torch.sort(scores, dim=-1, descending=True).values
    kept = k
    if top_p is not None:
        probs = ordered.masked_fill(torch.arange(vocab, device=scores.device)[None, :] >= k[:, None], float("-inf"))
        probs = probs.softmax(-1)
        inside = ((probs.cumsum(-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1.0)  # a prefix; 1: no cut
        kept = torch.minimum(k, inside.sum(-1))
    return ordered.gather(1, (kept.clamp(min=1) - 1)[:, None]).squeeze(1)

