"""Decode attention split by request: M local rows here, N offloaded rows on the executor.

Rows are ordered local first, so the executor's output is the tail of the batch: no softmax
merge and no scatter. The remote rows are sent before local attention runs, so the executor's
work overlaps with ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adrenaline_py.attention.base import AttentionBackend, DecodeMetadata, PrefillMetadata
from adrenaline_py.transport import OffloadClient


@dataclass
class OffloadDecodeMetadata:
    local: DecodeMetadata | None  # metadata of rows [0, num_local)
    num_local: int
    num_remote: int               # rows [num_local, num_local + num_remote) go to the executor


class OffloadAttentionBackend(AttentionBackend):
    def __init__(self, local: AttentionBackend, remote: OffloadClient) -> None:
        self.local = local
        self.remote = remote

    def forward(self, layer, q, k, v, meta) -> torch.Tensor:
        if isinstance(meta, PrefillMetadata | DecodeMetadata):
            return self.local.forward(layer, q, k, v, meta)
        m = meta.num_local
        if meta.num_remote:
            self.remote.send_layer(layer, q[m:], k[m:], v[m:])
        parts = []
        if m:
            parts.append(self.local.forward(layer, q[:m], k[:m], v[:m], meta.local))
        if meta.num_remote:
            parts.append(self.remote.recv_layer(layer).to(device=q.device, dtype=q.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
