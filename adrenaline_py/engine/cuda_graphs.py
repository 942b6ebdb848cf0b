"""CUDA graphs of the decode step (decode's layers) and of the executor's step (its layers' attention).

A decode step of a 7-8B model launches ~350 small kernels, and with offloading ~130 more for the
exchange; launched one by one from Python their gaps cost milliseconds. A graph replays them with
no gaps. A graph fixes every shape and pointer, so:

- inputs live in static device buffers (`BatchInputs`): per step the host writes one [B, C] int64
  array through one pinned copy; block tables stay on the device, uploaded once per sequence;
- decode graphs are keyed by (local bucket, offloaded bucket, split) — the 2-D buckets: rows are laid
  out ``[local | local padding | offloaded | offloaded padding]``; padding rows get slot -1 (the KV
  store skips them) and length 1; split > 0 for steps run as two batches (two-batch overlap): an
  all-offloaded step cut at split = bucket // 2, or a step whose local rows are one batch and its
  offloaded rows the other (split = the local bucket). The executor's graphs are keyed by its
  (offloaded) bucket and the split (0 for the second kind: the executor sees one batch);
- the attention kernel's grid is sized for ``max_model_len`` and programs past a sequence's end
  exit at once, so context length is not a key;
- how many graphs: decode captures one per *reachable* pair — local buckets ∪ {0} × offloaded
  buckets ∪ {0}, keeping pairs whose smallest step fits ``max_batch`` (`graph_keys`) — plus, with
  the two-batch overlap, one per offloaded bucket from 16 cut in two, and one per pair whose local
  and offloaded buckets both hold at least ``two_batch_min_rows`` rows cut between them
  (`decode_graph_keys`). With max_batch 64 that is 61 + 5 graphs (9 without offloading, as under
  ``--offload never``), with 256 177 + 11 + 3, with 400 291 + 16 + 28, with 768 649 + 27 + 171
  (two_batch_min_rows 128; 31 without offloading). All graphs
  of a process share one memory pool and are captured largest first, so activations take the
  largest's memory; beyond those, 676 graphs took 2.0 GiB and 27.8 s to capture for llama-2-7b on an
  H200 (400 with the earlier, coarser buckets: 0.5 GiB, 20.4 s; `kv_cache.DECODE_GRAPH_BYTES_PER_LAYER`);
- only the layers are captured; the LM head and sampling run after the replay, on the rows in use.

Before a capture each shape is run once (warm-up: Triton compiles, cuBLAS picks kernels) with the
transport in dry-run mode, which exchanges nothing with the executor.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable

import torch

from adrenaline_py.attention import AttentionBackend, DecodeMetadata
from adrenaline_py.attention.offload import (
    OffloadAttentionBackend,
    OffloadDecodeMetadata,
    local_remote_metadata,
    two_batch_metadata,
)
from adrenaline_py.config import EngineConfig
from adrenaline_py.models.llama import LlamaForCausalLM
from adrenaline_py.transport import Batch, batch_cuts

# A bucket every 32 rows from 128 to 768: a short-prompt workload (ShareGPT) on an H200 keeps
# 300-770 rows in flight, where the matrix products are compute-bound and every padding row costs
# as much as a real one (a 539-row step in buckets 320 + 320 ran 101 padding rows, ~1.9 ms of a
# 27-30 ms step; twelfth session). Past 768 steps of 1/8 of the bucket.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, *range(128, 768, 32), 768, 896, 1024, 1280, 1536, 1792, 2048)
# As fine as the local buckets from 8 rows up: decode's dense layers run over both buckets' rows,
# so a coarse offloaded bucket (143 rows in 256) cost decode a third more GEMM rows (measured on
# 2xH200, docs/performance.md); the executor's own padding rows exit at once.
OFFLOAD_BUCKETS = (8, 16, 24, 32, 48, 64, 96, *range(128, 768, 32), 768, 896, 1024)


def batch_buckets(max_batch: int) -> list[int]:
    return sorted({b for b in BATCH_BUCKETS if b < max_batch} | {max_batch})


def offload_buckets(max_rows: int) -> list[int]:
    return sorted({b for b in OFFLOAD_BUCKETS if b < max_rows} | {max_rows})


def graph_keys(max_batch: int, offload: bool = True) -> list[tuple[int, int]]:
    """The (local bucket, offloaded bucket) pairs some step of at most ``max_batch`` rows maps to."""
    local = [0, *batch_buckets(max_batch)]
    remote = [0, *offload_buckets(max_batch)] if offload else [0]
    keys = []
    for i, mb in enumerate(local):
        for j, nb in enumerate(remote):
            if mb == nb == 0:
                continue
            fewest = (local[i - 1] + 1 if mb else 0) + (remote[j - 1] + 1 if nb else 0)
            if fewest <= max_batch:
                keys.append((mb, nb))
    return keys


def decode_graph_keys(max_batch: int, offload: bool, two_batch: bool, two_batch_min_rows: int = 0
                      ) -> list[tuple[int, int, int]]:
    """Every (local bucket, offloaded bucket, split) decode captures: split = nb // 2 cuts an
    all-offloaded step in two, split = mb a step into its local and its offloaded rows."""
    pairs = graph_keys(max_batch, offload)
    keys = [(mb, nb, 0) for mb, nb in pairs]
    if offload and two_batch:
        keys += [(0, nb, nb // 2) for nb in cut_buckets(offload_buckets(max_batch))]
        if two_batch_min_rows > 0:
            keys += [(mb, nb, mb) for mb, nb in pairs if min(mb, nb) >= two_batch_min_rows]
    return keys


def captures_offloaded_steps(engine: EngineConfig) -> bool:
    """Whether decode captures steps with offloaded rows: not under ``--offload never``, where none come
    (the decode service and the pool plan both ask here)."""
    return engine.offload != "never"


def pending_tokens(ids: torch.Tensor, src: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
    """``ids`` with ``prev_tokens[src]`` where ``src`` >= 0: the inputs of rows whose last token the
    previous step chose and the host has not seen yet (overlapped steps)."""
    return torch.where(src >= 0, prev_tokens[src.clamp(min=0)], ids)


def cut_buckets(buckets: list[int]) -> list[int]:
    """The offloaded buckets whose all-offloaded steps may run as two batches, cut at bucket // 2."""
    return [nb for nb in buckets if nb >= 16]


