"""Batched prefill of variable-length prompts, writing each prompt's K/V straight into the pool
chosen at admission (decode's pool for local requests, the executor's pool for offloaded ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adrenaline_py.attention import AttentionBackend, KVWrite, PrefillMetadata
from adrenaline_py.kv_cache import KVPool
from adrenaline_py.models.llama import LlamaForCausalLM
from adrenaline_py.request import SamplingParams
from adrenaline_py.sampler import SamplingRow, sample, warm_up


@dataclass
class PrefillItem:
    input_ids: list[int]
    pool: str                 # "decode" or "executor"
    block_table: list[int]
    sampling: SamplingParams


class PrefillRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        pools: dict[str, KVPool],
        max_batch_tokens: int,
    ) -> None:
        self.model = model
        self.backend = backend
        self.pools = pools
        self.max_batch_tokens = max_batch_tokens
        self.device = model.lm_head.weight.device
        # prefill samples each request's first token: its sampling kernels built now, not mid-serving
        warm_up(model.lm_head.weight.shape[0], model.lm_head.weight.dtype, self.device)

    def run(self, items: list[PrefillItem]) -> list[int]:
        """First output token of each item (sampled with the item's own parameters)."""
        out: list[int] = []
        for batch in self._batches(items):
            out.extend(self._run_batch(batch))
        return out

    def _batches(self, items: list[PrefillItem]):
        batch, tokens = [], 0
        for item in items:
            if batch and tokens + len(item.input_ids) > self.max_batch_tokens:
                yield batch
                batch, tokens = [], 0
            batch.append(item)
            tokens += len(item.input_ids)
        if batch:
            yield batch

    def _run_batch(self, items: list[PrefillItem]) -> list[int]:
        cu = [0]
        for item in items:
            cu.append(cu[-1] + len(item.input_ids))
        ids = torch.tensor([t for item in items for t in item.input_ids], dtype=torch.long)
        positions = torch.cat([torch.arange(len(item.input_ids)) for item in items])
        writes = []
        for name, pool in self.pools.items():
            rows = [i for i, item in enumerate(items) if item.pool == name]
            if not rows:
                continue
            token_index = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in rows])
            slots = torch.cat([pool.slots(items[i].block_table, 0, len(items[i].input_ids)) for i in rows])
            writes.append(KVWrite(pool.kv, token_index.to(self.device), slots.to(self.device)))
        meta = PrefillMetadata(cu_seqlens=cu, kv_writes=writes)
        hidden = self.model(ids.to(self.device), positions.to(self.device), self.backend, meta)
        last = hidden[torch.tensor(cu[1:], device=self.device) - 1]
        logits = self.model.compute_logits(last)
        return sample(logits, [SamplingRow(item.sampling, [], item.input_ids) for item in items])
