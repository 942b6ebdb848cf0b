"""tools/bench_sends.py measures the python backend's response sends through a real tritonserver:
every stream gets all its responses (the tool checks the count) and the table has one row per
(threads, tensors) with the throughput next to one thread's."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_sends.py"


@pytest.mark.server
def test_bench_sends_prints_a_row_per_thread_count(capsys):
    spec = importlib.util.spec_from_file_location("bench_sends", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--threads", "1", "2", "--tensors", "2", "--requests", "4", "--responses", "5",
                      "--repeats", "1"]) == 0
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", capsys.readouterr().out, re.M)
    assert [(r[0], r[1]) for r in rows] == [("1", "2"), ("2", "2")]
    assert all(int(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    assert rows[0][4] == "1.00"