def _bucket(buckets: list[int], n: int) -> int | None:
    if n == 0:
        return 0
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


class BatchInputs:
    """Row inputs of a captured batch on the device: ``values`` [max_rows, C] int64 written per step
    from pinned memory, and a block-table store [max_rows + 1, max_blocks] (last row: padding, all 0)
    into which each sequence's table is uploaded once (again only if its table object changes)."""

    def __init__(self, max_rows: int, pad_values: list[int], max_blocks: int, device: torch.device) -> None:
        self.max_rows, self.device = max_rows, device
        self.pad_row = max_rows
        self.pad = torch.tensor(pad_values, dtype=torch.long)
        self.values = torch.zeros(max_rows, len(pad_values), dtype=torch.long, device=device)
        self._host = torch.zeros(max_rows, len(pad_values), dtype=torch.long, pin_memory=True)
        self.tables = torch.zeros(max_rows + 1, max_blocks, dtype=torch.long, device=device)
        self._rows: dict[object, tuple[int, list[int]]] = {}   # sequence key → (table row, its table)
        self._free = list(range(max_rows - 1, -1, -1))
        self._copied = torch.cuda.Event()
        self.write([], max_rows)

    def table_rows(self, keys: list[object], tables: list[list[int]]) -> list[int]:
        """Device table rows of this step's sequences; rows of sequences that left are reused."""
        current = set(keys)
        for gone in [k for k in self._rows if k not in current]:
            self._free.append(self._rows.pop(gone)[0])
        rows = []
        for key, table in zip(keys, tables):
            entry = self._rows.get(key)
            if entry is None or entry[1] is not table:  # new, or its table was replaced (migration)
                row = entry[0] if entry is not None else self._free.pop()
                self.tables[row].zero_()
                # from pinned memory: a copy from pageable memory would wait for the step in flight
                self.tables[row, : len(table)].copy_(torch.as_tensor(table, dtype=torch.long).pin_memory(),
                                                     non_blocking=True)
                self._rows[key] = entry = (row, table)
            rows.append(entry[0])
        return rows

    def write(self, segments: list[tuple[int, list[list[int]]]], total: int) -> None:
        """Rows [start, start + len(values)) of each (start, values) segment get ``values``; every other
        row below ``total`` is a padding row. One pinned copy, ordered before later work on the stream."""
        self._copied.synchronize()  # the last step's copy has read the staging buffer
        h = self._host
        h[:total] = self.pad
        for start, values in segments:
            if values:
                h[start:start + len(values)] = torch.tensor(values, dtype=torch.long)
        self.values[:total].copy_(h[:total], non_blocking=True)  # pinned: ordered before the replay
        self._copied.record()


