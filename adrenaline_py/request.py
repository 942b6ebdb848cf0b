"""Client request contract: parse and validate the ensemble's inputs into `GenerationParams`.

Inputs follow the TensorRT-LLM ``ensemble`` names and the vLLM backend's ``sampling_parameters``
JSON. Explicit tensors win over keys of the JSON; stop and bad word lists from both are merged.
Every problem raises `InvalidRequest` with a message meant for the client; the Triton model turns
it into that request's error.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class InvalidRequest(ValueError):
    """A client error: the message is sent back as the request's error."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0        # 0 → greedy (the default, like TensorRT-LLM)
    top_k: int = 0                  # 0 → no top-k cut
    top_p: float = 1.0
    seed: int = 0                   # drawn at random when the client gives none
    min_tokens: int = 0
    end_ids: tuple[int, ...] = ()   # tokens that end the sequence (``end_id`` or the model's EOS)
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()      # stop strings, matched on the text, excluded from the output
    bad_words_ids: tuple[tuple[int, ...], ...] = ()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class OutputOptions:
    stream: bool = False
    exclude_input_in_output: bool = True
    return_num_input_tokens: bool = True
    return_num_output_tokens: bool = True


@dataclass(frozen=True)
class GenerationParams:
    """What the preprocessing model hands on: validated, JSON-serialisable."""

    sampling: SamplingParams
    output: OutputOptions = field(default_factory=OutputOptions)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> GenerationParams:
        d = json.loads(text)
        s = d["sampling"]
        s["end_ids"] = tuple(s["end_ids"])
        s["stop"] = tuple(s["stop"])
        s["bad_words_ids"] = tuple(tuple(w) for w in s["bad_words_ids"])
        return cls(SamplingParams(**s), OutputOptions(**d["output"]))


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    max_tokens_limit: int
    default_max_tokens: int


# Input tensor name → (kind, aliases of the same setting in sampling_parameters JSON).
_SCALAR_INPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "max_tokens": ("int", ("max_tokens",)),
    "temperature": ("float", ("temperature",)),
    "top_k": ("int", ("top_k",)),
    "top_p": ("float", ("top_p",)),
    "seed": ("int", ("seed",)),
    "random_seed": ("int", ("seed",)),
    "min_tokens": ("int", ("min_tokens",)),
    "min_length": ("int", ("min_tokens",)),
    "end_id": ("int", ()),
    "pad_id": ("int", ()),
    "stream": ("bool", ()),
    "exclude_input_in_output": ("bool", ()),
    "return_num_input_tokens": ("bool", ()),
    "return_num_output_tokens": ("bool", ()),
}

_JSON_KEYS = {
    "max_tokens", "temperature", "top_k", "top_p", "seed", "min_tokens", "stop", "bad_words",
    "ignore_eos", "n", "stop_token_ids", "skip_special_tokens", "best_of", "use_beam_search",
}


def decode_text(value: Any, name: str) -> str:
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"{name} is not valid UTF-8: {e}") from None
    if isinstance(value, str):
        return value
    raise InvalidRequest(f"{name} must be a string (BYTES tensor), got {type(value).__name__}")


def _single(array: np.ndarray, name: str) -> Any:
    """The one element of a [1] or [1, 1] tensor."""
    if array.size != 1:
        raise InvalidRequest(
            f"input '{name}' must hold exactly one value per request, got shape {list(array.shape)}"
        )
    return array.reshape(-1)[0]


def _strings(array: np.ndarray, name: str) -> list[str]:
    return [decode_text(v, name) for v in array.reshape(-1)]


def parse_request(inputs: dict[str, np.ndarray], limits: Limits) -> tuple[str, dict[str, Any]]:
    """Validate raw input tensors; returns the prompt text and the settings before tokenization.

    Tokenization-dependent checks (prompt length, bad words) happen in `finish_params`.
    """
    if "text_input" not in inputs:
        raise InvalidRequest("missing required input 'text_input'")
    prompt = decode_text(_single(inputs["text_input"], "text_input"), "text_input")
    if not prompt:
        raise InvalidRequest("text_input is empty")

    settings: dict[str, Any] = {}
    if "sampling_parameters" in inputs:
        raw = decode_text(_single(inputs["sampling_parameters"], "sampling_parameters"), "sampling_parameters")
        if raw.strip():
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError as e:
                raise InvalidRequest(f"sampling_parameters is not valid JSON: {e}") from None
            if not isinstance(parsed, dict):
                raise InvalidRequest("sampling_parameters must be a JSON object")
            unknown = sorted(set(parsed) - _JSON_KEYS)
            if unknown:
                raise InvalidRequest(f"sampling_parameters has unsupported keys: {unknown}")
            settings.update(_from_json(parsed))

    for name, (kind, aliases) in _SCALAR_INPUTS.items():
        if name not in inputs:
            continue
        value = _single(inputs[name], name)
        key = aliases[0] if aliases else name
        if kind == "bool":
            settings[key] = bool(value)
        elif kind == "int":
            if not np.issubdtype(np.asarray(value).dtype, np.integer):
                raise InvalidRequest(f"input '{name}' must be an integer")
            settings[key] = int(value)
        else:
            settings[key] = float(value)
        if name == "top_k" and settings[key] < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {settings[key]}")

    for name in ("stop_words", "bad_words"):
        if name in inputs:
            words = [w for w in _strings(inputs[name], name) if w]
            key = "stop" if name == "stop_words" else "bad_words"
            settings[key] = list(settings.get(key, ())) + words

    check_ranges(settings, limits)
    return prompt, settings


