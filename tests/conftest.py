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
