"""Reference attention in plain torch (SDPA), for CPU serving and as the kernels' reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adrenaline_py.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    DecodeMetadata,
    PrefillMetadata,
    store_kv,
)


class TorchAttentionBackend(AttentionBackend):
    def __init__(self, scale: float | None = None) -> None:
        self.scale = scale

    def forward(self, layer, q, k, v, meta: AttentionMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        result = self.prefill(layer, q, k, v, meta) if isinstance(meta, PrefillMetadata) else \
            self.decode(layer, q, k, v, meta)
        if out is None:
            return result
        out.copy_(result)
        return out

    def prefill(self, layer, q, k, v, meta: PrefillMetadata) -> torch.Tensor:
        for w in meta.kv_writes:
            store_kv(w.kv, layer, w.slots, k[w.token_index], v[w.token_index])
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        bounds = meta.cu_seqlens
        for start, end in zip(bounds[:-1], bounds[1:]):
            # [H, S, D] per prompt; GQA by SDPA's head grouping.
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
            out[start:end] = o.transpose(0, 1)
        return out

    def decode(self, layer, q, k, v, meta: DecodeMetadata) -> torch.Tensor:
        if q.shape[0] == 0:
            return torch.empty(q.shape, dtype=q.dtype, device=q.device)
        store_kv(meta.kv, layer, meta.slots, k, v)
        return paged_decode_attention(q, meta.kv[layer, 0], meta.kv[layer, 1], meta, self.scale)


def paged_decode_attention(
    q: torch.Tensor,        # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: DecodeMetadata,
    scale: float | None = None,
) -> torch.Tensor:
    """Gather each sequence's blocks, pad to the longest, mask the tail, attend."""
    B = q.shape[0]
    block_size = k_cache.shape[1]
    num_blocks_used = -(-meta.max_seq_len // block_size)
    tables = meta.block_tables[:, :num_blocks_used]
    keys = k_cache[tables].flatten(1, 2)[:, : meta.max_seq_len]   # [B, S, Hkv, D]
    values = v_cache[tables].flatten(1, 2)[:, : meta.max_seq_len]
    positions = torch.arange(meta.max_seq_len, device=q.device)
    mask = positions[None, :] < meta.seq_lens[:, None]             # [B, S]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2).to(keys.dtype),                                # [B, Hq, 1, D]
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2).to(q.dtype).view(B, q.shape[1], q.shape[2])
