"""Tensors shared by name between the serving processes: host shared memory or CUDA IPC.

Host (CPU) region: a file under the run directory (on /dev/shm) mapped with MAP_SHARED through
`torch.from_file`, so every process that maps it sees the same bytes.

GPU region: the creator allocates the tensor on its GPU and writes the CUDA IPC handle of its
storage into the file; attachers open the handle (`cudaIpcOpenMemHandle` through torch) and see
the same device memory, on the creator's GPU. The creator must outlive every attacher.

Either way the creator writes a ``.ready`` marker last; attachers wait for it, so model load
order inside Triton does not matter.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from pathlib import Path

import torch


def _region_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / f"{name}.shm"


def create_shared_tensor(
    run_dir: str | Path, name: str, shape: tuple[int, ...], dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Create (or re-create) a zero-filled shared tensor on ``device`` and mark it ready."""
    path = _region_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    ready = path.with_suffix(".ready")
    ready.unlink(missing_ok=True)
    device = torch.device(device)
    if device.type == "cuda":
        tensor = torch.zeros(shape, dtype=dtype, device=device)
        path.write_text(json.dumps(_cuda_handle(tensor)))
        _created_here[str(path)] = tensor
        ready.write_text(f"{list(shape)} {dtype} {device}")
        return tensor
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
    if ready.read_text().split()[-1].startswith("cuda"):
        if str(path) in _created_here:  # CUDA cannot open an IPC handle in the process that made it
            return _created_here[str(path)].view(shape)
        return _open_cuda_handle(json.loads(path.read_text()), shape, dtype)
    numel = math.prod(shape)
    expected = numel * torch.empty((), dtype=dtype).element_size()
    actual = os.path.getsize(path)
    if actual != expected:
        raise RuntimeError(f"shared region {path} has {actual} bytes, expected {expected} for {shape} {dtype}")
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)


# GPU regions this process created, by path (in-process engines attach to their own regions).
_created_here: dict[str, torch.Tensor] = {}


def _cuda_handle(tensor: torch.Tensor) -> dict:
    """What another process needs to map ``tensor``'s device memory (see torch.multiprocessing)."""
    (device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync) = (
        tensor.untyped_storage()._share_cuda_()
    )
    b64 = lambda b: base64.b64encode(b).decode() if b is not None else None
    return {"device": device, "handle": b64(handle), "size": size, "offset": offset,
            "ref_handle": b64(ref_handle), "ref_offset": ref_offset, "event_handle": b64(event_handle),
            "event_sync": event_sync, "storage_offset": tensor.storage_offset()}


def _open_cuda_handle(h: dict, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    unb64 = lambda s: base64.b64decode(s) if s is not None else None
    torch.cuda._lazy_init()  # opening a handle needs this process's CUDA context (torch.multiprocessing does the same)
    storage = torch.UntypedStorage._new_shared_cuda(
        h["device"], unb64(h["handle"]), h["size"], h["offset"], unb64(h["ref_handle"]), h["ref_offset"],
        unb64(h["event_handle"]), h["event_sync"],
    )
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if h["size"] < expected:
        raise RuntimeError(f"CUDA region has {h['size']} bytes, expected at least {expected} for {shape} {dtype}")
    t = torch.empty((0,), dtype=dtype, device=f"cuda:{h['device']}")
    return t.set_(storage, h["storage_offset"], shape)
