"""genai-perf, installed from PyPI into a venv of its own as a user would, profiles the server through
each endpoint type the README shows: the TensorRT-LLM convention (`ensemble`), the vLLM convention
(`vllm_model`) and the OpenAI chat API; it finds perf_analyzer on PATH (the venv's wrapper) and the
tokenizer exported by `adrenaline tokenizer`.

Skipped, with the reason, when genai-perf cannot be installed (no registry) or perf_analyzer cannot
run (Debian's libb64-0d missing).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import venv
import warnings
from pathlib import Path

import pytest
from conftest import start_test_server

GENAI_PERF = "genai-perf==0.0.16"
OUTPUT_TOKENS = 12


@pytest.fixture(scope="module")
def genai_perf(tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("genai-perf-venv")
    venv.create(env_dir, with_pip=True)
    pip = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", GENAI_PERF],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode:
        pytest.skip(f"{GENAI_PERF} could not be installed: {pip.stderr.strip()[-300:]}")
    return env_dir / "bin" / "genai-perf"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if subprocess.run(["sh", "-c", "ldconfig -p | grep -q libb64.so.0d"]).returncode:
        pytest.skip("perf_analyzer needs Debian's libb64-0d (tools/install_system_deps.sh installs it)")
    log = tmp_path_factory.mktemp("genai-perf-server") / "server.log"
    server = start_test_server(log)
    yield server
    server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from adrenaline_py.cli import main

    out = tmp_path_factory.mktemp("tokenizer") / "smollm2"
    assert main(["tokenizer", "--model", "smollm2", "--out", str(out)]) == 0
    return out


CASES = {
    "tensorrtllm": ["-m", "ensemble", "--endpoint-type", "kserve", "--backend", "tensorrtllm",
                    "--output-tokens-mean-deterministic"],
    "vllm": ["-m", "vllm_model", "--endpoint-type", "kserve", "--backend", "vllm",
             "--output-tokens-mean-deterministic"],
    "openai": ["-m", "smollm2", "--endpoint-type", "chat", "--extra-inputs", "ignore_eos:true",
               "--extra-inputs", f"min_tokens:{OUTPUT_TOKENS}"],
}


def _profile(genai_perf: Path, endpoint: str, url: str, tokenizer_dir: Path, artifacts: Path):
    cmd = [str(genai_perf), "profile", "-v", *CASES[endpoint], "-u", url, "--tokenizer", str(tokenizer_dir),
           "--synthetic-input-tokens-mean", "32", "--output-tokens-mean", str(OUTPUT_TOKENS),
           "--num-prompts", "6", "--request-count", "6", "--concurrency", "2", "--streaming",
           "--artifact-dir", str(artifacts)]  # -v: perf_analyzer's own report goes to stdout too
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # perf_analyzer
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _empty_export(artifacts: Path) -> bool:
    exports = glob.glob(str(artifacts / "*" / "profile_export.json"))
    return bool(exports) and all(Path(e).stat().st_size == 0 for e in exports)


@pytest.mark.server
@pytest.mark.parametrize("endpoint", list(CASES))
def test_genai_perf_profiles_each_endpoint_type(endpoint, genai_perf, served, tokenizer_dir, tmp_path):
    url = f"127.0.0.1:{served.options.grpc_port}" if endpoint != "openai" else served.http_url
    artifacts = tmp_path / "artifacts"
    run = _profile(genai_perf, endpoint, url, tokenizer_dir, artifacts)
    if run.returncode and _empty_export(artifacts):
        # Seen in CI (2026-11-30 vllm case, 2026-12-01 tensorrtllm case): perf_analyzer exited 0 leaving
        # an empty export and genai-perf failed to parse it, although perf_analyzer's own report
        # counted all 6 requests successful (server and client agreed). Not reproduced in 35 local
        # runs, idle or loaded. One retry for that symptom only, reported as a warning in the test
        # summary with the first run's output; any other failure, or a second one, fails.
        warnings.warn("genai-perf found an empty perf_analyzer export; retried once. First run's output:\n"
                      + run.stdout[-2000:] + run.stderr[-1000:], stacklevel=1)
        artifacts = tmp_path / "retry"
        run = _profile(genai_perf, endpoint, url, tokenizer_dir, artifacts)
    log = served.log_path.read_text()[-3000:] if served.log_path and served.log_path.exists() else "no server log"
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:] + "\nserver log:\n" + log
    [table] = glob.glob(str(artifacts / "*" / "profile_export_genai_perf.csv"))   # its table
    assert "Time To First Token" in Path(table).read_text() and "Inter Token Latency" in Path(table).read_text()
    [export] = glob.glob(str(artifacts / "*" / "profile_export_genai_perf.json"))
    stats = json.loads(Path(export).read_text())
    assert stats["request_count"]["avg"] == 6
    assert stats["time_to_first_token"]["avg"] > 0 and stats["inter_token_latency"]["avg"] > 0
    # genai-perf counts output tokens by tokenizing the answers with the exported tokenizer
    assert abs(stats["output_sequence_length"]["avg"] - OUTPUT_TOKENS) <= 2
