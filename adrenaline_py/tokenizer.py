"""Tokenizer of a checkpoint, its chat template, and incremental detokenization with stop strings.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas that never split a
multi-byte character (byte-level BPE can end a token in the middle of one) and whose
concatenation equals the whole text. `OutputText` adds stop strings on top: text that could still
turn into a stop string is held back, so streamed deltas concatenate to the non-streamed text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers

# How many prompt tokens seed the detokenizer: enough context for tokenizers whose decoding of a
# token depends on its left neighbour (SentencePiece's leading-space handling).
_CONTEXT_TOKENS = 5


@dataclass
class Tokenizer:
    tokenizer: tokenizers.Tokenizer
    eos_token_ids: tuple[int, ...] = ()
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token / eos_token strings

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the tokenizer as a Hugging Face tokenizer directory (``tokenizer.json``,
        ``tokenizer_config.json``, ``special_tokens_map.json``), loadable with
        ``transformers.AutoTokenizer.from_pretrained``: what genai-perf's ``--tokenizer`` takes."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out / "tokenizer.json"))
        special = dict(self.special_tokens)
        if "eos_token" not in special and self.eos_token_ids:
            special["eos_token"] = self.tokenizer.id_to_token(self.eos_token_ids[0])
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                                  "model_max_length": 1 << 30, **special}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
        return out

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )


class IncrementalDetokenizer:
    """Text deltas of generated tokens (vLLM-style prefix/read offsets)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_ids: list[int], final: bool = False) -> str:
        self._ids.extend(token_ids)
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._tok.decode(self._ids[self._prefix_offset :])
        # A trailing U+FFFD means the last token ended inside a UTF-8 sequence: wait for more.
        if len(text) > len(prefix) and (final or not text.endswith("\ufffd")):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return text[len(prefix) :]
        return ""


class OutputText:
    """Generated text of one request with stop strings applied; hands out safe deltas."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._sent = 0
        self.stopped = False

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Append tokens; returns the text that is now certain. Sets ``stopped`` on a stop string."""
        if self.stopped:
            return ""
        old_len = len(self.text)
        self.text += self._detok.add(token_ids, final=final)
        # A newly completed stop string must end after old_len, so it starts after old_len - hold.
        search_from = max(0, old_len - self._hold)
        hits = [at for s in self._stop if (at := self.text.find(s, search_from)) != -1]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        ready = len(self.text) if (final or self.stopped) else max(self._sent, len(self.text) - self._hold)
        delta = self.text[self._sent : ready]
        self._sent = ready
        return delta
