"""CUDA graphs of the decode forward pass, one per (batch bucket, context bucket).

A decode step of a 7-8B model launches ~350 small kernels; launched one by one from Python their
gaps cost milliseconds, as much as the memory traffic at small batches. A graph replays them with
no gaps. A graph fixes every shape and pointer, so:

- inputs live in static device buffers; a step of n rows runs the graph of the smallest batch
  bucket >= n, and the padding rows get slot -1 (the Triton KV store skips them) and length 1;
- block tables stay on the device between steps (one row per running sequence), so a step sends
  the host only four numbers per row;
- the attention kernel's grid depends on the longest context, so graphs are also keyed by a context
  bucket (a power of two >= the step's longest context, at most ``max_model_len``); programs past a
  shorter sequence's end exit at once;
- only the layers are captured; the LM head and sampling run after the replay, on the rows in use.

Graphs cover steps whose rows are all local: a step with offloaded rows talks to the executor
between layers (host round trips), so it runs eagerly.
"""

from __future__ import annotations

import bisect

import torch

from adrenaline_py.attention import AttentionBackend, DecodeMetadata
from adrenaline_py.models.llama import LlamaForCausalLM

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
MIN_CONTEXT_BUCKET = 1024


def batch_buckets(max_batch: int) -> list[int]:
    return sorted({b for b in BATCH_BUCKETS if b < max_batch} | {max_batch})


def context_buckets(max_model_len: int) -> list[int]:
    out, c = [], MIN_CONTEXT_BUCKET
    while c < max_model_len:
        out.append(c)
        c *= 2
    return [*out, max_model_len]


class DecodeGraphs:
    """Captured decode forward passes over the decode pool; `run` replays the right one.

    Per step the host sends one [B, 4] int64 array (token, position, context length, table row):
    block tables live on the device, one row per running sequence, uploaded once when the sequence
    first appears (and again if its table changes), and the graph gathers them itself.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        kv: torch.Tensor,          # the decode pool [L, 2, num_blocks, block_size, Hkv, D]
        max_batch: int,
        max_model_len: int,
    ) -> None:
        self.model, self.backend, self.kv = model, backend, kv
        self.device = dev = kv.device
        self.block_size = kv.shape[3]
        self.batch_buckets = batch_buckets(max_batch)
        self.context_buckets = context_buckets(max_model_len)
        self.max_blocks = -(-max_model_len // self.block_size)
        b = self.batch_buckets[-1]
        self._pad_row = b  # the table row of padding rows (all zeros; their slot is forced to -1)
        # Row-major [B, 4]: the first n rows are one contiguous block, one small pinned copy per step.
        self.inputs = torch.zeros(b, 4, dtype=torch.long, device=dev)
        self._host_inputs = torch.zeros(b, 4, dtype=torch.long, pin_memory=True)
        self.table_store = torch.zeros(b + 1, self.max_blocks, dtype=torch.long, device=dev)
        self._rows: dict[object, tuple[int, list[int]]] = {}   # sequence key → (table row, its table)
        self._free_rows = list(range(b - 1, -1, -1))
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._copied = torch.cuda.Event()
        self._set_padding(0)

    def buckets_for(self, num_rows: int, max_seq_len: int) -> tuple[int, int] | None:
        """The graph key of a step, or None when the step is larger than any graph."""
        i = bisect.bisect_left(self.batch_buckets, num_rows)
        j = bisect.bisect_left(self.context_buckets, max_seq_len)
        if i == len(self.batch_buckets) or j == len(self.context_buckets):
            return None
        return self.batch_buckets[i], self.context_buckets[j]

    def capture(self, keys: list[tuple[int, int]] | None = None) -> None:
        """Capture graphs ahead of serving (all buckets by default), largest first to share memory."""
        if keys is None:
            keys = [(b, c) for b in self.batch_buckets for c in self.context_buckets]
        for key in sorted(keys, reverse=True):
            self.graph(key)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _forward(self, b: int, c: int) -> torch.Tensor:
        ids, positions, lens, rows = (t.contiguous() for t in self.inputs[:b].unbind(1))
        tables = self.table_store[rows]
        bs = self.block_size
        slots = tables.gather(1, (positions // bs)[:, None]).squeeze(1) * bs + positions % bs
        slots = torch.where(rows == self._pad_row, -1, slots)
        meta = DecodeMetadata(self.kv, tables, lens, slots, c)
        return self.model(ids, positions, self.backend, meta)

    def graph(self, key: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The graph of a (batch bucket, context bucket) and its output buffer, captured on first use."""
        if key in self._graphs:
            return self._graphs[key]
        b, c = key
        self._set_padding(0)  # every row a padding row: the warm-up and capture store nothing
        # Warm up on a side stream first (Triton compiles, cuBLAS picks kernels), as capture requires.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(b, c)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self._forward(b, c)
        self._graphs[key] = (graph, hidden)
        return self._graphs[key]

    def _set_padding(self, start: int) -> None:
        h = self._host_inputs
        h[start:] = torch.tensor([0, 0, 1, self._pad_row])
        self.inputs[start:].copy_(h[start:])

    def _table_rows(self, keys: list[object], block_tables: list[list[int]]) -> list[int]:
        """Device table rows of this step's sequences; rows of sequences that left are reused."""
        current = set(keys)
        for gone in [k for k in self._rows if k not in current]:
            self._free_rows.append(self._rows.pop(gone)[0])
        rows = []
        for key, table in zip(keys, block_tables):
            entry = self._rows.get(key)
            if entry is None or entry[1] is not table:  # new, or its table was replaced (migration)
                row = entry[0] if entry is not None else self._free_rows.pop()
                self.table_store[row, : len(table)].copy_(torch.as_tensor(table, dtype=torch.long))
                self._rows[key] = entry = (row, table)
            rows.append(entry[0])
        return rows

    def run(
        self, keys: list[object], input_ids: list[int], positions: list[int], block_tables: list[list[int]],
        seq_lens: list[int],
    ) -> torch.Tensor | None:
        """Final hidden states [n, hidden] of the rows, or None when no graph covers the step.

        ``keys`` identify the sequences across steps (their block tables are uploaded once); a
        table must not change in place while its sequence runs (replace the list instead).
        """
        n = len(input_ids)
        key = self.buckets_for(n, max(seq_lens))
        if key is None or len(set(keys)) != n:
            return None
        graph, hidden = self.graph(key)
        b = key[0]
        self._copied.synchronize()  # the last step's async copy has read the staging buffer
        h = self._host_inputs
        h[:n] = torch.tensor([input_ids, positions, seq_lens, self._table_rows(keys, block_tables)]).T
        if b > n:
            h[n:b] = torch.tensor([0, 0, 1, self._pad_row])
        self.inputs[:b].copy_(h[:b], non_blocking=True)  # pinned: ordered before the replay on the stream
        self._copied.record()
        graph.replay()
        return hidden[:n]
