"""Checkpoint loaders: every loader returns HF-Llama-named float32 tensors plus a ``ModelConfig``."""

from adrenaline_py.weights.gguf import (
    GGUFCheckpoint,
    SpecialTokens,
    find_smollm2_gguf,
    load_gguf,
    permute_qk,
    unpermute_qk,
)

__all__ = [
    "GGUFCheckpoint",
    "SpecialTokens",
    "find_smollm2_gguf",
    "load_gguf",
    "permute_qk",
    "unpermute_qk",
]
