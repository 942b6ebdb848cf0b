"""The two client conventions of `parse_request` / `finish_params`: TensorRT-LLM's ensemble
(`ensemble`, api "trtllm") and the vLLM backend's request (`vllm_model`, api "vllm")."""

import json

import numpy as np
import pytest

from adrenaline_py.request import InvalidRequest, Limits, finish_params, parse_request

LIMITS = Limits(max_model_len=200, max_tokens_limit=100, default_max_tokens=16)


def text(value: str | bytes):
    return np.array([[value.encode() if isinstance(value, str) else value]], dtype=object)


def num(value, dtype):
    return np.array([[value]], dtype=dtype)


def build(api: str = "trtllm", **inputs):
    inputs.setdefault("text_input", text("hello"))
    _, settings = parse_request(inputs, LIMITS, api)
    return finish_params(settings, 5, LIMITS, 1000, (2,), lambda w: [ord(c) for c in w], api)


def vllm(**sampling):
    return build("vllm", sampling_parameters=text(json.dumps(sampling)))


# --- TensorRT-LLM: what end_to_end_grpc_client.py sends ------------------------------------------

def test_trtllm_client_defaults_echo_the_prompt_and_decode_greedily():
    # The client always sends temperature (1.0 by default) and beam_width 1, never top_k / top_p:
    # TensorRT-LLM's top_k 0 with top_p 0 is greedy.
    p = build(temperature=num(1.0, np.float32), beam_width=num(1, np.int32),
              num_return_sequences=num(1, np.int32), max_tokens=num(8, np.int32))
    assert p.sampling.is_greedy and p.sampling.temperature == 1.0
    assert p.output.exclude_input_in_output is False


def test_trtllm_top_k_or_top_p_samples_at_its_default_temperature_one():
    for extra in ({"top_k": num(40, np.int32)}, {"top_p": num(0.9, np.float32)}):
        s = build(**extra).sampling
        assert not s.is_greedy and s.temperature == 1.0


def test_trtllm_temperature_with_top_k_zero_tensor_is_still_greedy():
    s = build(temperature=num(0.8, np.float32), top_k=num(0, np.int32)).sampling
    assert s.is_greedy


def test_vllm_style_json_in_the_ensemble_keeps_its_meaning():
    # The JSON's temperature without top_k samples the full vocabulary, as before.
    s = build(sampling_parameters=text(json.dumps({"temperature": 0.7}))).sampling
    assert not s.is_greedy and (s.temperature, s.top_k) == (0.7, 0)
    s = build(temperature=num(0.7, np.float32), sampling_parameters=text(json.dumps({"top_k": -1}))).sampling
    assert not s.is_greedy


def test_trtllm_penalties_are_taken_from_tensors():
    s = build(repetition_penalty=num(1.3, np.float32), presence_penalty=num(0.4, np.float32),
              frequency_penalty=num(-0.2, np.float32), length_penalty=num(0.7, np.float32)).sampling
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == pytest.approx((1.3, 0.4, -0.2))
    assert s.penalty_mode == "trtllm"


@pytest.mark.parametrize(("name", "value", "dtype", "message"), [
    ("beam_width", 2, np.int32, "beam_width=2 is not supported (beam search"),
    ("num_return_sequences", 3, np.int32, "num_return_sequences=3 is not supported"),
    ("return_log_probs", True, np.bool_, "return_log_probs=True is not supported (log probabilities"),
    ("return_context_logits", True, np.bool_, "return_context_logits=True is not supported"),
    ("return_generation_logits", True, np.bool_, "return_generation_logits=True is not supported"),
    ("return_perf_metrics", True, np.bool_, "return_perf_metrics=True is not supported"),
])
def test_what_cannot_be_honoured_gets_a_clear_error(name, value, dtype, message):
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")):
        build(**{name: num(value, dtype)})


def test_their_default_values_are_accepted():
    build(beam_width=num(1, np.int32), num_return_sequences=num(1, np.int32),
          return_log_probs=num(False, np.bool_), return_context_logits=num(False, np.bool_),
          return_generation_logits=num(False, np.bool_), return_perf_metrics=num(False, np.bool_))


@pytest.mark.parametrize(("inputs", "message"), [
    ({"repetition_penalty": num(0.0, np.float32)}, "repetition_penalty must be > 0"),
    ({"repetition_penalty": num(np.nan, np.float32)}, "repetition_penalty must be > 0"),
    ({"presence_penalty": num(np.inf, np.float32)}, "presence_penalty must be a finite number"),
    ({"sampling_parameters": text('{"frequency_penalty": "x"}')}, "frequency_penalty must be a number"),
])
def test_bad_penalties_are_rejected(inputs, message):
    with pytest.raises(InvalidRequest, match=message):
        build(**inputs)


# --- vLLM backend ---------------------------------------------------------------------------------

def test_vllm_string_values_are_converted_as_that_backend_does():
    # samples/client.py sends {"temperature": "0.1", "top_p": "0.95", "max_tokens": "100"}.
    s = vllm(temperature="0.1", top_p="0.95", max_tokens="100", top_k="-1", seed="7", ignore_eos="false",
             presence_penalty="0.5").sampling
    assert (s.temperature, s.top_p, s.max_tokens, s.top_k, s.seed) == (0.1, 0.95, 100, 0, 7)
    assert s.ignore_eos is False and s.presence_penalty == 0.5 and s.penalty_mode == "vllm"


def test_vllm_defaults_are_vllms():
    p = vllm()
    assert p.sampling.temperature == 1.0 and not p.sampling.is_greedy  # vLLM's default samples
    assert p.sampling.max_tokens == 16
    assert vllm(temperature=0).sampling.is_greedy


@pytest.mark.parametrize(("sampling", "message"), [
    ({"max_tokens": "ten"}, "max_tokens must be an integer, got 'ten'"),
    ({"ignore_eos": "maybe"}, "ignore_eos must be a boolean"),
    ({"lora_name": "x"}, "LoRA feature is not enabled."),
    ({"min_p": "1.5"}, r"min_p must be in \[0, 1\]"),
    ({"logprobs": 2}, "logprobs is not supported"),
    ({"include_stop_str_in_output": True}, "include_stop_str_in_output=true is not supported"),
    ({"n": "2"}, "only n=1"),
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
    ({"guided_json": "{}"}, r"unsupported keys: \['guided_json'\]"),
])
def test_vllm_requests_that_cannot_be_honoured_are_rejected(sampling, message):
    with pytest.raises(InvalidRequest, match=message):
        vllm(**sampling)


def test_vllm_min_p_is_taken_from_its_string():
    assert vllm(min_p="0.1").sampling.min_p == pytest.approx(0.1)
    assert vllm().sampling.min_p == 0.0


def test_vllm_keys_at_their_default_are_accepted():
    p = vllm(min_p=0, logprobs=None, include_stop_str_in_output="false", detokenize=True,
             spaces_between_special_tokens=False, skip_special_tokens="true", length_penalty="1.0")
    assert p.sampling.max_tokens == 16
