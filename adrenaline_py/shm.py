"""Tensors shared by name between the serving processes: host shared memory or CUDA IPC.

Host (CPU) region: a file under the run directory (on /dev/shm) mapped with MAP_SHARED through
`torch.from_file`, so every process that maps it sees the same bytes.

GPU region: the creator allocates plain device memory on its GPU (``cuMemAlloc``, outside torch's
caching allocator) and writes its IPC handle into the file. An attacher maps it into the context
of *its own* GPU (the current device) and gets a tensor of its own device: on another GPU the
bytes are reached through NVLink (peer access), so kernels and copies launched there read and
write them directly, and the attacher needs no CUDA context on the creator's GPU. The creator
must outlive every attacher's use; memory and mappings are released when the last tensor over
them is freed.

Either way the creator writes a ``.ready`` marker last; attachers wait for it, so model load
order inside Triton does not matter.
"""

from __future__ import annotations

import base64
import json
import math
import os
import threading
import time
import weakref
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
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        from adrenaline_py import cuda_driver as cu

        index = device.index if device.index is not None else torch.cuda.current_device()
        ptr = cu.mem_alloc(nbytes, index)
        tensor = cu.tensor_at(ptr, shape, dtype, index, on_free=lambda: cu.mem_free(ptr))
        tensor.zero_()
        torch.cuda.current_stream(index).synchronize()  # zeroed before anyone attaches
        path.write_text(json.dumps({"handle": base64.b64encode(cu.ipc_handle(ptr)).decode(), "device": index,
                                    "nbytes": nbytes}))
        _created_here[str(path)] = (ptr, weakref.ref(tensor))
        ready.write_text(f"{list(shape)} {dtype} cuda:{index}")
        return tensor
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
    device: int | None = None,
) -> torch.Tensor:
    """Map a tensor created by another process, waiting until its creator marked it ready.

    A GPU region comes back as a tensor of ``device`` (default: the current CUDA device), wherever
    its bytes live.
    """
    path = _region_path(run_dir, name)
    ready = path.with_suffix(".ready")
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"shared region {path} was not created within {timeout_s:.0f}s")
        time.sleep(0.05)
    numel = math.prod(shape)
    expected = numel * torch.empty((), dtype=dtype).element_size()
    if ready.read_text().split()[-1].startswith("cuda"):
        from adrenaline_py import cuda_driver as cu

        h = json.loads(path.read_text())
        if h["nbytes"] < expected:
            raise RuntimeError(f"CUDA region {path} has {h['nbytes']} bytes, expected {expected} for {shape} {dtype}")
        here = torch.cuda.current_device() if device is None else device
        created = _created_here.get(str(path))
        tensor = created[1]() if created is not None else None
        if tensor is not None:  # CUDA cannot open an IPC handle in the process that made it
            ptr = created[0]
            if tensor.device.index == here:
                return tensor.view(-1)[:numel].view(shape)
            cu.enable_peer_access(here, tensor.device.index)  # one process, two GPUs (in-process engine)
            return cu.tensor_at(ptr, shape, dtype, here, on_free=lambda keep=tensor: None)  # keeps the memory
        address, release = _open(h["handle"], here)
        return cu.tensor_at(address, shape, dtype, here, on_free=release)
    actual = os.path.getsize(path)
    if actual != expected:
        raise RuntimeError(f"shared region {path} has {actual} bytes, expected {expected} for {shape} {dtype}")
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)


def ipc_address(run_dir: str | Path, name: str, device: int | None = None, timeout_s: float = 120.0) -> int:
    """The address of a GPU region in ``device``'s context (for copies and stream memory operations).

    The mapping stays for the life of the process.
    """
    t = attach_shared_tensor(run_dir, name, (1,), torch.uint8, timeout_s, device)
    _pinned.append(t)
    return t.data_ptr()


# GPU regions this process created, by path: (address, weak reference to the creator's tensor: the
# memory is freed with that tensor).
_created_here: dict[str, tuple[int, weakref.ref]] = {}
# Regions of other processes mapped here, by (handle, device): [address, number of tensors over it].
_opened: dict[tuple[str, int], list[int]] = {}
_opened_lock = threading.Lock()
_pinned: list[torch.Tensor] = []  # tensors kept for `ipc_address` users


def _open(handle_b64: str, device: int):
    """Map a handle once per (process, device); unmap when the last tensor over it is freed."""
    from adrenaline_py import cuda_driver as cu

    key = (handle_b64, device)
    with _opened_lock:
        entry = _opened.get(key)
        if entry is None:
            entry = _opened[key] = [cu.ipc_open(base64.b64decode(handle_b64), device), 0]
        entry[1] += 1

    def release() -> None:
        with _opened_lock:
            entry[1] -= 1
            if entry[1] == 0 and _opened.get(key) is entry:
                del _opened[key]
                cu.ipc_close(entry[0])

    return entry[0], release
