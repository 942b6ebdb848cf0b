"""Where each role runs, decided in one place, and binding a thread to its device.

Roles: ``prefill`` and the attention ``executor`` share the prefill GPU (GPU P), ``decode`` runs on
the decode GPU (GPU D); with one GPU all three are on it; on CPU everything is on the CPU. A KV
pool lives with its owner: ``decode``'s on GPU D, ``executor``'s on GPU P.

CUDA's "current device" is per thread, and torch ops on tensors follow the tensor's device but
Triton kernels, graph capture and the driver calls of the transport use the *current* device.
So every process and every thread that launches GPU work calls `bind(device)` before it does
anything else (the decode loop, the executor's serving thread, the prefill worker, output threads
that touch tensors). Shared regions of other processes are attached as tensors of the attaching
process's own device (adrenaline_py/shm.py), so a process only ever works on its one device.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from adrenaline_py.config import EngineConfig

ROLES = ("prefill", "executor", "decode")


@dataclass(frozen=True)
class Placement:
    prefill: torch.device
    executor: torch.device
    decode: torch.device

    @classmethod
    def of(cls, engine: EngineConfig) -> Placement:
        if engine.device == "cpu":
            cpu = torch.device("cpu")
            return cls(cpu, cpu, cpu)
        p, d = torch.device("cuda", engine.prefill_gpu), torch.device("cuda", engine.decode_gpu)
        return cls(prefill=p, executor=p, decode=d)

    def device(self, role: str) -> torch.device:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (one of {ROLES})")
        return getattr(self, role)

    def pool_device(self, pool: str) -> torch.device:
        """A KV pool lives on its owner's device: ``decode`` on GPU D, ``executor`` on GPU P."""
        if pool == "decode":
            return self.decode
        if pool == "executor":
            return self.executor
        raise ValueError(f"unknown KV pool {pool!r}")

    @property
    def is_two_gpus(self) -> bool:
        return self.decode != self.executor


def bind(device: torch.device, own_stream: bool = False) -> None:
    """Make ``device`` this thread's current CUDA device, with its primary context current (no-op on CPU).

    Call it first in every process and thread that launches work on a GPU. ``own_stream``: this
    thread's work goes to a stream of its own (torch's current stream is per thread). The decode
    loop and the executor need it: in one process on one GPU they would otherwise share the default
    stream, and the executor's kernels would queue behind decode's spin-wait for them (a deadlock).
    """
    if device.type != "cuda":
        return
    index = device.index if device.index is not None else 0
    torch.cuda.set_device(index)
    from adrenaline_py import cuda_driver

    cuda_driver.make_current(index)  # driver calls (IPC, memory) of this thread use it too
    if own_stream:
        torch.cuda.set_stream(private_stream(device, threading.current_thread().name))


_private: dict[tuple[int, str], torch.cuda.Stream] = {}
_private_lock = threading.Lock()


def private_stream(device: torch.device, name: str) -> torch.cuda.Stream:
    """The stream called ``name`` on ``device``: one CUDA stream that no other name gets in this process.

    torch hands its streams out of a pool of 32 per device, round robin, so two `torch.cuda.Stream()`
    calls 32 apart (graph captures used to take one each) are the same CUDA stream. Where one side spins on the
    GPU waiting for another (the offload exchange's flag waits, with decode and the executor in one
    process on one GPU) or releases such waits (the watchdogs), the streams must differ, or the
    awaited work queues behind the wait that awaits it. Pool streams are non-blocking (no implicit
    synchronization with the legacy default stream).
    """
    index = device.index if device.index is not None else 0
    with _private_lock:
        stream = _private.get((index, name))
        if stream is None:
            taken = {s.cuda_stream for (i, _), s in _private.items() if i == index}
            for _ in range(64):
                stream = torch.cuda.Stream(index)
                if stream.cuda_stream not in taken:
                    break
            else:
                raise RuntimeError(f"no CUDA stream of cuda:{index} left for {name!r}: {len(taken)} are private")
            _private[(index, name)] = stream
        return stream


def bind_role(role: str, engine: EngineConfig) -> torch.device:
    """`bind` the calling thread to ``role``'s device and return that device."""
    device = Placement.of(engine).device(role)
    bind(device)
    return device
