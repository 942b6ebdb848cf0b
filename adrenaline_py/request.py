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
    min_p: float = 0.0              # keep tokens with probability >= min_p x the most likely one's (0 → off)
    seed: int = 0                   # drawn at random when the client gives none
    min_tokens: int = 0
    end_ids: tuple[int, ...] = ()   # tokens that end the sequence (``end_id`` or the model's EOS)
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()      # stop strings, matched on the text, excluded from the output
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    repetition_penalty: float = 1.0  # 1 → off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_mode: str = "trtllm"    # whose convention the penalties follow: "trtllm" | "vllm" (sampler.py)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


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

    @property
    def max_prompt_bytes(self) -> int:
        """Largest text_input accepted, checked before tokenizing (a 100 MB prompt took 13 GB and
        minutes to tokenize only to be refused for its length)."""
        return max(self.max_model_len * PROMPT_BYTES_PER_TOKEN, 1 << 16)


# Hostile-input bounds (docs/reliability.md). A context-filling prompt averages well under 32 bytes
# per token (English ~4, CJK ~3-6); only text that could never fit the context goes over.
PROMPT_BYTES_PER_TOKEN = 32
MAX_WORDS = 256               # stop_words / bad_words entries per request
MAX_WORD_BYTES = 4096         # bytes of one stop or bad word (stop strings are matched every step)
MAX_JSON_BYTES = 1 << 16      # sampling_parameters
MIN_TEMPERATURE = 1e-5        # below this (but > 0) logits / temperature overflows to inf
INT32_MAX = 2**31 - 1         # token ids and top_k reach int32 tensors
UINT64_MAX = 2**64 - 1        # seeds: random_seed is UINT64


def check_text_bytes(value: Any, name: str, limit: int) -> None:
    """Refuse a string input longer than ``limit`` bytes before it is decoded or tokenized."""
    if isinstance(value, bytes | np.bytes_ | str) and len(value) > limit:
        raise InvalidRequest(f"{name} is {len(value)} bytes; at most {limit} are accepted")


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
    "repetition_penalty": ("float", ("repetition_penalty",)),
    "presence_penalty": ("float", ("presence_penalty",)),
    "frequency_penalty": ("float", ("frequency_penalty",)),
    "length_penalty": ("float", ("length_penalty",)),
    # TensorRT-LLM ensemble inputs its clients send; only the values this server implements pass.
    "beam_width": ("int", ()),
    "num_return_sequences": ("int", ()),
    "return_log_probs": ("bool", ()),
    "return_context_logits": ("bool", ()),
    "return_generation_logits": ("bool", ()),
    "return_perf_metrics": ("bool", ()),
}

_JSON_KEYS = {
    "max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "min_tokens", "stop", "bad_words",
    "ignore_eos", "n", "stop_token_ids", "skip_special_tokens", "best_of", "use_beam_search",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "length_penalty",
}

#: The client conventions: "trtllm" (the `ensemble` model, TensorRT-LLM's tensors plus the vLLM-style
#: JSON) and "vllm" (the `vllm_model` entry, the vLLM backend's request). Defaults that differ:
API_DEFAULTS: dict[str, dict[str, Any]] = {
    "trtllm": {"exclude_input_in_output": False},  # TensorRT-LLM echoes the prompt unless asked not to
    "vllm": {"temperature": 1.0},                  # vLLM's SamplingParams default: sampling
}

