"""Time the sampler's first sampled call with and without `sampler.warm_up` (one process each)."""
import sys
import time

import torch

from adrenaline_py import sampler
from adrenaline_py.request import SamplingParams
from adrenaline_py.sampler import SamplingRow, choose

dev, V = torch.device("cuda"), int(sys.argv[2]) if len(sys.argv) > 2 else 128256
logits = torch.randn(64, V, device=dev).bfloat16()
rows = [SamplingRow(SamplingParams(max_tokens=4, temperature=0.7, top_p=0.9, top_k=40, min_p=0.02, seed=i), [])
        for i in range(64)]
torch.cuda.synchronize()
if sys.argv[1] == "warm":
    t = time.perf_counter()
    sampler.warm_up(V, torch.bfloat16, dev)
    torch.cuda.synchronize()
    print(f"warm_up {1e3 * (time.perf_counter() - t):.0f} ms", end="; ")
for i in range(3):
    t = time.perf_counter()
    choose(logits, rows)
    torch.cuda.synchronize()
    print(f"{sys.argv[1]}: sampled call {i} {1e3 * (time.perf_counter() - t):.1f} ms", end="; ")
print()
