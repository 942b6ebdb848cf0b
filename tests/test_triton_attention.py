"""Triton paged decode attention against a float64 reference (GPU only; skipped on CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from adrenaline_py.attention.base import DecodeMetadata
from adrenaline_py.attention.torch_backend import TorchAttentionBackend
from adrenaline_py.attention.triton_decode import (
    DecodeKernelConfig,
    TritonAttentionBackend,
    paged_decode_attention_triton,
    triton_available,
)

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not triton_available(),
    reason="the Triton decode kernel needs a CUDA GPU and the triton package",
)
pytestmark = [pytest.mark.gpu, needs_gpu]
DEVICE = "cuda"  # a debugging script may point this at "cpu" under TRITON_INTERPRET=1

# bf16 keeps 8 mantissa bits (fp16 keeps 11); P is rounded to the cache dtype before P·V.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_case(
    lens: list[int], hq: int, hkv: int, d: int, page: int, dtype: torch.dtype, gen: torch.Generator,
    poison_unused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q and pool; each sequence's pages are a random (non-contiguous) set of blocks."""
    dev = DEVICE
    nblk = [math.ceil(n / page) for n in lens]
    num_blocks = sum(nblk) + 7  # spare blocks that nobody owns
    k_cache = torch.randn(num_blocks, page, hkv, d, generator=gen, device=dev).to(dtype)
    v_cache = torch.randn(num_blocks, page, hkv, d, generator=gen, device=dev).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen, device=dev)
    tables = torch.zeros(len(lens), max(nblk) + 3, dtype=torch.int64, device=dev)  # padded with 0
    owned = torch.zeros(num_blocks, page, dtype=torch.bool, device=dev)
    pos = 0
    for i, (n, nb) in enumerate(zip(lens, nblk)):
        blocks = perm[pos : pos + nb]
        pos += nb
        tables[i, :nb] = blocks
        slot_ok = torch.arange(nb * page, device=dev) < n
        owned[blocks] = slot_ok.view(nb, page)
    if poison_unused:  # slots past each sequence's end (and spare blocks) hold NaN: the kernel must mask them
        k_cache[~owned] = float("nan")
        v_cache[~owned] = float("nan")
    q = torch.randn(len(lens), hq, d, generator=gen, device=dev).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int64, device=dev)
    return q, k_cache, v_cache, tables, seq_lens


def reference(q, k_cache, v_cache, tables, seq_lens, scale: float) -> torch.Tensor:
    """float64, one sequence at a time."""
    B, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(B, hq, d, dtype=torch.float64, device=q.device)
    for b, n in enumerate(seq_lens.tolist()):
        blocks = tables[b, : math.ceil(n / page)]
        k = k_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(hq // hkv, dim=1)  # [n, Hq, D]
        v = v_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v)
    return out


def run_and_check(lens, hq, hkv, d, page, dtype, seed: int, config: DecodeKernelConfig | None = None) -> float:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k_cache, v_cache, tables, seq_lens = make_case(lens, hq, hkv, d, page, dtype, gen)
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    res = paged_decode_attention_triton(q, k_cache, v_cache, tables, seq_lens, max(lens), scale, config, out=out)
    assert res is out
    ref = reference(q, k_cache, v_cache, tables, seq_lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), "non-finite output (unwritten or unmasked NaN)"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"lens={len(lens)}x(max {max(lens)}) {hq}/{hkv}/{d} page={page} {dtype}: rel err {err:.2e}")
    assert err < TOLERANCE[dtype], f"rel err {err:.3e}"
    return err


def ragged_lens(n: int, max_len: int, page: int, gen: torch.Generator) -> list[int]:
    """Random lengths, with the awkward ones always present: 1, page ± 1, a multiple of page, max."""
    special = [1, page - 1, page, page + 1, 2 * page + 3, max_len]
    rand = torch.randint(1, max_len + 1, (max(0, n - len(special)),), generator=gen).tolist()
    return (special + rand)[:n]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("heads", [(32, 8), (32, 32), (8, 1)], ids=["gqa32-8", "mha32", "gqa8-1"])
@pytest.mark.parametrize("d", [64, 128])
def test_decode_matches_reference(dtype, page, heads, d):
    gen = torch.Generator().manual_seed(page * 7919 + heads[0] * 131 + heads[1] * 17 + d + (dtype == torch.float16))
    lens = ragged_lens(24, 1500, page, gen)
    run_and_check(lens, heads[0], heads[1], d, page, dtype, seed=page * 1000 + d)