# The vLLM backend converts each sampling_parameters value to its SamplingParams field's type, so
# "max_tokens": "100" means 100 (src/model.py get_sampling_params_dict in r24.10; r25.12 converts by
# the field annotations). Keys vLLM knows but this server only takes at their default value are
# checked in `_vllm_json`.
_VLLM_INT_KEYS = {"max_tokens", "min_tokens", "n", "best_of", "top_k", "seed", "logprobs", "prompt_logprobs"}
_VLLM_FLOAT_KEYS = {"temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "length_penalty"}
_VLLM_BOOL_KEYS = {"ignore_eos", "skip_special_tokens", "use_beam_search", "include_stop_str_in_output",
                   "detokenize", "spaces_between_special_tokens", "early_stopping"}


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


def parse_request(inputs: dict[str, np.ndarray], limits: Limits, api: str = "trtllm") -> tuple[str, dict[str, Any]]:
    """Validate raw input tensors; returns the prompt text and the settings before tokenization.

    ``api``: the client convention (`API_DEFAULTS`). Tokenization-dependent checks (prompt length,
    bad words) happen in `finish_params`.
    """
    if "text_input" not in inputs:
        raise InvalidRequest("missing required input 'text_input'")
    raw_prompt = _single(inputs["text_input"], "text_input")
    check_text_bytes(raw_prompt, "text_input", limits.max_prompt_bytes)
    prompt = decode_text(raw_prompt, "text_input")
    if not prompt:
        raise InvalidRequest("text_input is empty")

    settings: dict[str, Any] = {}
    json_keys: set[str] = set()
    if "sampling_parameters" in inputs:
        raw = _single(inputs["sampling_parameters"], "sampling_parameters")
        check_text_bytes(raw, "sampling_parameters", MAX_JSON_BYTES)
        raw = decode_text(raw, "sampling_parameters")
        if raw.strip():
            try:
                parsed = json.loads(raw)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, too deep
                raise InvalidRequest(f"sampling_parameters is not valid JSON: {e}") from None
            if not isinstance(parsed, dict):
                raise InvalidRequest("sampling_parameters must be a JSON object")
            if api == "vllm":
                parsed = _vllm_json(parsed)
            json_keys = set(parsed)
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
            if inputs[name].size > MAX_WORDS:
                raise InvalidRequest(f"{name} has {inputs[name].size} entries; at most {MAX_WORDS} are accepted")
            for w in inputs[name].reshape(-1):
                check_text_bytes(w, name, MAX_WORD_BYTES)
            words = [w for w in _strings(inputs[name], name) if w]
            key = "stop" if name == "stop_words" else "bad_words"
            settings[key] = list(settings.get(key, ())) + words

    _check_unsupported(settings)
    if api == "trtllm":
        _trtllm_sampling_defaults(settings, inputs, json_keys)
    check_ranges(settings, limits)
    _check_penalties(settings, api)
    return prompt, settings


# TensorRT-LLM inputs accepted only at the value this server implements: (default, why not more).
_ONLY_DEFAULT = {
    "beam_width": (1, "beam search is not implemented"),
    "num_return_sequences": (1, "one sequence is generated per request"),
    "return_log_probs": (False, "log probabilities are not returned"),
    "return_context_logits": (False, "logits are not returned"),
    "return_generation_logits": (False, "logits are not returned"),
    "return_perf_metrics": (False, "per-request perf metrics are not returned"),
}


def _check_unsupported(settings: dict[str, Any]) -> None:
    for key, (default, why) in _ONLY_DEFAULT.items():
        value = settings.pop(key, default)
        if value != default:
            raise InvalidRequest(f"{key}={value} is not supported ({why}); send {str(default).lower()} or leave it out")
    # Only beam search reads a length penalty, and the beam width is 1: accepted, no effect.
    settings.pop("length_penalty", None)


def _trtllm_sampling_defaults(settings: dict[str, Any], inputs: dict[str, np.ndarray], json_keys: set[str]) -> None:
    """TensorRT-LLM's sampling defaults, for requests that use its tensors.

    Its top_k and top_p default to 0, and top_k 0 with top_p 0 is greedy whatever the temperature
    (its sampling layer turns them into top_k 1): so a `temperature` tensor alone, as its
    end_to_end_grpc_client.py sends, decodes greedily. Its temperature defaults to 1.0, so a top_k or
    top_p tensor alone samples at temperature 1. Keys of the vLLM-style JSON keep their meaning.
    """
    top_k_tensor = "top_k" in inputs and settings["top_k"] > 0
    asks_sampling = top_k_tensor or "top_p" in settings or "top_k" in json_keys
    if "temperature" in inputs and not asks_sampling:
        settings["top_k"] = 1
    elif (top_k_tensor or "top_p" in inputs) and "temperature" not in settings:
        settings["temperature"] = 1.0


def _check_penalties(s: dict[str, Any], api: str) -> None:
    r = s.get("repetition_penalty", 1.0)
    if not (np.isfinite(r) and r > 0):
        raise InvalidRequest(f"repetition_penalty must be > 0, got {r}")
    for key in ("presence_penalty", "frequency_penalty"):
        v = s.get(key, 0.0)
        if not np.isfinite(v):
            raise InvalidRequest(f"{key} must be a finite number, got {v}")
        if api == "vllm" and not -2.0 <= v <= 2.0:  # vLLM's SamplingParams range
            raise InvalidRequest(f"{key} must be in [-2, 2], got {v}")


def _vllm_json(p: dict[str, Any]) -> dict[str, Any]:
    """The vLLM backend's sampling_parameters: string values converted by the key's type; vLLM keys
    that this server takes only at their default are checked and dropped."""
    out = dict(p)
    for key, v in p.items():
        if not isinstance(v, str):
            continue
        try:
            if key in _VLLM_INT_KEYS:
                out[key] = int(v)
            elif key in _VLLM_FLOAT_KEYS:
                out[key] = float(v)
            elif key in _VLLM_BOOL_KEYS:
                # Stricter than the vLLM backend, whose bool("false") is True.
                out[key] = {"true": True, "1": True, "false": False, "0": False}[v.strip().lower()]
        except (ValueError, KeyError):
            kind = "an integer" if key in _VLLM_INT_KEYS else "a number" if key in _VLLM_FLOAT_KEYS else "a boolean"
            raise InvalidRequest(f"sampling_parameters.{key} must be {kind}, got {v!r}") from None
    if out.pop("lora_name", None) is not None:
        raise InvalidRequest("LoRA feature is not enabled.")  # the vLLM backend's message
    for key in ("logprobs", "prompt_logprobs"):
        if out.pop(key, None) is not None:
            raise InvalidRequest(f"sampling_parameters.{key} is not supported: log probabilities are not returned")
    if out.pop("include_stop_str_in_output", False):
        raise InvalidRequest("sampling_parameters.include_stop_str_in_output=true is not supported")
    if out.pop("detokenize", True) is False:
        raise InvalidRequest("sampling_parameters.detokenize=false is not supported")
    # Special tokens are always left out of the text; beam search only: no effect here.
    for key in ("spaces_between_special_tokens", "early_stopping"):
        out.pop(key, None)
    return out


def _from_json(p: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def number(key: str, kind: type) -> None:
        if key not in p or p[key] is None:
            return
        v = p[key]
        # an int is checked as an int: float() of a 400-digit JSON integer raises OverflowError
        if (isinstance(v, bool) or not isinstance(v, int | float)
                or (kind is int and not isinstance(v, int) and not float(v).is_integer())):
            raise InvalidRequest(f"sampling_parameters.{key} must be {'an integer' if kind is int else 'a number'}")
        try:
            out[key] = kind(v)
        except OverflowError:
            raise InvalidRequest(f"sampling_parameters.{key} is out of range") from None

    for key in ("max_tokens", "top_k", "seed", "min_tokens", "n", "best_of"):
        number(key, int)
    for key in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                "length_penalty"):
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
    if 0 < t < MIN_TEMPERATURE:  # 1e-45 and other denormals: logits / t is inf, probabilities nan
        raise InvalidRequest(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {t:g}")
    if s.get("top_k", 0) > INT32_MAX:
        raise InvalidRequest(f"top_k must be <= {INT32_MAX}, got {s['top_k']}")
    p = s.get("top_p", 1.0)
    if not (0.0 < p <= 1.0):
        raise InvalidRequest(f"top_p must be in (0, 1], got {p}")
    m = s.get("min_p", 0.0)
    if not (0.0 <= m <= 1.0):
        raise InvalidRequest(f"min_p must be in [0, 1], got {m}")
    if s.get("min_tokens", 0) < 0:
        raise InvalidRequest(f"min_tokens must be >= 0, got {s['min_tokens']}")
    if s.get("min_tokens", 0) > max_tokens:
        raise InvalidRequest(f"min_tokens ({s['min_tokens']}) must be <= max_tokens ({max_tokens})")
    for key, top in (("seed", UINT64_MAX), ("end_id", INT32_MAX), ("pad_id", INT32_MAX)):
        if key in s and not 0 <= s[key] <= top:
            raise InvalidRequest(f"{key} must be in [0, {top}], got {s[key]}")


def finish_params(
    settings: dict[str, Any],
    num_prompt_tokens: int,
    limits: Limits,
    vocab_size: int,
    eos_ids: tuple[int, ...],
    tokenize_word,
    api: str | None = None,
) -> GenerationParams:
    """Checks that need the tokenized prompt, then builds the hand-on parameters.

    ``api`` picks the client convention's defaults (`API_DEFAULTS`); None: this library's own.
    """
    defaults = API_DEFAULTS.get(api or "", {})
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
        temperature=settings.get("temperature", defaults.get("temperature", 0.0)),
        top_k=settings.get("top_k", 0),
        top_p=settings.get("top_p", 1.0),
        min_p=settings.get("min_p", 0.0),
        seed=seed,
        min_tokens=settings.get("min_tokens", 0),
        end_ids=tuple(dict.fromkeys((*end_ids, *extra))),
        ignore_eos=settings.get("ignore_eos", False),
        stop=tuple(settings.get("stop", ())),
        bad_words_ids=tuple(ids for w in settings.get("bad_words", ()) if (ids := tuple(tokenize_word(w)))),
        repetition_penalty=settings.get("repetition_penalty", 1.0),
        presence_penalty=settings.get("presence_penalty", 0.0),
        frequency_penalty=settings.get("frequency_penalty", 0.0),
        penalty_mode="vllm" if api == "vllm" else "trtllm",
    )
    output = OutputOptions(
        stream=settings.get("stream", False),
        exclude_input_in_output=settings.get("exclude_input_in_output",
                                             defaults.get("exclude_input_in_output", True)),
        return_num_input_tokens=settings.get("return_num_input_tokens", True),
        return_num_output_tokens=settings.get("return_num_output_tokens", True),
    )
    return GenerationParams(sampling, output)
