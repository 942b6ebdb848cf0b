"""Experiment: what a bucket every 32 rows from 128 to 768 costs at start-up.

Starts the in-process engine (`LocalEngine`: decode and the executor on one GPU, `--offload auto`,
`--max-decode-batch 768`, dummy llama-2-7b) with the buckets of the argument and prints the number
of decode graphs, the time and GPU memory their capture took (the decode service's log line) and the
engine's whole start-up. ``coarse``: the buckets before the thirteenth session (64 rows apart from
256 to 512, then 640 and 768); ``fine``: the code's.

    python3 docs/gpu_runs/2026-12-01-h200-thirteenth/graph_capture.py coarse|fine
"""

import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")  # decode and the executor share one CUDA context
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

import adrenaline_py.engine.cuda_graphs as cg  # noqa: E402
from adrenaline_py.config import EngineConfig  # noqa: E402
from adrenaline_py.engine.local import LocalEngine  # noqa: E402
from adrenaline_py.loader import load_checkpoint  # noqa: E402

COARSE_LOCAL = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896,
                1024, 1280, 1536, 1792, 2048)
COARSE_OFFLOADED = (8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


def main() -> None:
    variant = sys.argv[1]
    if variant == "coarse":
        cg.BATCH_BUCKETS, cg.OFFLOAD_BUCKETS = COARSE_LOCAL, COARSE_OFFLOADED
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ckpt = load_checkpoint("dummy:llama-2-7b")
    cfg = EngineConfig(model="dummy:llama-2-7b", device="cuda", dtype="bfloat16", offload="auto", max_model_len=2048,
                       max_tokens_limit=1024, max_decode_batch=768, prefill_gpu=0, decode_gpu=0)
    t0 = time.perf_counter()
    with LocalEngine(ckpt, cfg, dtype=torch.bfloat16) as engine:
        print(f"{variant}: {engine.decode.runner.graphs.num_graphs} decode graphs; engine ready in "
              f"{time.perf_counter() - t0:.1f} s; pools decode {engine.engine.num_decode_blocks} / executor "
              f"{engine.engine.num_executor_blocks} blocks", flush=True)


if __name__ == "__main__":
    main()
