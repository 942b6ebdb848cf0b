"""Llama-family decoder in plain torch: RMSNorm, RoPE (with llama3 scaling), GQA, SwiGLU.

The model runs on a flat (packed) token dimension for prefill and decode alike and never knows
where attention runs: each layer hands its post-RoPE q/k/v to an `AttentionBackend`, which
writes K/V into a paged cache and returns the attention output (locally, or on the offload
executor for offloaded rows).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adrenaline_py.attention.base import AttentionBackend, AttentionMetadata
from adrenaline_py.config import ModelConfig
from adrenaline_py.models import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Norm of x (of x + residual when given); returns (normed, new residual)."""
        return ops.rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim // 2], with llama3 frequency scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.float()
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled).float()


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables; applies the HF "rotate half" convention."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(cfg)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward_(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """Rotate q [T, Hq, D] and k [T, Hkv, D] in place."""
        ops.apply_rope_(q, k, positions, self.cos, self.sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        # q, k and v in one matrix product (HF's q_proj/k_proj/v_proj are stacked at load time).
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def qkv(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Post-RoPE q [T, Hq, D], k and v [T, Hkv, D] (views of one qkv product)."""
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        rope.forward_(positions, q, k)
        return q, k, v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attn.reshape(attn.shape[0], self.num_heads * self.head_dim))

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        backend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.qkv(x, positions, rope)
        return self.output(backend.forward(self.layer_idx, q, k, v, meta))  # attention [T, Hq, D]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # gate and up in one matrix product (HF's gate_proj/up_proj stacked at load time).
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, rope, backend, meta):
        """x: this layer's input delta (the embeddings for layer 0); residual: the stream so far."""
        q, k, v, residual = self.before_attention(x, residual, positions, rope)
        return self.after_attention(backend.forward(self.self_attn.layer_idx, q, k, v, meta), residual)

    def before_attention(self, x, residual, positions, rope):
        """Input norm and the q/k/v projection: (q, k, v, residual)."""
        if residual is None:
            h, _ = self.input_layernorm(x)
            residual = x
        else:
            h, residual = self.input_layernorm(x, residual)
        return (*self.self_attn.qkv(h, positions, rope), residual)

    def after_attention(self, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output projection, post-attention norm and MLP: (this layer's output delta, residual)."""
        h, residual = self.post_attention_layernorm(self.self_attn.output(attn), residual)
        return self.mlp(h), residual


class _Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Parameter names match HF ``LlamaForCausalLM`` except the stacked ``qkv_proj`` and ``gate_up_proj``
    (see `stack_hf_projections`)."""

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] packed tokens of all sequences
        positions: torch.Tensor,  # [T]
        backend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Returns the final hidden states [T, hidden]."""
        x, residual = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            x, residual = layer(x, residual, positions, self.rope, backend, meta)
        return self.model.norm(x, residual)[0]

    @torch.inference_mode()
    def forward_two_batches(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        backend: AttentionBackend,
        metas: tuple[AttentionMetadata, AttentionMetadata],
        split: int,               # rows [0, split) are the first batch, [split, T) the second
    ) -> torch.Tensor:
        """`forward` with the batch cut in two whose layers interleave (two-batch overlap): while one
        batch's attention runs elsewhere (`AttentionBackend.start`, the offload executor), the other
        batch's dense work runs here. Same result as `forward` up to the GEMMs' rounding."""
        layers = self.model.layers
        rows = (slice(0, split), slice(split, input_ids.shape[0]))
        pending, residual, hidden = [None, None], [None, None], [None, None]
        for b in (0, 1):
            q, k, v, residual[b] = layers[0].before_attention(
                self.model.embed_tokens(input_ids[rows[b]]), None, positions[rows[b]], self.rope)
            pending[b] = backend.start(0, q, k, v, metas[b])
        for i, layer in enumerate(layers):
            for b in (0, 1):  # batch b's dense work overlaps the other batch's attention
                x, residual[b] = layer.after_attention(backend.finish(pending[b]), residual[b])
                if i + 1 < len(layers):
                    q, k, v, residual[b] = layers[i + 1].before_attention(x, residual[b], positions[rows[b]],
                                                                          self.rope)
                    pending[b] = backend.start(i + 1, q, k, v, metas[b])
                else:
                    hidden[b] = self.model.norm(x, residual[b])[0]
        return torch.cat(hidden)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype (the sampler widens only the rows it samples)."""
        return self.lm_head(hidden)


_STACKED = (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")))


def stack_hf_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-named weights → this model's names: q/k/v and gate/up stacked along the output rows."""
    out = dict(state)
    for key in list(state):
        for fused, parts in _STACKED:
            if key.endswith(f"{parts[0]}.weight"):
                prefix = key[: -len(f"{parts[0]}.weight")]
                names = [f"{prefix}{p}.weight" for p in parts]
                out[f"{prefix}{fused}.weight"] = torch.cat([out.pop(n) for n in names], dim=0)
    return out
