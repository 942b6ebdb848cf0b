"""Paged decode attention in Triton (flash-decoding), and the backend that uses it.

Decode attention is memory bound: each step reads every context token's K and V once and does
a few FLOPs per byte. The kernel is laid out so that every byte of the pool is read once:

- one program per (sequence, KV head, partition of the context); all query heads that share the
  KV head (GQA group, padded to 16 rows for ``tl.dot``) are processed together, so each K/V page
  is read once per KV head, not once per query head;
- the context is split into partitions so that small batches still fill the GPU's SMs; each
  partition writes a normalised partial output and its log-sum-exp, and a small second kernel
  merges them. When the whole context fits one partition the first kernel writes the output
  directly and the second is skipped.

Status (2026-11-23): passes tests/test_triton_attention.py (float64 reference) on an H100 and
serves decode on GPUs; 0.84-1.0 of the measured copy bandwidth at batch >= 64 (docs/performance.md).

Triton is imported lazily: on a machine without it (the CPU serving path) this module still
imports, and ``paged_decode_attention_triton`` raises a clear error.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from adrenaline_py.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    DecodeMetadata,
    PrefillMetadata,
    store_kv,
)
from adrenaline_py.attention.torch_backend import TorchAttentionBackend
from adrenaline_py.triton_support import LOG2E as _LOG2E
from adrenaline_py.triton_support import check_triton, tl, triton, triton_available  # noqa: F401
from adrenaline_py.triton_support import next_pow2 as _next_pow2

if triton is not None:

    @triton.jit
    def _paged_decode_partial_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
        qk_scale,  # softmax scale * log2(e): the kernel works in base 2
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_btb,
        stride_ob, stride_oh,
        max_parts,
        G: tl.constexpr,          # query heads per KV head
        BLOCK_H: tl.constexpr,    # G padded (power of 2; >= 16 when USE_DOT)
        HEAD_DIM: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_N: tl.constexpr,    # tokens per inner tile
        PARTITION: tl.constexpr,  # tokens per program (multiple of BLOCK_N)
        SINGLE: tl.constexpr,     # one partition covers every sequence: write the output directly
        USE_DOT: tl.constexpr,    # tensor-core dots, or fp32 broadcast-and-sum (an option for G == 1)
    ):
        # KV head is the fastest grid axis: the programs of all heads of one (sequence, partition)
        # run side by side and together read whole token rows ([Hkv, D] contiguous) of each page.
        kvh = tl.program_id(0)
        b = tl.program_id(1)
        part = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
        start = part * PARTITION
        if start >= seq_len:  # ragged batch: this sequence has fewer partitions
            return
        end = tl.minimum(start + PARTITION, seq_len)

        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        h_mask = offs_h < G
        q_heads = kvh * G + offs_h
        q = tl.load(
            q_ptr + b * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :],
            mask=h_mask[:, None], other=0.0,
        )
        k_base = k_ptr + kvh * stride_kh
        v_base = v_ptr + kvh * stride_vh
        bt_row = bt_ptr + b * stride_btb
        if USE_DOT:
            q = q.to(k_ptr.dtype.element_ty)
        else:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)

        # The page ids of the next tile are loaded one iteration ahead and carried: a K/V address
        # computed from a load in the same iteration (an indirect load) keeps Triton's pipeliner
        # at one shared-memory buffer, while a carried one lets it keep num_stages - 1 tiles in flight.
        tok_next = start + offs_n
        blk_next = tl.load(bt_row + tok_next // PAGE, mask=tok_next < end, other=0)
        # Every tile has at least one valid token (the loop stops at seq_len), so m_i is finite
        # after the first tile and no row computes exp2(-inf - -inf).
        for n0 in range(start, end, BLOCK_N):
            tok = n0 + offs_n
            t_mask = tok < end
            blk = blk_next.to(tl.int64)  # int64 offsets: pools can exceed 2^31 elements
            tok_next = tok + BLOCK_N
            blk_next = tl.load(bt_row + tok_next // PAGE, mask=tok_next < end, other=0)
            in_page = tok % PAGE
            # Masked slots load 0: the pool's unused slots may hold anything, NaN included.
            k = tl.load(
                k_base + blk[:, None] * stride_kb + in_page[:, None] * stride_kt + offs_d[None, :],
                mask=t_mask[:, None], other=0.0,
            )
            v = tl.load(
                v_base + blk[:, None] * stride_vb + in_page[:, None] * stride_vt + offs_d[None, :],
                mask=t_mask[:, None], other=0.0,
            )
            if USE_DOT:
                s = tl.dot(q, tl.trans(k))
            else:
                s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
            s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if USE_DOT:
                pv = tl.dot(p.to(v.dtype), v)
            else:
                pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        o = acc / l_i[:, None]
        if SINGLE:
            tl.store(
                out_ptr + b * stride_ob + q_heads[:, None] * stride_oh + offs_d[None, :],
                o.to(out_ptr.dtype.element_ty), mask=h_mask[:, None],
            )
        else:
            # part_o is [B, Hq, max_parts, D] and part_lse [B, Hq, max_parts], both contiguous.
            row = (b * (G * tl.num_programs(0)) + q_heads).to(tl.int64) * max_parts + part
            tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=h_mask[:, None])
            tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=h_mask)

    @triton.jit
    def _paged_decode_reduce_kernel(
        part_o_ptr, part_lse_ptr, seq_lens_ptr, out_ptr,
        stride_ob, stride_oh,
        max_parts,
        HEAD_DIM: tl.constexpr,
        PARTITION: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        num_heads = tl.num_programs(1)
        seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
        num_parts = tl.cdiv(seq_len, PARTITION)
        row0 = (b * num_heads + h).to(tl.int64) * max_parts
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, HEAD_DIM)

        # Pass 1: the largest log-sum-exp; pass 2: the weighted sum (partials are normalised).
        m_vec = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
        for p0 in range(0, num_parts, BLOCK_P):
            p_mask = p0 + offs_p < num_parts
            lse = tl.load(part_lse_ptr + row0 + p0 + offs_p, mask=p_mask, other=float("-inf"))
            m_vec = tl.maximum(m_vec, lse)
        m = tl.max(m_vec, axis=0)

        w_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for p0 in range(0, num_parts, BLOCK_P):
            p_mask = p0 + offs_p < num_parts
            lse = tl.load(part_lse_ptr + row0 + p0 + offs_p, mask=p_mask, other=float("-inf"))
            w = tl.exp2(lse - m)
            o = tl.load(
                part_o_ptr + (row0 + p0 + offs_p)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=p_mask[:, None], other=0.0,
            )
            acc += tl.sum(w[:, None] * o, axis=0)
            w_sum += w
        out = acc / tl.sum(w_sum, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


if triton is not None:

    @triton.jit
    def _store_kv_kernel(
        k_ptr, v_ptr, slots_ptr, k_cache_ptr, v_cache_ptr, stride_kt, stride_vt, stride_cache_slot,
        ROW: tl.constexpr, BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        if slot < 0:  # a padding row of a CUDA-graph batch: it owns no slot
            return
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        tl.store(k_cache_ptr + slot * stride_cache_slot + offs, tl.load(k_ptr + t * stride_kt + offs, mask=mask),
                 mask=mask)
        tl.store(v_cache_ptr + slot * stride_cache_slot + offs, tl.load(v_ptr + t * stride_vt + offs, mask=mask),
                 mask=mask)


def store_kv_triton(kv: torch.Tensor, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """`store_kv` in one kernel for k and v; rows whose slot is negative are skipped (graph padding)."""
    _, _, num_blocks, page, hkv, d = kv.shape
    if k.shape[0] == 0:
        return
    if k.stride(1) != d or k.stride(2) != 1 or v.stride(1) != d or v.stride(2) != 1 or k.dtype != kv.dtype:
        raise ValueError("store_kv_triton needs rows of [Hkv, D] contiguous and in the cache dtype")
    k_cache, v_cache = kv[layer, 0], kv[layer, 1]
    row = hkv * d
    _store_kv_kernel[(k.shape[0],)](
        k, v, slots, k_cache, v_cache, k.stride(0), v.stride(0), k_cache.stride(1),
        ROW=row, BLOCK=_next_pow2(row), num_warps=4,
    )


def sm_count(device: torch.device) -> int:
    """SMs this process may run on. Under MPS the driver already reports the client's share
    (measured on an H200: 38 of 132 at ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=30``), so the
    executor's grid is sized for the SMs it actually gets."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class DecodeKernelConfig:
    partition: int   # tokens per program; multiple of block_n
    block_n: int     # tokens per inner tile
    num_warps: int
    num_stages: int
    use_dot: bool    # tensor-core dots (cp.async-pipelined loads); False: fp32 broadcast-and-sum