@pytest.mark.parametrize(
    "config",
    [
        DecodeKernelConfig(partition=64, block_n=32, num_warps=4, num_stages=2, use_dot=True),
        DecodeKernelConfig(partition=1024, block_n=128, num_warps=8, num_stages=3, use_dot=True),
        DecodeKernelConfig(partition=4096, block_n=64, num_warps=4, num_stages=3, use_dot=True),  # single pass
        DecodeKernelConfig(partition=4096, block_n=32, num_warps=4, num_stages=3, use_dot=True),  # 2-4 per SM
        DecodeKernelConfig(partition=4096, block_n=32, num_warps=2, num_stages=3, use_dot=True),  # >= 4 per SM
        DecodeKernelConfig(partition=256, block_n=32, num_warps=4, num_stages=2, use_dot=False),
    ],
    ids=lambda c: f"p{c.partition}-n{c.block_n}-w{c.num_warps}-s{c.num_stages}-{'dot' if c.use_dot else 'sum'}",
)
@pytest.mark.parametrize("heads", [(32, 8), (32, 32)], ids=["gqa", "mha"])
def test_decode_configs(config, heads):
    gen = torch.Generator().manual_seed(7)
    lens = ragged_lens(16, 3000, 16, gen)
    run_and_check(lens, heads[0], heads[1], 128, 16, torch.bfloat16, seed=11, config=config)


@pytest.mark.parametrize(
    "batch,heads,dtype,page",
    [(256, (32, 8), torch.bfloat16, 16), (64, (32, 32), torch.float16, 32), (256, (32, 8), torch.float16, 32)],
    ids=["256x8k-gqa-bf16-p16", "64x8k-mha-fp16-p32", "256x8k-gqa-fp16-p32"],
)
def test_decode_long_context(batch, heads, dtype, page):
    gen = torch.Generator().manual_seed(batch)
    lens = ragged_lens(batch, 8192, page, gen)
    run_and_check(lens, heads[0], heads[1], 128, page, dtype, seed=batch + page)


def test_decode_uniform_batches_single_sequence():
    for lens in ([1], [8192], [17] * 300, [2048] * 64):
        run_and_check(lens, 32, 8, 128, 16, torch.bfloat16, seed=len(lens))


def test_output_fully_written_over_poison():
    """The kernel allocates its output; check none of it is left over from a poisoned allocation."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    lens = [1, 5, 700, 2049]
    q, k_cache, v_cache, tables, seq_lens = make_case(lens, 32, 8, 128, 16, torch.bfloat16, gen)
    for _ in range(3):  # poison the caching allocator's free blocks with NaN, then call again
        junk = torch.full((q.numel() * 64,), float("nan"), dtype=torch.float32, device="cuda")
        del junk
        out = paged_decode_attention_triton(q, k_cache, v_cache, tables, seq_lens, max(lens))
        assert torch.isfinite(out).all()


def test_backend_decode_matches_torch_backend():
    """store_kv then attend, through the backend interface, on a 2-layer pool."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    layers, num_blocks, page, hkv, hq, d = 2, 64, 16, 8, 32, 128
    kv = torch.randn(layers, 2, num_blocks, page, hkv, d, generator=gen, device="cuda").to(torch.bfloat16)
    lens = [1, 17, 100, 300]
    perm = torch.randperm(num_blocks, generator=gen, device="cuda")
    tables = torch.zeros(len(lens), 20, dtype=torch.int64, device="cuda")
    pos = 0
    for i, n in enumerate(lens):
        nb = math.ceil(n / page)
        tables[i, :nb] = perm[pos : pos + nb]
        pos += nb
    seq_lens = torch.tensor(lens, device="cuda")
    last = seq_lens - 1
    slots = tables.gather(1, (last // page)[:, None])[:, 0] * page + last % page
    q = torch.randn(len(lens), hq, d, generator=gen, device="cuda").to(torch.bfloat16)
    k = torch.randn(len(lens), hkv, d, generator=gen, device="cuda").to(torch.bfloat16)
    v = torch.randn(len(lens), hkv, d, generator=gen, device="cuda").to(torch.bfloat16)
    kv_ref = kv.clone()
    meta = DecodeMetadata(kv=kv, block_tables=tables, seq_lens=seq_lens, slots=slots, max_seq_len=max(lens))
    meta_ref = DecodeMetadata(kv=kv_ref, block_tables=tables, seq_lens=seq_lens, slots=slots, max_seq_len=max(lens))
    out = TritonAttentionBackend().forward(1, q, k, v, meta)
    ref = TorchAttentionBackend().forward(1, q.float(), k.float(), v.float(), meta_ref)
    assert torch.equal(kv, kv_ref), "store_kv wrote differently"
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 1e-2, err
