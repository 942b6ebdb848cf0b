"""The per-kernel model of a decode step (`adrenaline bench engine`), against the model itself."""

import pytest
import torch

from adrenaline_py.bench import (
    kernel_floor_ms,
    kv_bytes_per_token,
    overlapped_step_ms,
    step_kernels,
    weight_bytes_read,
)
from adrenaline_py.loader import build_model, load_checkpoint


def test_step_kernels_read_every_weight_once_and_the_context_kv_once():
    ckpt = load_checkpoint("dummy:tiny")
    cfg = ckpt.config
    model = build_model(ckpt, torch.float32, torch.device("cpu"), max_positions=64)
    # With no rows only the weights remain: they must be exactly the parameters a step reads.
    empty = step_kernels(cfg, batch=0, ctx=0, elem=4)
    assert sum(nbytes for _, nbytes, _ in empty) == weight_bytes_read(model)
    assert sum(flops for _, _, flops in empty) == 0
    attention = {name: (nbytes, flops) for name, nbytes, flops in step_kernels(cfg, 3, 100, 4)}
    att_bytes, att_flops = attention[f"attention (x{cfg.num_hidden_layers})"]
    q_and_out = 2 * 3 * cfg.num_attention_heads * cfg.head_dim * 4 * cfg.num_hidden_layers
    assert att_bytes == 3 * 100 * kv_bytes_per_token(cfg, 4) + q_and_out
    assert att_flops == 4 * 3 * 100 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers


def test_kernel_floor_takes_the_slower_bound_of_each_kernel():
    cfg = load_checkpoint("dummy:llama-3.1-8b").config
    kernels = step_kernels(cfg, 256, 1024, 2)
    fast_math = kernel_floor_ms(cfg, 256, 1024, 2, copy_gbs=4000.0, tflops=1e9)   # bytes bind everywhere
    assert abs(fast_math - sum(b for _, b, _ in kernels) / 4000.0 / 1e6) < 1e-9
    slow_math = kernel_floor_ms(cfg, 256, 1024, 2, copy_gbs=4000.0, tflops=100.0)
    assert slow_math > fast_math                                               # FLOPs bind the GEMMs
    assert slow_math >= sum(f for _, _, f in kernels) / 100.0 / 1e9


def test_overlapped_timing_launches_each_step_before_reading_the_last_and_reads_every_step_once():
    log: list[tuple] = []
    count = iter(range(10**6))

    def launch(pending):
        n = next(count)
        log.append(("launch", n, pending))
        return n

    def collect(n):
        log.append(("collect", n))

    ms = overlapped_step_ms(launch, collect, steps=4, repeats=3)
    assert ms >= 0
    runs = [log[i:i + 8] for i in range(0, len(log), 8)]
    assert len(runs) == 4 and sum(map(len, runs)) == len(log)  # one warm-up run + 3 timed runs
    for run in runs:
        first = run[0][1]
        # launch 0, launch 1 (from 0), collect 0, launch 2 (from 1), collect 1, ..., collect the last
        assert run == [("launch", first, None), ("launch", first + 1, first), ("collect", first),
                       ("launch", first + 2, first + 1), ("collect", first + 1),
                       ("launch", first + 3, first + 2), ("collect", first + 2), ("collect", first + 3)]


def test_overlapped_timing_waits_out_the_steps_in_flight_when_a_step_fails():
    launched, dropped = [], []

    def launch(pending):
        if len(launched) == 3:
            raise RuntimeError("executor gone")
        launched.append(len(launched))
        return launched[-1]

    with pytest.raises(RuntimeError, match="executor gone"):
        overlapped_step_ms(launch, lambda n: None, steps=5, repeats=1, drop=dropped.append)
    # steps 0 and 1 were collected; step 2 was in flight when launching step 3 failed
    assert dropped == [2]
