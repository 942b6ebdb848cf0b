"""Causal prefill attention in Triton (flash-attention-2 style), over the paged cache or packed K/V.

Prefill attention is compute bound: a prompt of n tokens does ~n²/2 query·key products per head.
The kernel follows flash-attention 2: a program owns a tile of query rows, keeps it in registers,
and streams the keys and values in tiles of ``BLOCK_N`` through two ``tl.dot`` s with an online
softmax (base 2, fp32 running max / sum / accumulator), so the score matrix never reaches memory.

Layout, and why:

- Inputs are packed: q is [T, Hq, D] with the B sequences back to back (``cu_seqlens_q``, [B + 1]).
  Sequence b's queries are its *last* q_len_b tokens, at absolute positions
  ``context_lens[b] - q_len_b .. context_lens[b] - 1``; the query at position p sees keys 0..p.
  One kernel thus serves fresh prompts (context == q_len) and chunked prefill / cached prefixes
  (context > q_len).
- K/V come from the paged pool ([num_blocks, page, Hkv, D] with ``block_tables``, the layout decode
  reads) or, with the ``PAGED`` constexpr off, straight from the packed k/v [T, Hkv, D] of the batch
  (fresh prompts: no gather through the block table). The kernel body is shared.
- The rows of a tile are (token, query head) pairs: ``HEADS`` query heads of one KV group are packed
  into the rows (row r = token r // HEADS, head r % HEADS), so a short prompt or chunk still fills
  a 64/128-row tile, and each K/V tile loaded serves all the packed heads (GQA). With HEADS == 1
  this is the classic one-head-per-program layout.
- Grid: (query-head groups, query tiles, sequences). Query tiles run in reverse order, so the
  programs with the most keys (late in the sequence) start first and short ones fill the tail.
  Programs past a ragged sequence's end return at once.
- Key tiles entirely at or before the tile's first query position need no mask (loop 1); only the
  last few tiles along the diagonal do (loop 2); tiles past the tile's last query position are never
  visited (causal early stop).
- Masked key slots load 0: pool slots nobody owns may hold anything, NaN included. Every row sees
  key 0, so the running max is finite after the first tile and no row computes exp2(-inf - -inf).
- Token and block offsets are int64: pools can exceed 2^31 elements.

Status (2026-11-24): checked against a float64 reference in Triton's CPU interpreter (fp16 and
fp32; the interpreter's ``tl.dot`` gives garbage for bf16) and compiled for sm_90 without spills;
not yet run on a GPU. ``TritonAttentionBackend.prefill`` uses the packed variant for fresh prompts.
tests/test_triton_prefill.py is the GPU check. Full speed needs 16-element-aligned strides and
16-byte-aligned base pointers (Triton specialises on them at launch; without them the K/V loads are
neither vectorised nor pipelined).

Triton is imported lazily: on a machine without it this module still imports, and the entry points
raise a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adrenaline_py.triton_support import LOG2E as _LOG2E
from adrenaline_py.triton_support import check_triton, tl, triton, triton_available  # noqa: F401
from adrenaline_py.triton_support import next_pow2 as _next_pow2

if triton is not None:

    @triton.jit
    def _prefill_inner(
        acc, l_i, m_i, q,
        k_base, v_base, bt_row,
        stride_kb, stride_kt, stride_vb, stride_vt,
        kv_row0,   # packed mode: row of the sequence's first token in k/v
        lo, hi,    # key range of this loop (lo a multiple of BLOCK_N)
        kv_end,    # keys >= kv_end are never loaded
        row_pos,   # [BLOCK_M] absolute position of each query row
        qk_scale,
        PAGED: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        MASKED: tl.constexpr,  # causal mask and tail mask (diagonal tiles only)
    ):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        if PAGED:
            # The page ids of the next tile are loaded one iteration ahead and carried: an address
            # computed from a load in the same iteration keeps Triton's pipeliner at one buffer.
            tok_next = lo + offs_n
            blk_next = tl.load(bt_row + tok_next // PAGE, mask=tok_next < kv_end, other=0)
        for n0 in range(lo, hi, BLOCK_N):
            tok = n0 + offs_n
            if PAGED:
                blk = blk_next.to(tl.int64)
                tok_next = tok + BLOCK_N
                blk_next = tl.load(bt_row + tok_next // PAGE, mask=tok_next < kv_end, other=0)
                in_page = tok % PAGE
                k_off = blk * stride_kb + in_page * stride_kt
                v_off = blk * stride_vb + in_page * stride_vt
            else:
                row = (kv_row0 + tok).to(tl.int64)
                k_off = row * stride_kt
                v_off = row * stride_vt
            k_ptrs = k_base + k_off[:, None] + offs_d[None, :]
            v_ptrs = v_base + v_off[:, None] + offs_d[None, :]
            if MASKED:
                t_mask = tok < kv_end
                k = tl.load(k_ptrs, mask=t_mask[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=t_mask[:, None], other=0.0)
            else:  # every key of the tile is inside the context: no predicates
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            if MASKED:
                s = tl.where(tok[None, :] <= row_pos[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, cu_q_ptr, ctx_lens_ptr, bt_ptr,
        qk_scale,  # softmax scale * log2(e): the kernel works in base 2
        stride_qt, stride_qh,
        stride_kb, stride_kt, stride_kh,  # paged: [block, slot, head]; packed: stride_kb unused
        stride_vb, stride_vt, stride_vh,
        stride_ot, stride_oh,
        stride_btb,
        G: tl.constexpr,        # query heads per KV head
        HEADS: tl.constexpr,    # query heads packed into one tile's rows (divides G)
        HEAD_DIM: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr,  # rows per tile: BLOCK_M // HEADS tokens x HEADS heads
        BLOCK_N: tl.constexpr,  # keys per inner tile
        PAGED: tl.constexpr,    # K/V from the paged pool (else from packed k/v, context == q_len)
    ):
        TOK: tl.constexpr = BLOCK_M // HEADS
        hg = tl.program_id(0)
        tile = tl.num_programs(1) - 1 - tl.program_id(1)  # longest-running tiles first
        b = tl.program_id(2)
        q_start = tl.load(cu_q_ptr + b).to(tl.int32)
        q_len = tl.load(cu_q_ptr + b + 1).to(tl.int32) - q_start
        t0 = tile * TOK
        if t0 >= q_len:  # ragged batch: this sequence has fewer tiles
            return
        if PAGED:
            ctx = tl.load(ctx_lens_ptr + b).to(tl.int32)
        else:
            ctx = q_len

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        tok_m = t0 + offs_m // HEADS
        head = hg * HEADS + offs_m % HEADS
        row_ok = (offs_m < TOK * HEADS) & (tok_m < q_len)
        row_pos = ctx - q_len + tok_m
        kvh = (hg * HEADS) // G

        q_rows = (q_start + tok_m).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=row_ok[:, None], other=0.0,
        )
        q = q.to(k_ptr.dtype.element_ty)
        k_base = k_ptr + kvh.to(tl.int64) * stride_kh
        v_base = v_ptr + kvh.to(tl.int64) * stride_vh
        bt_row = bt_ptr + b.to(tl.int64) * stride_btb

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        first_pos = ctx - q_len + t0
        kv_end = ctx - q_len + tl.minimum(t0 + TOK, q_len)  # last query position + 1
        full_end = (first_pos + 1) // BLOCK_N * BLOCK_N       # tiles every row sees in full
        acc, l_i, m_i = _prefill_inner(
            acc, l_i, m_i, q, k_base, v_base, bt_row,
            stride_kb, stride_kt, stride_vb, stride_vt,
            q_start, 0, full_end, kv_end, row_pos, qk_scale,
            PAGED=PAGED, PAGE=PAGE, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASKED=False,
        )
        acc, l_i, m_i = _prefill_inner(
            acc, l_i, m_i, q, k_base, v_base, bt_row,
            stride_kb, stride_kt, stride_vb, stride_vt,
            q_start, full_end, kv_end, kv_end, row_pos, qk_scale,
            PAGED=PAGED, PAGE=PAGE, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASKED=True,
        )

        o = acc / l_i[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None],
        )


@dataclass(frozen=True)
class PrefillKernelConfig:
    block_m: int         # rows per program (tokens x packed heads); power of 2, >= 16
    block_n: int         # keys per inner tile; power of 2, >= 16
    num_warps: int
    num_stages: int
    pack_heads: int = 0  # query heads of one KV group packed into a tile's rows (divides Hq/Hkv); 0: auto


def default_pack_heads(group: int, limit: int = 16) -> int:
    """The whole GQA group, or its largest divisor <= limit (keeps a few tokens per 128-row tile)."""
    return max(h for h in range(1, min(group, limit) + 1) if group % h == 0)


def default_prefill_config(
    total_tokens: int, max_q_len: int, num_heads: int, group: int, head_dim: int, num_sms: int = 132
) -> PrefillKernelConfig:
    """Heuristic launch configuration for H100; not yet tuned on a GPU."""
    pack = default_pack_heads(group)
    # No taller tile than the longest sequence fills: short prompts and small chunks waste fewer rows.
    block_m = min(128, max(16, _next_pow2(max_q_len * pack)))
    # About total_tokens * Hq / block_m programs: with 128-row tiles a small batch leaves SMs idle.
    if block_m == 128 and total_tokens * num_heads < 2 * num_sms * 128:
        block_m = 64
    # sm_90 compile (Triton 3.6, bf16, BLOCK_N 64, 3 stages), no spills: 128 rows x D128 with 8 warps
    # (two warpgroups of wgmma) 180 regs, 128 KB smem; D64 with 8 warps 124 regs (4 warps: 243);
    # 64 rows x D128 with 4 warps 223 regs, 112 KB. Below 64 rows tl.dot is mma.sync.
    if head_dim > 128:  # D256 (not in the tests): 8 warps, 32-key tiles, 2 stages compile without spills
        return PrefillKernelConfig(block_m=block_m, block_n=32, num_warps=8, num_stages=2, pack_heads=pack)
    num_warps = 8 if block_m == 128 else 4
    return PrefillKernelConfig(block_m=block_m, block_n=64, num_warps=num_warps, num_stages=3, pack_heads=pack)


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_tables: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor | None,
    max_q_len: int,
    scale: float | None,
    out: torch.Tensor | None,
    config: PrefillKernelConfig | None,
) -> torch.Tensor:
    paged = block_tables is not None
    T, Hq, D = q.shape
    if paged:
        _, page, Hkv, Dk = k.shape
    else:
        page = 1  # unused
        _, Hkv, Dk = k.shape
    if Dk != D or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not paged and k.shape[0] != T:
        raise ValueError(f"packed k/v must have one row per query token: q {T}, k {k.shape[0]}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if D & (D - 1) or D < 16 or page & (page - 1):
        raise ValueError(f"head_dim ({D}) and block size ({page}) must be powers of 2 (head_dim >= 16)")
    if q.stride(2) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("the head dimension of q and of k/v must be contiguous")
    if out is None:
        out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be [T, Hq, D] with a contiguous head dim, got {tuple(out.shape)}")
    B = cu_seqlens_q.shape[0] - 1
    if T == 0 or B <= 0 or max_q_len <= 0:
        return out
    group = Hq // Hkv
    if config is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        config = default_prefill_config(T, max_q_len, Hq, group, D, num_sms)
    heads = config.pack_heads or default_pack_heads(group)
    block_m, block_n = config.block_m, config.block_n
    if group % heads:
        raise ValueError(f"pack_heads ({heads}) must divide the GQA group ({group})")
    if block_m & (block_m - 1) or block_m < 16 or block_m < heads or block_n & (block_n - 1) or block_n < 16:
        raise ValueError(f"block_m ({block_m}) and block_n ({block_n}) must be powers of 2 >= 16 (block_m >= heads)")
    cu_seqlens_q = cu_seqlens_q.contiguous()
    if paged:
        block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
        context_lens = context_lens.contiguous()
        stride_kb, stride_kt, stride_kh = k.stride(0), k.stride(1), k.stride(2)
        stride_vb, stride_vt, stride_vh = v.stride(0), v.stride(1), v.stride(2)
        bt, ctx_lens, stride_btb = block_tables, context_lens, block_tables.stride(0)
    else:  # the unused pointers get a valid tensor; the kernel never reads them
        stride_kb, stride_kt, stride_kh = 0, k.stride(0), k.stride(1)
        stride_vb, stride_vt, stride_vh = 0, v.stride(0), v.stride(1)
        bt, ctx_lens, stride_btb = cu_seqlens_q, cu_seqlens_q, 0
    tok_per_tile = block_m // heads
    grid = (Hq // heads, triton.cdiv(max_q_len, tok_per_tile), B)
    scale = D**-0.5 if scale is None else scale
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens_q, ctx_lens, bt,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        out.stride(0), out.stride(1),
        stride_btb,
        G=group, HEADS=heads, HEAD_DIM=D, PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n, PAGED=paged,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def paged_prefill_attention_triton(
    q: torch.Tensor,             # [T, Hq, D], B sequences back to back
    k_cache: torch.Tensor,       # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,       # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32/int64 (padded)
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32/int64, on q's device: sequence b's queries are q[cu[b]:cu[b+1]]
    context_lens: torch.Tensor,  # [B] int32/int64: all tokens of sequence b (cached prefix + new), >= q_len_b
    max_q_len: int,              # host value >= every q_len_b (the grid is sized from it)
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: PrefillKernelConfig | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's last q_len_b tokens over its paged K/V; returns [T, Hq, D].

    The new tokens' K/V must already be in the cache. Query i of sequence b sits at position
    ``context_lens[b] - q_len_b + i`` and sees keys 0..that position. ``out`` (optional, [T, Hq, D],
    head dim contiguous) receives the result instead of a new tensor.
    """
    check_triton("paged_prefill_attention_triton", q)
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, Hkv, D], got {tuple(k_cache.shape)}")
    return _launch(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_q_len, scale, out, config)


def prefill_attention_triton(
    q: torch.Tensor,             # [T, Hq, D], B prompts back to back
    k: torch.Tensor,             # [T, Hkv, D]
    v: torch.Tensor,             # [T, Hkv, D]
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32/int64, on q's device
    max_q_len: int,              # host value >= every prompt length
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: PrefillKernelConfig | None = None,
) -> torch.Tensor:
    """Causal self-attention of fresh prompts packed back to back, K/V read from the packed k/v."""
    check_triton("prefill_attention_triton", q)
    if k.dim() != 3:
        raise ValueError(f"k must be [T, Hkv, D], got {tuple(k.shape)}")
    return _launch(q, k, v, None, cu_seqlens_q, None, max_q_len, scale, out, config)
