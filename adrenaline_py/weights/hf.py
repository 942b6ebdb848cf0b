"""Checkpoints in the Hugging Face layout: config.json, *.safetensors, tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers

from adrenaline_py.config import ModelConfig
from adrenaline_py.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch only for the weights: the HTTP front loads just the tokenizer
    import torch


def load_hf_config(path: Path) -> ModelConfig:
    cfg = json.loads((path / "config.json").read_text())
    arch = cfg.get("model_type", "llama")
    if arch not in ("llama", "mistral"):
        raise ValueError(f"{path}: model_type {arch!r} is not a Llama-family model")
    gen = path / "generation_config.json"
    if gen.exists() and "eos_token_id" in (g := json.loads(gen.read_text())):
        cfg = {**cfg, "eos_token_id": g["eos_token_id"]}
    return ModelConfig.from_hf_dict(cfg)


def load_hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value


def load_hf_tokenizer(path: Path, config: ModelConfig) -> Tokenizer:
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tcfg_path = path / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.exists() else {}
    special = {k: t for k in ("bos_token", "eos_token") if (t := _token_text(tcfg.get(k)))}
    eos_ids = set(config.eos_token_ids)
    if "eos_token" in special and (i := tok.token_to_id(special["eos_token"])) is not None:
        eos_ids.add(i)
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return Tokenizer(tok, tuple(sorted(eos_ids)), template, special)