def _from_json(p: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def number(key: str, kind: type) -> None:
        if key not in p or p[key] is None:
            return
        v = p[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not float(v).is_integer()):
            raise InvalidRequest(f"sampling_parameters.{key} must be {'an integer' if kind is int else 'a number'}")
        out[key] = kind(v)

    for key in ("max_tokens", "top_k", "seed", "min_tokens", "n", "best_of"):
        number(key, int)
    for key in ("temperature", "top_p"):
        number(key, float)
    if out.pop("n", 1) != 1 or out.pop("best_of", 1) not in (1, None) or p.get("use_beam_search"):
        raise InvalidRequest("only n=1 without beam search is supported")
    if out.get("top_k") == -1:  # vLLM's spelling of "no top-k"
        out["top_k"] = 0
    elif out.get("top_k", 0) < 0:
        raise InvalidRequest(f"sampling_parameters.top_k must be >= -1, got {out['top_k']}")
    for key in ("stop", "bad_words"):
        if key in p and p[key] is not None:
            v = p[key]
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise InvalidRequest(f"sampling_parameters.{key} must be a string or a list of strings")
            out[key] = [s for s in v if s]
    if "stop_token_ids" in p:
        ids = p["stop_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise InvalidRequest("sampling_parameters.stop_token_ids must be a list of integers")
        out["stop_token_ids"] = ids
    if "ignore_eos" in p:
        out["ignore_eos"] = bool(p["ignore_eos"])
    return out


def check_ranges(s: dict[str, Any], limits: Limits) -> None:
    """Range checks of the settings that need no tokenizer."""
    max_tokens = s.get("max_tokens", limits.default_max_tokens)
    if max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be > 0, got {max_tokens}")
    if max_tokens > limits.max_tokens_limit:
        raise InvalidRequest(f"max_tokens must be <= {limits.max_tokens_limit}, got {max_tokens}")
    t = s.get("temperature", 0.0)
    if not np.isfinite(t) or t < 0:
        raise InvalidRequest(f"temperature must be >= 0, got {t}")
    p = s.get("top_p", 1.0)
    if not (0.0 < p <= 1.0):
        raise InvalidRequest(f"top_p must be in (0, 1], got {p}")
    if s.get("min_tokens", 0) < 0:
        raise InvalidRequest(f"min_tokens must be >= 0, got {s['min_tokens']}")
    if s.get("min_tokens", 0) > max_tokens:
        raise InvalidRequest(f"min_tokens ({s['min_tokens']}) must be <= max_tokens ({max_tokens})")
    for key in ("seed", "end_id", "pad_id"):
        if key in s and s[key] < 0:
            raise InvalidRequest(f"{key} must be >= 0, got {s[key]}")


def finish_params(
    settings: dict[str, Any],
    num_prompt_tokens: int,
    limits: Limits,
    vocab_size: int,
    eos_ids: tuple[int, ...],
    tokenize_word,
) -> GenerationParams:
    """Checks that need the tokenized prompt, then builds the hand-on parameters."""
    max_tokens = settings.get("max_tokens", limits.default_max_tokens)
    if num_prompt_tokens + max_tokens > limits.max_model_len:
        raise InvalidRequest(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context "
            f"of {limits.max_model_len} tokens"
        )
    end_ids = eos_ids
    if "end_id" in settings:
        end_ids = (settings["end_id"],)
    elif settings.get("ignore_eos"):
        end_ids = ()
    extra = tuple(settings.get("stop_token_ids", ()))
    for t in (*end_ids, *extra):
        if not 0 <= t < vocab_size:
            raise InvalidRequest(f"token id {t} is outside the vocabulary (size {vocab_size})")
    seed = settings["seed"] if "seed" in settings else random.getrandbits(63)
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=settings.get("temperature", 0.0),
        top_k=settings.get("top_k", 0),
        top_p=settings.get("top_p", 1.0),
        seed=seed,
        min_tokens=settings.get("min_tokens", 0),
        end_ids=tuple(dict.fromkeys((*end_ids, *extra))),
        ignore_eos=settings.get("ignore_eos", False),
        stop=tuple(settings.get("stop", ())),
        bad_words_ids=tuple(ids for w in settings.get("bad_words", ()) if (ids := tuple(tokenize_word(w)))),
    )
    output = OutputOptions(
        stream=settings.get("stream", False),
        exclude_input_in_output=settings.get("exclude_input_in_output", True),
        return_num_input_tokens=settings.get("return_num_input_tokens", True),
        return_num_output_tokens=settings.get("return_num_output_tokens", True),
    )
    return GenerationParams(sampling, output)
