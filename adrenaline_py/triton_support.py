"""Optional Triton: the kernel modules import it from here, with the checks they share.

Triton ships with CUDA builds of torch only. On a machine without it (the CPU serving path) every
kernel module still imports; the entry points raise a clear error and callers use the torch paths.
``TRITON_INTERPRET=1`` runs the kernels on CPU tensors in Triton's interpreter, for debugging.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    IMPORT_ERROR = exc

LOG2E = 1.4426950408889634  # the kernels' softmax works in base 2


def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_triton(t: torch.Tensor) -> bool:
    """Whether a kernel can run on ``t``: triton present and a CUDA tensor (or the interpreter)."""
    return triton is not None and (t.is_cuda or interpreting())


def check_triton(name: str, t: torch.Tensor) -> None:
    """Raise a clear error when ``name`` cannot run on ``t`` here."""
    if triton is None:
        raise RuntimeError(f"{name} needs the 'triton' package and a CUDA GPU (import failed: {IMPORT_ERROR}); "
                           "use TorchAttentionBackend on this machine")
    if not runs_triton(t):
        raise RuntimeError(f"{name} runs on CUDA tensors only")


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


__all__ = ["IMPORT_ERROR", "LOG2E", "check_triton", "interpreting", "next_pow2", "runs_triton", "tl", "triton",
           "triton_available"]
