import torch

from adrenaline_py.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    DecodeMetadata,
    KVWrite,
    PrefillMetadata,
    build_decode_metadata,
    store_kv,
)
from adrenaline_py.attention.torch_backend import TorchAttentionBackend, paged_decode_attention
from adrenaline_py.attention.triton_decode import TritonAttentionBackend, triton_available


def make_attention_backend(device: torch.device | str) -> AttentionBackend:
    """The attention backend for a device: Triton kernels on CUDA (when triton is installed), torch elsewhere."""
    if torch.device(device).type == "cuda" and triton_available():
        return TritonAttentionBackend()
    return TorchAttentionBackend()


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "DecodeMetadata",
    "KVWrite",
    "PrefillMetadata",
    "build_decode_metadata",
    "TorchAttentionBackend",
    "TritonAttentionBackend",
    "make_attention_backend",
    "paged_decode_attention",
    "store_kv",
]
