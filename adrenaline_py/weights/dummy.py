"""Random weights of a named real shape, for benchmarks, plus a byte-level tokenizer for them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from adrenaline_py.config import NAMED_SHAPES, ModelConfig
from adrenaline_py.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch only for the weights: the HTTP front loads just the tokenizer
    import torch


def dummy_config(shape: str) -> ModelConfig:
    if shape not in NAMED_SHAPES:
        raise ValueError(f"unknown dummy shape {shape!r}; known: {sorted(NAMED_SHAPES)}")
    return NAMED_SHAPES[shape]


def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Small random weights (std 0.02, norms at 1) drawn where the model lives (GPU or CPU)."""
    import torch

    gen_device = next(model.parameters()).device
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def byte_tokenizer(config: ModelConfig) -> Tokenizer:
    """One token per byte (ids 0-255): lets dummy models serve any text without a vocabulary."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok, tuple(config.eos_token_ids))
