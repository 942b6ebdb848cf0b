"""Tensors in POSIX shared memory, shared by name between the serving processes (CPU path).

A region is a file under the run directory (on /dev/shm) mapped with MAP_SHARED through
`torch.from_file`, so every process that maps it sees the same bytes. The creator writes a
``.ready`` marker last; attachers wait for it, so model load order inside Triton does not matter.
On GPUs the same roles use CUDA IPC handles instead (see docs/architecture.md).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch


def _region_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / f"{name}.shm"


def create_shared_tensor(
    run_dir: str | Path, name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Create (or re-create) a zero-filled shared tensor and mark it ready."""
    path = _region_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    ready = path.with_suffix(".ready")
    ready.unlink(missing_ok=True)
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    with open(path, "wb") as f:
        f.truncate(nbytes)  # sparse zero pages
    tensor = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
    ready.write_text(f"{list(shape)} {dtype}")
    return tensor


def attach_shared_tensor(
    run_dir: str | Path,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    timeout_s: float = 120.0,
) -> torch.Tensor:
    """Map a tensor created by another process, waiting until its creator marked it ready."""
    path = _region_path(run_dir, name)
    ready = path.with_suffix(".ready")
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"shared region {path} was not created within {timeout_s:.0f}s")
        time.sleep(0.05)
    numel = math.prod(shape)
    expected = numel * torch.empty((), dtype=dtype).element_size()
    actual = os.path.getsize(path)
    if actual != expected:
        raise RuntimeError(f"shared region {path} has {actual} bytes, expected {expected} for {shape} {dtype}")
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
