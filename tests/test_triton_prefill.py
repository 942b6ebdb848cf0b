"""Triton causal prefill attention (paged and packed) against a float64 reference (GPU only; skipped on CPU)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from adrenaline_py.attention.triton_prefill import (
    PrefillKernelConfig,
    paged_prefill_attention_triton,
    prefill_attention_triton,
    triton_available,
)

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not triton_available(),
    reason="the Triton prefill kernel needs a CUDA GPU and the triton package",
)
pytestmark = [pytest.mark.gpu, needs_gpu]
DEVICE = "cuda"  # a debugging script may point this at "cpu" under TRITON_INTERPRET=1

# bf16 keeps 8 mantissa bits (fp16 keeps 11); P is rounded to the cache dtype before P·V.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
BF16, FP16 = torch.bfloat16, torch.float16


@dataclass
class Case:
    q: torch.Tensor             # [T, Hq, D]
    k: torch.Tensor             # [T, Hkv, D] the new tokens' K (also stored in the cache)
    v: torch.Tensor
    k_cache: torch.Tensor       # [num_blocks, page, Hkv, D], NaN where nobody owns the slot
    v_cache: torch.Tensor
    tables: torch.Tensor        # [B, max_blocks], padded with 0
    cu_seqlens: torch.Tensor    # [B + 1]
    context_lens: torch.Tensor  # [B]
    keys: list[torch.Tensor]    # per sequence [ctx, Hkv, D]: every K of the context, for the reference
    values: list[torch.Tensor]


def make_case(
    q_lens: list[int], ctx_lens: list[int], hq: int, hkv: int, d: int, page: int, dtype: torch.dtype,
    gen: torch.Generator, index_dtype: torch.dtype = torch.int64, num_blocks: int | None = None,
) -> Case:
    """Random q and K/V (never zeros); each sequence's pages are a random (non-contiguous) set of blocks.

    Slots past each sequence's end, and spare blocks, hold NaN: the kernel must mask them. With
    ``num_blocks`` the pool has that many blocks and the sequences use its last ones (int64 offsets).
    """
    dev = DEVICE
    assert all(1 <= n <= c for n, c in zip(q_lens, ctx_lens))
    nblk = [math.ceil(c / page) for c in ctx_lens]
    used = sum(nblk)
    num_blocks = used + 7 if num_blocks is None else num_blocks  # spare blocks that nobody owns
    k_cache = torch.full((num_blocks, page, hkv, d), float("nan"), dtype=dtype, device=dev)
    v_cache = torch.full_like(k_cache, float("nan"))
    span = min(num_blocks, used + 7)  # the sequences' blocks are a random subset of the pool's last ``span``
    pick = torch.randperm(span, generator=gen, device=dev) + (num_blocks - span)
    tables = torch.zeros(len(q_lens), max(nblk) + 3, dtype=index_dtype, device=dev)
    keys, values = [], []
    pos = 0
    for i, (c, nb) in enumerate(zip(ctx_lens, nblk)):
        blocks = pick[pos : pos + nb]
        pos += nb
        tables[i, :nb] = blocks.to(index_dtype)
        kk = torch.randn(c, hkv, d, generator=gen, device=dev).to(dtype)
        vv = torch.randn(c, hkv, d, generator=gen, device=dev).to(dtype)
        tok = torch.arange(c, device=dev)
        slots = blocks[tok // page] * page + tok % page
        k_cache.view(-1, hkv, d)[slots] = kk
        v_cache.view(-1, hkv, d)[slots] = vv
        keys.append(kk)
        values.append(vv)
    q = torch.randn(sum(q_lens), hq, d, generator=gen, device=dev).to(dtype)
    k = torch.cat([kk[c - n :] for kk, n, c in zip(keys, q_lens, ctx_lens)])
    v = torch.cat([vv[c - n :] for vv, n, c in zip(values, q_lens, ctx_lens)])
    cu = torch.tensor([0] + q_lens, dtype=index_dtype, device=dev).cumsum(0).to(index_dtype)
    ctx = torch.tensor(ctx_lens, dtype=index_dtype, device=dev)
    return Case(q, k, v, k_cache, v_cache, tables, cu, ctx, keys, values)


def reference(case: Case, scale: float) -> torch.Tensor:
    """float64, one sequence (and a slab of its queries) at a time; query i of a q_len-token sequence
    with context c sits at position c - q_len + i and sees keys 0..that position."""
    q = case.q
    hq = q.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    bounds = case.cu_seqlens.tolist()
    for b, c in enumerate(case.context_lens.tolist()):
        start, end = bounds[b], bounds[b + 1]
        n = end - start
        g = hq // case.keys[b].shape[1]
        kt = case.keys[b].double().repeat_interleave(g, dim=1).permute(1, 2, 0)  # [Hq, D, c]
        v = case.values[b].double().repeat_interleave(g, dim=1).transpose(0, 1)   # [Hq, c, D]
        key_pos = torch.arange(c, device=q.device)
        step = max(1, (1 << 25) // (hq * c))  # keeps the [Hq, step, c] float64 scores small
        for i0 in range(0, n, step):
            i1 = min(n, i0 + step)
            s = q[start + i0 : start + i1].double().transpose(0, 1) @ kt * scale  # [Hq, step, c]
            q_pos = c - n + torch.arange(i0, i1, device=q.device)
            s = s.masked_fill(key_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
            out[start + i0 : start + i1] = (torch.softmax(s, dim=-1) @ v).transpose(0, 1)
    return out


def check(out: torch.Tensor, ref: torch.Tensor, case: Case, label: str) -> float:
    """Relative error ‖out − ref‖/‖ref‖ over the batch and over each sequence (a short one's error
    would vanish in the norm of a long one)."""
    dtype = case.q.dtype
    assert out.shape == case.q.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), f"{label}: non-finite output (unwritten or unmasked NaN)"
    diff = out.double() - ref
    err = (diff.norm() / ref.norm()).item()
    bounds = case.cu_seqlens.tolist()
    seq_err = max((diff[s:e].norm() / ref[s:e].norm()).item() for s, e in zip(bounds[:-1], bounds[1:]))
    print(f"{label}: rel err {err:.2e}, worst sequence {seq_err:.2e}")
    tol = TOLERANCE[dtype]
    assert err < tol and seq_err < tol, f"{label}: rel err {err:.3e}, worst sequence {seq_err:.3e}"
    return seq_err


def run_paged(case: Case, max_q_len: int, config: PrefillKernelConfig | None = None, label: str = "") -> torch.Tensor:
    d = case.q.shape[2]
    scale = d**-0.5
    out = torch.full_like(case.q, float("nan"))  # poisoned: every element must be written
    res = paged_prefill_attention_triton(
        case.q, case.k_cache, case.v_cache, case.tables, case.cu_seqlens, case.context_lens, max_q_len,
        scale, out=out, config=config,
    )
    assert res is out
    check(out, reference(case, scale), case, f"paged {label}")
    return out


def run_packed(case: Case, max_q_len: int, config: PrefillKernelConfig | None = None, label: str = "") -> torch.Tensor:
    assert torch.equal(case.cu_seqlens[1:] - case.cu_seqlens[:-1], case.context_lens), "fresh prompts only"
    d = case.q.shape[2]
    scale = d**-0.5
    out = torch.full_like(case.q, float("nan"))
    res = prefill_attention_triton(case.q, case.k, case.v, case.cu_seqlens, max_q_len, scale, out=out, config=config)
    assert res is out
    check(out, reference(case, scale), case, f"packed {label}")
    return out


FRESH_LENS = [1, 7, 16, 100, 513, 2, 64, 65, 300, 31]
# (q_len, context): a one-token chunk, chunks ending on / just past a page, chunks longer than the
# cached prefix, and long prefixes.
CHUNKS = [(1, 1), (1, 17), (5, 16), (16, 48), (7, 300), (100, 613), (200, 1000), (513, 1300), (33, 97), (64, 64)]


@pytest.mark.parametrize(
    "hq,hkv,d,dtype,page",
    [(32, 8, 128, BF16, 16), (32, 32, 128, FP16, 32), (9, 3, 64, BF16, 32), (9, 3, 64, FP16, 16)],
    ids=["gqa32-8-d128-bf16-p16", "mha32-d128-fp16-p32", "smollm2-9-3-d64-bf16-p32", "smollm2-9-3-d64-fp16-p16"],
)
def test_fresh_prompts(hq, hkv, d, dtype, page):
    """Brand-new prompts of ragged lengths: packed k/v and the paged cache give the reference (and agree)."""
    gen = torch.Generator(device=DEVICE).manual_seed(hq * 131 + d + page)
    case = make_case(FRESH_LENS, FRESH_LENS, hq, hkv, d, page, dtype, gen, index_dtype=torch.int32)
    label = f"fresh {hq}/{hkv}/{d} p{page} {dtype}"
    packed = run_packed(case, max(FRESH_LENS), label=label)
    paged = run_paged(case, max(FRESH_LENS), label=label)
    tol = TOLERANCE[dtype]
    assert ((packed.double() - paged.double()).norm() / paged.double().norm()).item() < tol


@pytest.mark.parametrize(
    "hq,hkv,d,dtype,page",
    [(32, 8, 128, FP16, 32), (32, 32, 128, BF16, 16), (9, 3, 64, FP16, 32), (9, 3, 64, BF16, 16)],
    ids=["gqa32-8-d128-fp16-p32", "mha32-d128-bf16-p16", "smollm2-9-3-d64-fp16-p32", "smollm2-9-3-d64-bf16-p16"],
)
def test_chunked_prefill(hq, hkv, d, dtype, page):
    """The last q_len tokens of each sequence attend to a cached prefix plus themselves."""
    gen = torch.Generator(device=DEVICE).manual_seed(hq * 7 + d + page)
    q_lens, ctx_lens = (list(x) for x in zip(*CHUNKS))
    case = make_case(q_lens, ctx_lens, hq, hkv, d, page, dtype, gen)
    run_paged(case, max(q_lens) + 5, label=f"chunked {hq}/{hkv}/{d} p{page} {dtype}")  # a loose max_q_len is fine


@pytest.mark.parametrize(
    "config",
    [
        PrefillKernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=2, pack_heads=1),
        PrefillKernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, pack_heads=1),
        PrefillKernelConfig(block_m=128, block_n=128, num_warps=8, num_stages=2, pack_heads=2),
    ],
    ids=lambda c: f"m{c.block_m}-n{c.block_n}-w{c.num_warps}-s{c.num_stages}-h{c.pack_heads}",
)
def test_configs(config):
    gen = torch.Generator(device=DEVICE).manual_seed(config.block_m + config.block_n)
    q_lens, ctx_lens = (list(x) for x in zip(*CHUNKS))
    case = make_case(q_lens, ctx_lens, 32, 8, 128, 16, BF16, gen)
    run_paged(case, max(q_lens), config, label=str(config))


def test_large_batch_long_context():
    """16 sequences up to 8K context, half fresh prompts and half chunks of a cached prefix."""
    gen = torch.Generator().manual_seed(16)
    ctx_lens = [8192, 1, 4099, 8000] + torch.randint(1, 8193, (12,), generator=gen).tolist()
    q_lens = [c if i % 2 == 0 else max(1, c // (2 + i % 5)) for i, c in enumerate(ctx_lens)]
    gen = torch.Generator(device=DEVICE).manual_seed(17)
    case = make_case(q_lens, ctx_lens, 32, 8, 128, 16, BF16, gen, index_dtype=torch.int32)  # compiled above
    run_paged(case, max(q_lens), label="16 seqs to 8K, 32/8/128 bf16")


def test_large_fresh_packed():
    gen = torch.Generator().manual_seed(8)
    lens = [8192, 1, 3000] + torch.randint(1, 4097, (5,), generator=gen).tolist()
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    case = make_case(lens, lens, 32, 8, 128, 16, BF16, gen, index_dtype=torch.int32)  # compiled above
    run_packed(case, max(lens), label="8 prompts to 8K, 32/8/128 bf16")


def test_pool_beyond_int32_elements():
    """Blocks past 2^31 elements of the pool: the kernel's offsets must be int64."""
    page, hkv, d = 16, 8, 128
    num_blocks = (1 << 31) // (page * hkv * d) + 64  # ~4.3 GB each for K and V in bf16
    q_lens, ctx_lens = [300, 1, 40], [700, 33, 40]
    gen = torch.Generator(device=DEVICE).manual_seed(31)
    case = make_case(q_lens, ctx_lens, 32, hkv, d, page, BF16, gen, num_blocks=num_blocks)
    assert case.tables.max().item() * page * hkv * d >= 1 << 31
    config = PrefillKernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, pack_heads=1)  # as test_configs
    run_paged(case, max(q_lens), config, label="pool > 2^31 elements")


def test_empty_and_default_out():
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    case = make_case([3, 20], [10, 20], 4, 2, 64, 16, FP16, gen)
    empty_q = case.q[:0]
    out = paged_prefill_attention_triton(
        empty_q, case.k_cache, case.v_cache, case.tables[:0], case.cu_seqlens[:1], case.context_lens[:0], 0
    )
    assert out.shape == (0, 4, 64)
    out = paged_prefill_attention_triton(
        case.q, case.k_cache, case.v_cache, case.tables, case.cu_seqlens, case.context_lens, 20
    )  # default scale and a freshly allocated output
    check(out, reference(case, 64**-0.5), case, "default out")
