"""The attention interface: the model hands each layer's post-RoPE q/k/v to a backend.

A backend stores the new K/V into the paged cache and returns the attention output, written into
``out`` when the caller gives one (a captured graph's static buffer, or the exchange buffer the
executor writes through NVLink). Backends: `TorchAttentionBackend` (reference, any device),
`TritonAttentionBackend` (GPU kernels) and `OffloadAttentionBackend` (decode rows split between a
local backend and the remote attention executor, adrenaline_py/attention/offload.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class KVWrite:
    """Where some rows of the packed batch store their new K/V."""

    kv: torch.Tensor           # pool tensor [L, 2, num_blocks, block_size, Hkv, D]
    token_index: torch.Tensor  # [n] rows of the packed batch
    slots: torch.Tensor        # [n] flat slot ids in ``kv``


@dataclass
class PrefillMetadata:
    """Causal self-attention over whole prompts packed back to back."""

    cu_seqlens: list[int]       # [B + 1] host offsets of each prompt in the packed batch
    kv_writes: list[KVWrite]    # one per destination pool


@dataclass
class DecodeMetadata:
    """One new token per sequence attending to its paged context (new token included)."""

    kv: torch.Tensor            # pool tensor [L, 2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    seq_lens: torch.Tensor      # [B] int64, context length including the new token
    slots: torch.Tensor         # [B] int64, slot of the new token
    max_seq_len: int            # host copy of seq_lens.max()


AttentionMetadata = PrefillMetadata | DecodeMetadata


def build_decode_metadata(
    kv: torch.Tensor, block_tables: list[list[int]], seq_lens: list[int], device: torch.device
) -> DecodeMetadata:
    """Metadata for one decode step of sequences whose new token sits at position seq_len - 1."""
    block_size = kv.shape[3]
    width = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)
    lens = torch.tensor(seq_lens, dtype=torch.long)
    pos = lens - 1
    slots = tables.gather(1, (pos // block_size)[:, None]).squeeze(1) * block_size + pos % block_size
    return DecodeMetadata(kv, tables.to(device), lens.to(device), slots.to(device), max(seq_lens))


class AttentionBackend(ABC):
    @abstractmethod
    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] → output [T, Hq, D] (``out`` when given)."""

    def start(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
              ) -> object:
        """Begin a layer's attention whose output `finish` returns; between the two the caller may run
        other work (the two-batch overlap). Backends that compute here run it now."""
        return self.forward(layer, q, k, v, meta)

    def finish(self, pending: object) -> torch.Tensor:
        """The output of a `start`ed attention."""
        return pending


def store_kv(kv: torch.Tensor, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write K/V of some tokens into their slots of one layer of a pool: the one KV store.

    ``kv`` may be another process's pool, even on another GPU (attached as a tensor of this
    device, adrenaline_py/shm.py): on CUDA one Triton kernel writes it, through NVLink when the
    pool is remote (prefill writing a local request's prompt into decode's pool). Rows whose slot
    is negative are skipped (padding rows of a captured batch; CUDA only).
    """
    if kv.is_cuda:
        from adrenaline_py.attention.triton_decode import store_kv_triton, triton_available

        if triton_available():
            store_kv_triton(kv, layer, slots, _rows(k, kv.dtype), _rows(v, kv.dtype))
            return
    _, _, num_blocks, block_size, num_kv_heads, head_dim = kv.shape
    kv[layer, 0].view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = k.to(kv.dtype)
    kv[layer, 1].view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = v.to(kv.dtype)


def _rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [n, H, D] in ``dtype`` with each row's [H, D] contiguous (any row stride), copying only if needed."""
    x = x.to(dtype)
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()
