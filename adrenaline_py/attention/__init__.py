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

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "DecodeMetadata",
    "KVWrite",
    "PrefillMetadata",
    "build_decode_metadata",
    "TorchAttentionBackend",
    "paged_decode_attention",
    "store_kv",
]
