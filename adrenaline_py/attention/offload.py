"""Decode attention split by request: M local rows here, N offloaded rows on the executor.

Rows are ordered local first, so the executor's output is the tail of the batch: no softmax
merge and no scatter. The remote rows are shipped before local attention runs and waited for
after it, so the executor's work (on the other GPU, or beside prefill under MPS) overlaps with
ours. With a capturable transport (CUDA) the whole thing is device work, captured with the rest
of the step (adrenaline_py/engine/cuda_graphs.py).

When every row is offloaded there is no local attention to hide the remote one behind; the step
then runs as two batches (`start`/`finish`, `LlamaForCausalLM.forward_two_batches`): one batch's
dense work here overlaps the other's attention on the executor. A step with many local and many
offloaded rows may run as two batches too, the local rows and the offloaded ones: the executor's
attention of a layer then hides behind decode's whole layer of the local rows (dense work and
attention), not behind their attention alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from adrenaline_py.attention.base import AttentionBackend, DecodeMetadata, PrefillMetadata
from adrenaline_py.transport import OffloadTransport


@dataclass
class OffloadDecodeMetadata:
    local: DecodeMetadata | None  # metadata of rows [0, num_local)
    num_local: int                # rows [0, num_local) attend here (a graph's padding rows included)
    num_remote: int               # rows [num_local, num_local + num_remote) go to the executor
    # Two-batch overlap (all rows offloaded, `LlamaForCausalLM.forward_two_batches`): which batch these
    # rows are (its own exchange flags) and where they sit in the exchange buffers.
    part: int = 0
    row0: int = 0


def two_batch_metadata(rows: int, split: int) -> tuple[OffloadDecodeMetadata, OffloadDecodeMetadata]:
    """The metadata of an all-offloaded step of ``rows`` rows cut at ``split`` into two batches."""
    return (OffloadDecodeMetadata(None, 0, split, part=0, row0=0),
            OffloadDecodeMetadata(None, 0, rows - split, part=1, row0=split))


def local_remote_metadata(local: DecodeMetadata, num_local: int, num_remote: int
                          ) -> tuple[OffloadDecodeMetadata, OffloadDecodeMetadata]:
    """The metadata of a step run as two batches, its local rows and its offloaded rows: the executor
    sees one batch, as in a step not cut (the offloaded rows' exchange is the same)."""
    return (OffloadDecodeMetadata(local, num_local, 0), OffloadDecodeMetadata(None, 0, num_remote))


class OffloadAttentionBackend(AttentionBackend):
    def __init__(self, local: AttentionBackend, remote: OffloadTransport) -> None:
        self.local = local
        self.remote = remote

    def forward(self, layer, q, k, v, meta, out=None) -> torch.Tensor:
        if isinstance(meta, PrefillMetadata | DecodeMetadata):
            return self.local.forward(layer, q, k, v, meta, out)
        m, n = meta.num_local, meta.num_remote
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if n:
            self.remote.send(layer, q[m:m + n], k[m:m + n], v[m:m + n])
        if m:
            self.local.forward(layer, q[:m], k[:m], v[:m], meta.local, out[:m])
        if n:
            self.remote.recv(layer, out[m:m + n])
        return out

    def start(self, layer, q, k, v, meta):
        if isinstance(meta, OffloadDecodeMetadata) and meta.num_local == 0 and meta.num_remote:
            self.remote.send(layer, q, k, v, meta.part, meta.row0)
            return layer, meta, torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return super().start(layer, q, k, v, meta)

    def finish(self, pending):
        if isinstance(pending, torch.Tensor):
            return pending
        layer, meta, out = pending
        self.remote.recv(layer, out, meta.part, meta.row0)
        return out

    @contextmanager
    def warm_up(self) -> Iterator[None]:
        """Run the layers before a capture without exchanging anything with the executor."""
        with self.remote.dry_run():
            yield