def default_config(
    batch: int, num_kv_heads: int, group: int, head_dim: int, page: int, max_seq_len: int, num_sms: int = 132
) -> DecodeKernelConfig:
    """Launch configuration from sweeps on an H100 (`tools/bench_attention.py --sweep`, 2026-11-23)
    and an H200 at every MPS share from 10 to 100 % (`adrenaline profile`, 2026-11-30).

    At batch >= 64 (contexts 1K-4K, GQA 32/8 and MHA 32/32, head dim 128) the best was one
    partition per (sequence, KV head): splitting the context only added partial-output traffic and
    the merge kernel once batch x KV heads >= 128 programs. On the H200 (2026-11-30) 64-token tiles,
    4 warps, 3 stages were best or within 2 % of it at every share from four programs per SM (3-10 %
    over 32-token tiles at 4 warps; the H100 sweep had preferred 32); with two to four, 32-token tiles
    are (H200 sweep, 2026-12-01). Superseding the first: from four per SM, 32-token tiles at 2 warps
    (not swept before) are as fast as 64-token tiles at 4 warps at 1K-4K contexts and up to 1.5 x
    faster at short ones, where a program's chain of dependent loads, not bandwidth, sets its time
    (the grid is sized for the longest context the server allows, so every step of a batch, short or
    long, runs this configuration; H200 sweeps, 2026-12-01, thirteenth session); except for GQA
    beyond 24 programs per SM, where 64-token tiles stay 2-3 % faster at 1K-4K, and pages longer
    than 32 tokens (not swept at 2 warps).
    The context is split only when there are too few (sequence, KV head) pairs
    to occupy the SMs (batch 16 at 4K ran 1.4x slower unsplit than split in 512-token
    partitions); ``num_sms`` is what this process gets (its MPS share).
    """
    block_n = max(64, page)
    pairs = batch * num_kv_heads
    partition = 1 << max(0, (max_seq_len - 1).bit_length())  # one partition covers every sequence
    if pairs < 2 * num_sms:
        # Too few programs for two waves: split the context so that there are about four, but keep
        # partitions long (>= 1024 tokens once there is about one program per two SMs already).
        min_partition = 1024 if 2 * pairs >= num_sms else 256
        partition = min(partition, max(min_partition, _next_pow2(math.ceil(max_seq_len * pairs / (4 * num_sms)))))
    num_warps = 4
    if pairs < 2 * num_sms:
        # Few, long programs: wider tiles and more warps per program keep more loads in flight
        # (sweep at batch 1-16: +25% at batch 16 / 1K, +35% at batch 4 / 4K over 32-token tiles, 4 warps).
        block_n, num_warps = max(64, page), 8
    elif pairs < 4 * num_sms:
        # Two to four programs per SM: 32-token tiles (H200 sweep, 2026-12-01: llama-3.1-8b at batch 64
        # 0.82 of copy against 0.69 with 64-token tiles at 1K, 1.00 against 0.80 at 4K; llama-2-7b at
        # batch 16 / 2K +4 %).
        block_n = max(32, page)
    elif page <= 32 and (group == 1 or pairs < 24 * num_sms):
        # Four or more per SM: 32-token tiles, 2 warps (llama-2-7b at 544 rows: 119 against 178 µs per
        # layer at 16 tokens of context, 169 against 197 at 64, equal at 384-1024; batch 64-272 at 1K-4K:
        # 0.97-1.005 x the time of 64-token tiles at 4 warps; llama-3.1-8b at 128 / 256 rows: 0.95-0.97 x).
        block_n, num_warps = max(32, page), 2
    partition = max(partition, block_n)
    return DecodeKernelConfig(partition=partition, block_n=block_n, num_warps=num_warps, num_stages=3, use_dot=True)