class _GraphSet:
    """Graphs by key in one memory pool; each captured after a warm-up on a side stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graphs: dict[object, tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        # torch.cuda.graph's default capture stream is made once per process, on whatever device was
        # current then: a stream of this device is needed, or capture on another GPU is invalidated
        self.capture_stream = torch.cuda.Stream(device)
        self.warm_up_stream = torch.cuda.Stream(device)  # one for all captures: few streams taken from torch's pool

    def get(self, key, forward: Callable[[], torch.Tensor | None], warm_up: Callable[[], object]):
        """The graph of ``key``, captured now if needed (``forward`` records it, ``warm_up`` runs first)."""
        if key in self.graphs:
            return self.graphs[key]
        stream = self.warm_up_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            warm_up()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        # Not `torch.cuda.graph`: its entry synchronizes the whole device and empties the cache, which
        # deadlocks when decode and the executor share a GPU in one process (one side's captured wait
        # is spinning on the other). Capture on our own stream, errors scoped to this thread.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self.capture_stream):
            graph.capture_begin(self.pool, capture_error_mode="thread_local")
            try:
                out = forward()
            finally:
                graph.capture_end()
        self.graphs[key] = (graph, out)
        return self.graphs[key]

    def clear(self) -> None:
        self.graphs.clear()


class DecodeGraphs:
    """Captured decode forward passes over decode's pool, keyed by (local bucket, offloaded bucket).

    Per step the host sends one [B, 5] int64 array (token, position, context length, table row,
    source row of the token in the previous step's device tensor or -1).
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,  # OffloadAttentionBackend to capture steps with offloaded rows
        kv: torch.Tensor,          # the decode pool [L, 2, num_blocks, block_size, Hkv, D]
        max_batch: int,
        max_model_len: int,
        offload: bool = True,      # also capture steps with offloaded rows (a capturable transport)
        two_batch: bool = False,   # also capture all-offloaded steps cut in two batches (two-batch overlap)
        two_batch_min_rows: int = 0,  # with two_batch: also steps cut into local and offloaded rows, both this many
    ) -> None:
        self.model, self.backend, self.kv = model, backend, kv
        self._offloading = isinstance(backend, OffloadAttentionBackend)
        offload = offload and self._offloading
        self.device = kv.device
        self.block_size = kv.shape[3]
        self.max_model_len = max_model_len
        self.local_buckets = batch_buckets(max_batch)
        self.remote_buckets = offload_buckets(max_batch) if offload else []
        self.keys = decode_graph_keys(max_batch, offload, two_batch, two_batch_min_rows)
        rows = max(mb + nb for mb, nb, _ in self.keys)
        # per row: token, position, context length, table row, and the row of the previous step's
        # token tensor that holds this row's token (-1: the token column has it; overlapped steps)
        self.inputs = BatchInputs(rows, [0, 0, 1, rows, -1], -(-max_model_len // self.block_size), self.device)
        self._graphs = _GraphSet(self.device)

    def buckets_for(self, num_local: int, num_remote: int, two_batch: bool = False) -> tuple[int, int, int] | None:
        """The graph key of a step (``two_batch``: run as two batches, all-offloaded rows cut in two or
        local rows and offloaded rows), or None when no graph covers it."""
        mb, nb = _bucket(self.local_buckets, num_local), _bucket(self.remote_buckets, num_remote)
        if mb is None or nb is None:
            return None
        key = (mb, nb, (mb or nb // 2) if two_batch and nb else 0)
        return key if key in self._key_set else None

    @property
    def _key_set(self) -> set[tuple[int, int, int]]:
        if not hasattr(self, "_keys_cached"):
            self._keys_cached = set(self.keys)
        return self._keys_cached

    def capture(self, keys: list[tuple[int, int, int]] | None = None) -> None:
        """Capture graphs ahead of serving (all keys by default), largest first to share memory."""
        for key in sorted(keys if keys is not None else self.keys, key=lambda k: (k[0] + k[1], k), reverse=True):
            self.graph(key)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs.graphs)

    def _forward(self, mb: int, nb: int, split: int) -> torch.Tensor:
        ids, positions, lens, rows = (t.contiguous() for t in self.inputs.values[: mb + nb, :4].unbind(1))
        if split and not mb:
            return self.model.forward_two_batches(ids, positions, self.backend, two_batch_metadata(nb, split), split)
        local = None
        if mb:
            tables = self.inputs.tables[rows[:mb]]
            bs, pos = self.block_size, positions[:mb]
            slots = tables.gather(1, (pos // bs)[:, None]).squeeze(1) * bs + pos % bs
            slots = torch.where(rows[:mb] == self.inputs.pad_row, -1, slots)
            local = DecodeMetadata(self.kv, tables, lens[:mb].contiguous(), slots, self.max_model_len)
        if split:  # local rows, then offloaded rows
            return self.model.forward_two_batches(ids, positions, self.backend, local_remote_metadata(local, mb, nb),
                                                  split)
        meta = OffloadDecodeMetadata(local, mb, nb) if self._offloading else local
        return self.model(ids, positions, self.backend, meta)

    def graph(self, key: tuple[int, int, int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The graph of a (local bucket, offloaded bucket, split) and its output buffer, captured on first use."""
        mb, nb, split = key
        if key not in self._graphs.graphs:
            self.inputs.write([], mb + nb)  # every row a padding row: warm-up and capture store nothing

        def warm_up():
            with self.backend.warm_up() if self._offloading else contextlib.nullcontext():
                self._forward(mb, nb, split)

        return self._graphs.get(key, lambda: self._forward(mb, nb, split), warm_up)

    def run(
        self, keys: list[object], input_ids: list[int], positions: list[int], block_tables: list[list[int]],
        seq_lens: list[int], num_local: int | None = None, two_batch: bool = False,
        token_rows: list[int] | None = None, prev_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Final hidden states [n, hidden] of the rows (local first, then offloaded), or None when no
        graph covers the step. The first ``num_local`` rows (default: all) are local; ``two_batch``:
        an all-offloaded step runs cut in two (rows [0, bucket // 2) and the rest: `buckets_for`).

        ``keys`` identify the sequences across steps (their block tables are uploaded once); a
        table must not change in place while its sequence runs (replace the list instead).
        ``token_rows`` (with ``prev_tokens``, the previous step's tokens on the device): per row the
        index into ``prev_tokens`` of its input token, or -1 to take ``input_ids``.
        """
        n = len(input_ids)
        m = n if num_local is None else num_local
        key = self.buckets_for(m, n - m, two_batch)
        if key is None or len(set(keys)) != n:
            return None
        graph, hidden = self.graph(key)
        mb, nb, _ = key
        table_rows = self.inputs.table_rows(keys[:m], block_tables[:m])
        src = token_rows if token_rows is not None else [-1] * n
        local = [list(r) for r in zip(input_ids[:m], positions[:m], seq_lens[:m], table_rows, src[:m])]
        remote = [[t, p, s, self.inputs.pad_row, r]
                  for t, p, s, r in zip(input_ids[m:], positions[m:], seq_lens[m:], src[m:])]
        self.inputs.write([(0, local), (mb, remote)], mb + nb)
        if prev_tokens is not None:
            values = self.inputs.values[: mb + nb]
            values[:, 0] = pending_tokens(values[:, 0], values[:, 4], prev_tokens)
        graph.replay()
        if n == m:
            return hidden[:m]
        return torch.cat([hidden[:m], hidden[mb: mb + n - m]])


class ExecutorGraphs:
    """The executor's step captured per (offloaded bucket, split): per layer and batch wait for
    decode's flag, store k/v, attention, signal (adrenaline_py/transport.py `DeviceEndpoint.enqueue_layers`).

    The graphs point at one decode connection's exchange buffers, so they are captured for each new
    set of buffers, all at once, when decode connects and before the executor answers READY: no
    capture (and no kernel loading) runs while decode's waits spin, and no step waits for one.
    Per step the host sends one [B, 3] int64 array (position, context length, table row).
    """

    def __init__(self, attend_with: Callable[[DecodeMetadata], Callable], kv: torch.Tensor, max_rows: int,
                 max_model_len: int, two_batch: bool = True) -> None:
        self.attend_with, self.kv = attend_with, kv
        self.device = kv.device
        self.block_size = kv.shape[3]
        self.max_model_len = max_model_len
        self.buckets = offload_buckets(max_rows)
        # (bucket, split): split = bucket // 2 for the two-batch cut decode makes of an all-offloaded step
        self.keys = [(nb, 0) for nb in self.buckets]
        if two_batch:
            self.keys += [(nb, nb // 2) for nb in cut_buckets(self.buckets)]
        self.inputs = BatchInputs(self.buckets[-1], [0, 1, self.buckets[-1]], -(-max_model_len // self.block_size),
                                  self.device)
        self._graphs = _GraphSet(self.device)
        self._buffers_key: object = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs.graphs)

    def _meta(self, start: int, end: int) -> DecodeMetadata:
        positions, lens, rows = (t.contiguous() for t in self.inputs.values[start:end].unbind(1))
        tables = self.inputs.tables[rows]
        bs = self.block_size
        slots = tables.gather(1, (positions // bs)[:, None]).squeeze(1) * bs + positions % bs
        slots = torch.where(rows == self.inputs.pad_row, -1, slots)
        return DecodeMetadata(self.kv, tables, lens, slots, self.max_model_len)

    def _batches(self, nb: int, split: int) -> list[Batch]:
        return [Batch(a, b - a, self.attend_with(self._meta(a, b))) for a, b in batch_cuts(nb, split)]

    def capture_all(self, endpoint) -> None:
        """Capture every key's step for ``endpoint``'s exchange buffers (none again for the same buffers)."""
        for key in sorted(self.keys, reverse=True):  # largest first: the pool is sized by the first
            self._graph(endpoint, key)
        torch.cuda.current_stream(self.device).synchronize()  # this stream only: a peer may be spinning

    def _graph(self, endpoint, key: tuple[int, int]):
        buffers = endpoint.buffers.qkv.data_ptr()
        if buffers != self._buffers_key:  # decode re-created its exchange buffers: the graphs point at old ones
            self._graphs.clear()
            self._buffers_key = buffers
        if key not in self._graphs.graphs:
            nb, split = key
            self.inputs.write([], nb)  # capture on padding rows: the warm-up stores nothing

            def forward():
                endpoint.enqueue_layers(self._batches(nb, split))

            def warm_up():
                endpoint.enqueue_layers(self._batches(nb, split), dry=True)

            self._graphs.get(key, forward, warm_up)
        return self._graphs.graphs[key][0]

    def replay(self, endpoint, seq_ids: list[int], tables: list[list[int]], seq_lens: list[int],
               split: int = 0) -> bool:
        """Run a step's layers from the graph of its bucket (and of its two-batch cut, if any); a key
        `capture_all` did not capture is captured now. False when no graph covers the step."""
        nb = _bucket(self.buckets, len(seq_ids))
        if not nb or split not in (0, nb // 2):  # decode cuts a padded bucket in halves
            return False
        graph = self._graph(endpoint, (nb, split))
        rows = self.inputs.table_rows(seq_ids, tables)
        self.inputs.write([(0, [[s - 1, s, r] for s, r in zip(seq_lens, rows)])], nb)
        graph.replay()
        return True
