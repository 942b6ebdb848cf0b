"""Where a process's threads spend their samples, from py-spy's collapsed stacks (``--format raw``).

    python tools/pyspy_summary.py $OUT/pyspy_auto_cpu.txt [--top 25]

Each thread is put in a role by the first of its frames that names one (the decode loop, the
output threads, admission, metrics); prints each role's share of the samples, then the leaf frames
(the function a sample was in) per role, largest first. The `_gil` files of tools/serve_bench.sh
hold only samples of the thread py-spy saw holding the GIL; take that view with care (py-spy reads
the last holder, which a thread blocked in C after releasing the GIL can still be).
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

ROLES = (("decode-loop", "DecodeEngine._loop"), ("output", "OutputWorkers._work"), ("admission", "_admit"),
         ("metrics", "Sampler._run"), ("executor", "AttentionExecutor"), ("watchdog", "_watch_loop"))


def summarize(lines: list[str]) -> tuple[int, collections.Counter, collections.Counter]:
    """(samples, samples per role, samples per (role, leaf frame))."""
    total, roles, leaves = 0, collections.Counter(), collections.Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        role = next((name for name, marker in ROLES if marker in stack), frames[0][:60])
        total += n
        roles[role] += n
        leaves[(role, frames[-1])] += n
    return total, roles, leaves


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    total, roles, leaves = summarize(a.path.read_text().splitlines())
    print(f"{a.path}: {total} samples")
    for role, n in roles.most_common():
        print(f"  {n / max(total, 1):6.1%}  {role}")
    print("leaf frames:")
    for (role, leaf), n in leaves.most_common(a.top):
        print(f"  {n / max(total, 1):6.1%}  {role:<12} {leaf[:120]}")


if __name__ == "__main__":
    main()
