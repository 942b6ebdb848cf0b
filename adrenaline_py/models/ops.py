"""The model's small element-wise ops, fused on CUDA (Triton) and in plain torch elsewhere.

At decode batch sizes every op outside the matrix products and attention moves a few MB, so its
cost is the launch and the passes over memory, not the arithmetic: on CUDA each op here is one
kernel (residual add + RMSNorm; RoPE on q and k in place; SiLU(gate) * up), where plain torch
would run five to ten. Both paths round like the HF reference in the model's dtype: the norm's
output is rounded before the weight multiply, the residual sum is rounded before the norm reads it,
SiLU(gate) is rounded before the multiply by up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adrenaline_py.triton_support import next_pow2 as _next_pow2
from adrenaline_py.triton_support import runs_triton as _use_triton
from adrenaline_py.triton_support import tl, triton

# --- torch reference path ------------------------------------------------------------------------

def _rms_norm_torch(x, weight, eps, residual):
    if residual is not None:
        x = x + residual
        residual = x
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, residual


def _rope_torch(q, k, positions, cos, sin):
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)
    for x in (q, k):
        x32 = x.float()
        half = x32.shape[-1] // 2
        rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
        x.copy_(x32 * c + rotated * s)


def _silu_and_mul_torch(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# --- Triton kernels ------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:  # residual += x, in place, rounded to the model dtype like x + residual
            x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
            x = x.to(res_ptr.dtype.element_ty)
            tl.store(res_ptr + row * stride_r + offs, x, mask=mask)
        x32 = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
        normed = (x32 * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
        NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        offs_d = tl.arange(0, HALF)
        offs_h = tl.arange(0, BLOCK_H)
        cos = tl.load(cos_ptr + pos * stride_cos + offs_d)[None, :]
        sin = tl.load(sin_ptr + pos * stride_cos + offs_d)[None, :]
        # q heads then k heads, "rotate half": (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
        qm = (offs_h < NUM_Q_HEADS)[:, None]
        q1p = q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :]
        q1 = tl.load(q1p, mask=qm, other=0.0).to(tl.float32)
        q2 = tl.load(q1p + HALF, mask=qm, other=0.0).to(tl.float32)
        tl.store(q1p, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=qm)
        tl.store(q1p + HALF, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=qm)
        km = (offs_h < NUM_K_HEADS)[:, None]
        k1p = k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
        k1 = tl.load(k1p, mask=km, other=0.0).to(tl.float32)
        k2 = tl.load(k1p + HALF, mask=km, other=0.0).to(tl.float32)
        tl.store(k1p, (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty), mask=km)
        tl.store(k1p + HALF, (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty), mask=km)

    @triton.jit
    def _silu_and_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_cols
        g = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


# --- public ops ----------------------------------------------------------------------------------

def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of ``x`` (of ``x + residual`` when given). Returns (normed, new residual).

    With a residual, the sum is the new residual (the CUDA path writes it into ``residual`` in place).
    """
    if not _use_triton(x) or x.shape[0] == 0:
        return _rms_norm_torch(x, weight, eps, residual)
    n = x.shape[-1]
    out = torch.empty_like(x)
    res = residual if residual is not None else x
    _rms_norm_kernel[(x.shape[0],)](
        x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=_next_pow2(n), num_warps=8 if n >= 4096 else 4,
    )
    return out, residual


def apply_rope_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by their positions (HF "rotate half").

    ``cos``/``sin``: [max_positions, D] fp32 tables whose two halves repeat (RotaryEmbedding's).
    """
    if not _use_triton(q) or q.shape[0] == 0:
        _rope_torch(q, k, positions, cos, sin)
        return
    T, hq, d = q.shape
    hkv = k.shape[1]
    positions = positions.contiguous()
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1:
        raise ValueError("apply_rope_ needs a contiguous head dimension")
    _rope_kernel[(T,)](
        q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        NUM_Q_HEADS=hq, NUM_K_HEADS=hkv, BLOCK_H=_next_pow2(max(hq, hkv)), HALF=d // 2, num_warps=4,
    )


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for ``gate_up`` = [T, 2 * I] (gate first): [T, I]."""
    if not _use_triton(gate_up) or gate_up.shape[0] == 0:
        return _silu_and_mul_torch(gate_up)
    T, two_i = gate_up.shape
    n = two_i // 2
    out = torch.empty((T, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(T, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n,
                                                      BLOCK=block, num_warps=4)
    return out