def paged_decode_attention_triton(
    q: torch.Tensor,             # [B, Hq, D]
    k_cache: torch.Tensor,       # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,       # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int (padded)
    seq_lens: torch.Tensor,      # [B] int, >= 1, context including the new token
    max_seq_len: int,            # host copy of seq_lens.max()
    scale: float | None = None,
    config: DecodeKernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence attending to its paged K/V context; returns [B, Hq, D] in q's dtype.

    ``out`` (optional, [B, Hq, D], head dim contiguous) receives the result instead of a new tensor.
    """
    check_triton("paged_decode_attention_triton", q)
    B, Hq, D = q.shape
    num_blocks, page, Hkv, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if D & (D - 1) or page & (page - 1):
        raise ValueError(f"head_dim ({D}) and block size ({page}) must be powers of 2")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the head dimension of q and of the caches must be contiguous")
    if out is None:
        out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be [B, Hq, D] with a contiguous head dim, got {tuple(out.shape)}")
    if B == 0 or max_seq_len <= 0:
        return out
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    group = Hq // Hkv
    if config is None:
        config = default_config(B, Hkv, group, D, page, max_seq_len, sm_count(q.device) if q.is_cuda else 132)
    use_dot = config.use_dot
    block_h = max(16, _next_pow2(group)) if use_dot else _next_pow2(group)
    block_n = max(config.block_n, 16 if use_dot else 1)
    partition = max(config.partition, block_n)
    if partition % block_n:
        raise ValueError(f"partition ({partition}) must be a multiple of block_n ({block_n})")
    max_parts = triton.cdiv(max_seq_len, partition)
    single = max_parts == 1
    if single:  # the partial buffers are never touched
        part_o = part_lse = out
    else:
        part_o = torch.empty((B, Hq, max_parts, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, Hq, max_parts), dtype=torch.float32, device=q.device)
    scale = D**-0.5 if scale is None else scale
    _paged_decode_partial_kernel[(Hkv, B, max_parts)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_o, part_lse,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        max_parts,
        G=group, BLOCK_H=block_h, HEAD_DIM=D, PAGE=page, BLOCK_N=block_n, PARTITION=partition,
        SINGLE=single, USE_DOT=use_dot,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if not single:
        _paged_decode_reduce_kernel[(B, Hq)](
            part_o, part_lse, seq_lens, out,
            out.stride(0), out.stride(1),
            max_parts,
            HEAD_DIM=D, PARTITION=partition, BLOCK_P=min(32, _next_pow2(max_parts)),
            num_warps=4 if D >= 128 else 2,
        )
    return out


class TritonAttentionBackend(AttentionBackend):
    """Decode through the Triton paged kernel; prefill through the Triton flash-attention kernel
    over the batch's packed K/V (fresh prompts), after storing that K/V into its pools."""

    def __init__(self, scale: float | None = None, config: DecodeKernelConfig | None = None) -> None:
        self.scale = scale
        self.config = config
        self._torch = TorchAttentionBackend(scale)
        self._prefill_meta: weakref.ref[PrefillMetadata] | None = None

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(meta, PrefillMetadata):
            return self.prefill(layer, q, k, v, meta, out)
        return self.decode(layer, q, k, v, meta, out)

    def prefill(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PrefillMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not q.is_cuda:  # Triton's CPU interpreter has no bf16 dot: keep the reference there
            return self._torch.forward(layer, q, k, v, meta, out)
        from adrenaline_py.attention.triton_prefill import prefill_attention_triton

        for w in meta.kv_writes:
            store_kv(w.kv, layer, w.slots, k[w.token_index], v[w.token_index])
        # once per forward pass, not once per layer; a weak reference, so that the pools the metadata
        # names are not kept alive after the pass (a dead executor's pool must be unmapped at once)
        if self._prefill_meta is None or self._prefill_meta() is not meta:
            cu = meta.cu_seqlens
            self._prefill_meta = weakref.ref(meta)
            self._cu_dev = torch.tensor(cu, dtype=torch.int32, device=q.device)
            self._max_len = max(b - a for a, b in zip(cu[:-1], cu[1:]))
        return prefill_attention_triton(q, k, v, self._cu_dev, self._max_len, self.scale, out=out)

    def decode(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: DecodeMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if q.shape[0] == 0:
            return torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
        store_kv(meta.kv, layer, meta.slots, k, v)
        return paged_decode_attention_triton(
            q, meta.kv[layer, 0], meta.kv[layer, 1], meta.block_tables, meta.seq_lens, meta.max_seq_len,
            self.scale, self.config, out=out,
        )
