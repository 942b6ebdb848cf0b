"""The client request contract: `parse_request` / `finish_params` validation and hand-on params."""

import json

import numpy as np
import pytest

from adrenaline_py.request import (
    GenerationParams,
    InvalidRequest,
    Limits,
    OutputOptions,
    SamplingParams,
    finish_params,
    parse_request,
)

LIMITS = Limits(max_model_len=100, max_tokens_limit=50, default_max_tokens=16)
VOCAB = 1000
EOS = (2,)


def text(value, shape=(1,)):
    return np.array([value], dtype=object).reshape(shape)


def num(value, dtype, shape=(1,)):
    return np.array([value], dtype=dtype).reshape(shape)


def params_json(**kw):
    return text(json.dumps(kw).encode())


def parse(**inputs):
    inputs.setdefault("text_input", text(b"hello"))
    return parse_request(inputs, LIMITS)


def fake_tokenize(word):
    # A stand-in tokenizer: one token per character, id = code point.
    return [ord(c) for c in word]


def finish(settings, num_prompt_tokens=5, limits=LIMITS):
    return finish_params(settings, num_prompt_tokens, limits, VOCAB, EOS, fake_tokenize)


def full(num_prompt_tokens=5, **inputs):
    _, settings = parse(**inputs)
    return finish(settings, num_prompt_tokens)


# --- text_input ------------------------------------------------------------------------------

def test_prompt_is_returned_decoded():
    prompt, settings = parse(text_input=text("héllo 日本".encode()))
    assert prompt == "héllo 日本"
    assert settings == {}


def test_missing_text_input_is_rejected():
    with pytest.raises(InvalidRequest, match="text_input"):
        parse_request({"max_tokens": num(4, np.int32)}, LIMITS)


def test_empty_text_input_is_rejected():
    with pytest.raises(InvalidRequest, match="empty"):
        parse(text_input=text(b""))


def test_non_utf8_text_input_is_rejected():
    with pytest.raises(InvalidRequest, match="UTF-8"):
        parse(text_input=text(b"\xff\xfeabc"))


def test_non_string_text_input_is_rejected():
    with pytest.raises(InvalidRequest, match="string"):
        parse(text_input=num(3, np.int32))


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_one_element_tensors_of_shape_1_and_1x1_are_accepted(shape):
    prompt, settings = parse(
        text_input=text(b"hi", shape),
        max_tokens=num(7, np.int32, shape),
        temperature=num(0.5, np.float32, shape),
    )
    assert prompt == "hi"
    assert settings["max_tokens"] == 7
    assert settings["temperature"] == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["text_input", "max_tokens"])
def test_tensor_with_two_values_is_rejected(name):
    inputs = {"text_input": text(b"hi"), "max_tokens": num(4, np.int32)}
    inputs[name] = np.array([inputs[name].reshape(-1)[0]] * 2, dtype=inputs[name].dtype)
    with pytest.raises(InvalidRequest, match=r"exactly one value.*\[2\]"):
        parse_request(inputs, LIMITS)


# --- max_tokens --------------------------------------------------------------------------------

def test_max_tokens_defaults_to_the_limit_default():
    assert full().sampling.max_tokens == LIMITS.default_max_tokens


@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_max_tokens_is_rejected(value):
    with pytest.raises(InvalidRequest, match="max_tokens must be > 0"):
        parse(max_tokens=num(value, np.int32))


def test_max_tokens_at_limit_is_accepted_and_above_is_rejected():
    assert parse(max_tokens=num(LIMITS.max_tokens_limit, np.int32))[1]["max_tokens"] == 50
    with pytest.raises(InvalidRequest, match="max_tokens must be <= 50"):
        parse(max_tokens=num(LIMITS.max_tokens_limit + 1, np.int32))
    with pytest.raises(InvalidRequest, match="max_tokens must be <= 50"):
        parse(sampling_parameters=params_json(max_tokens=51))


def test_float_max_tokens_tensor_is_rejected():
    with pytest.raises(InvalidRequest, match="integer"):
        parse(max_tokens=num(4.0, np.float32))


def test_fractional_max_tokens_in_json_is_rejected_but_integral_float_is_accepted():
    with pytest.raises(InvalidRequest, match="integer"):
        parse(sampling_parameters=params_json(max_tokens=4.5))
    assert parse(sampling_parameters=params_json(max_tokens=4.0))[1]["max_tokens"] == 4


def test_prompt_plus_max_tokens_over_the_context_is_rejected():
    _, settings = parse(max_tokens=num(10, np.int32))
    assert finish(settings, num_prompt_tokens=90).sampling.max_tokens == 10  # exactly the context
    with pytest.raises(InvalidRequest, match="exceeds the context of 100"):
        finish(settings, num_prompt_tokens=91)


def test_default_max_tokens_also_counts_against_the_context():
    with pytest.raises(InvalidRequest, match="exceeds the context"):
        finish({}, num_prompt_tokens=100 - LIMITS.default_max_tokens + 1)


# --- temperature / top_p / top_k / seed / min_tokens --------------------------------------------

@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_bad_temperature_is_rejected(value):
    with pytest.raises(InvalidRequest, match="temperature"):
        parse(temperature=num(value, np.float32))


def test_negative_temperature_in_json_is_rejected():
    with pytest.raises(InvalidRequest, match="temperature"):
        parse(sampling_parameters=params_json(temperature=-1))


@pytest.mark.parametrize("value", [0.0, -0.5, 1.01, float("nan")])
def test_top_p_outside_zero_one_is_rejected(value):
    with pytest.raises(InvalidRequest, match="top_p"):
        parse(top_p=num(value, np.float32))


@pytest.mark.parametrize("value", [1e-6, 0.5, 1.0])
def test_top_p_inside_zero_one_is_accepted(value):
    assert full(top_p=num(value, np.float64)).sampling.top_p == pytest.approx(value)


def test_negative_top_k_tensor_is_rejected():
    with pytest.raises(InvalidRequest, match="top_k"):
        parse(top_k=num(-1, np.int32))


def test_top_k_minus_one_in_json_means_disabled():
    assert full(sampling_parameters=params_json(top_k=-1, temperature=1.0)).sampling.top_k == 0


def test_top_k_below_minus_one_in_json_is_rejected():
    with pytest.raises(InvalidRequest, match="top_k"):
        parse(sampling_parameters=params_json(top_k=-5))


def test_negative_seed_is_rejected():
    with pytest.raises(InvalidRequest, match="seed"):
        parse(seed=num(-1, np.int64))


def test_random_seed_tensor_is_an_alias_of_seed():
    assert full(random_seed=num(1234, np.uint64)).sampling.seed == 1234


def test_seed_is_drawn_when_absent():
    seeds = {full().sampling.seed for _ in range(5)}
    assert len(seeds) > 1
    assert all(s >= 0 for s in seeds)


def test_min_tokens_over_max_tokens_is_rejected():
    with pytest.raises(InvalidRequest, match="min_tokens"):
        parse(max_tokens=num(4, np.int32), min_length=num(5, np.int32))
    with pytest.raises(InvalidRequest, match="min_tokens"):
        parse(sampling_parameters=params_json(min_tokens=-1))
    assert full(max_tokens=num(4, np.int32), min_length=num(4, np.int32)).sampling.min_tokens == 4


def test_defaults_are_greedy_and_unfiltered():
    s = full().sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_tokens) == (0.0, 0, 1.0, 0)
    assert s.is_greedy
    assert s.end_ids == EOS
    assert s.stop == () and s.bad_words_ids == ()


# --- sampling_parameters JSON ------------------------------------------------------------------

def test_json_settings_are_applied():
    s = full(sampling_parameters=params_json(max_tokens=9, temperature=0.7, top_k=40, top_p=0.9, seed=5,
                                             min_tokens=2)).sampling
    assert (s.max_tokens, s.temperature, s.top_k, s.top_p, s.seed, s.min_tokens) == (9, 0.7, 40, 0.9, 5, 2)
    assert not s.is_greedy


def test_malformed_json_is_rejected():
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse(sampling_parameters=text(b'{"max_tokens": 4'))


@pytest.mark.parametrize("raw", [b"[1, 2]", b"3", b'"x"', b"null"])
def test_non_object_json_is_rejected(raw):
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse(sampling_parameters=text(raw))


def test_blank_json_is_ignored():
    assert parse(sampling_parameters=text(b"  "))[1] == {}


def test_unknown_json_keys_are_rejected_and_named():
    with pytest.raises(InvalidRequest, match=r"\['xyz', 'zzz'\]"):
        parse(sampling_parameters=params_json(max_tokens=4, zzz=1, xyz=0.5))


@pytest.mark.parametrize("extra", [{"n": 2}, {"best_of": 3}, {"use_beam_search": True}])
def test_more_than_one_sequence_is_rejected(extra):
    with pytest.raises(InvalidRequest, match="n=1"):
        parse(sampling_parameters=params_json(**extra))


def test_n_equal_one_is_accepted():
    p = full(sampling_parameters=params_json(n=1, best_of=1, use_beam_search=False))
    assert p.sampling.max_tokens == LIMITS.default_max_tokens


@pytest.mark.parametrize("value", [True, "4", [4]])
def test_non_numeric_json_numbers_are_rejected(value):
    with pytest.raises(InvalidRequest, match="max_tokens must be an integer"):
        parse(sampling_parameters=params_json(max_tokens=value))


def test_null_json_values_mean_default():
    s = full(sampling_parameters=params_json(max_tokens=None, temperature=None, stop=None)).sampling
    assert s.max_tokens == 16 and s.temperature == 0.0 and s.stop == ()


def test_tensors_override_json_keys():
    s = full(
        sampling_parameters=params_json(max_tokens=30, temperature=0.3, top_k=-1, seed=1, min_tokens=1),
        max_tokens=num(8, np.int32),
        temperature=num(1.5, np.float32),
        top_k=num(7, np.int32),
        random_seed=num(99, np.uint64),
        min_length=num(3, np.int32),
    ).sampling
    assert (s.max_tokens, s.temperature, s.top_k, s.seed, s.min_tokens) == (8, 1.5, 7, 99, 3)


def test_json_range_checks_apply_after_tensor_override():
    # The JSON's max_tokens is over the limit, but the tensor replaces it.
    _, settings = parse(sampling_parameters=params_json(max_tokens=500), max_tokens=num(4, np.int32))
    assert settings["max_tokens"] == 4


# --- end ids -----------------------------------------------------------------------------------

def test_end_id_replaces_the_model_eos():
    assert full(end_id=num(7, np.int32)).sampling.end_ids == (7,)


def test_ignore_eos_drops_the_model_eos():
    s = full(sampling_parameters=params_json(ignore_eos=True)).sampling
    assert s.end_ids == ()
    assert s.ignore_eos


def test_stop_token_ids_add_to_end_ids_without_duplicates():
    assert full(sampling_parameters=params_json(stop_token_ids=[5, 2, 5])).sampling.end_ids == (2, 5)
    s = full(sampling_parameters=params_json(stop_token_ids=[5], ignore_eos=True)).sampling
    assert s.end_ids == (5,)


@pytest.mark.parametrize("ids", [[VOCAB], [-1]])
def test_stop_token_ids_outside_the_vocabulary_are_rejected(ids):
    with pytest.raises(InvalidRequest, match="vocabulary"):
        full(sampling_parameters=params_json(stop_token_ids=ids))


def test_stop_token_ids_must_be_integers():
    with pytest.raises(InvalidRequest, match="stop_token_ids"):
        parse(sampling_parameters=params_json(stop_token_ids=[1, "2"]))
    with pytest.raises(InvalidRequest, match="stop_token_ids"):
        parse(sampling_parameters=params_json(stop_token_ids=[True]))


def test_end_id_outside_the_vocabulary_is_rejected():
    with pytest.raises(InvalidRequest, match="vocabulary"):
        full(end_id=num(VOCAB, np.int32))
    with pytest.raises(InvalidRequest, match="end_id"):
        parse(end_id=num(-1, np.int32))


# --- stop words / bad words -------------------------------------------------------------------

def test_stop_words_tensor_and_json_stop_are_merged_and_empties_dropped():
    s = full(
        sampling_parameters=params_json(stop=["A", ""]),
        stop_words=np.array([b"B", b"", b"C"], dtype=object),
    ).sampling
    assert s.stop == ("A", "B", "C")


def test_json_stop_may_be_a_single_string():
    assert full(sampling_parameters=params_json(stop="END")).sampling.stop == ("END",)


@pytest.mark.parametrize("value", [5, ["a", 1], {"a": 1}])
def test_json_stop_of_wrong_type_is_rejected(value):
    with pytest.raises(InvalidRequest, match="stop"):
        parse(sampling_parameters=params_json(stop=value))


def test_bad_words_are_merged_and_tokenized():
    s = full(
        sampling_parameters=params_json(bad_words=["ab"]),
        bad_words=np.array([[b"c"], [b"de"]], dtype=object),
    ).sampling
    assert s.bad_words_ids == ((ord("a"), ord("b")), (ord("c"),), (ord("d"), ord("e")))


def test_non_utf8_stop_word_is_rejected():
    with pytest.raises(InvalidRequest, match="stop_words"):
        parse(stop_words=np.array([b"\xc3"], dtype=object))


# --- output options ----------------------------------------------------------------------------

def test_output_option_tensors_are_applied():
    o = full(
        stream=num(True, np.bool_),
        exclude_input_in_output=num(False, np.bool_, (1, 1)),
        return_num_input_tokens=num(False, np.bool_),
    ).output
    assert o == OutputOptions(stream=True, exclude_input_in_output=False, return_num_input_tokens=False,
                              return_num_output_tokens=True)


def test_output_options_default():
    assert full().output == OutputOptions(stream=False, exclude_input_in_output=True)


# --- GenerationParams serialisation --------------------------------------------------------------

def test_generation_params_json_round_trip():
    original = GenerationParams(
        SamplingParams(max_tokens=12, temperature=0.8, top_k=5, top_p=0.95, seed=2**62 + 3, min_tokens=2,
                       end_ids=(2, 7), ignore_eos=False, stop=("\n\n", "日本"), bad_words_ids=((1, 2), (3,))),
        OutputOptions(stream=True, exclude_input_in_output=False, return_num_input_tokens=False),
    )
    encoded = original.to_json()
    assert json.loads(encoded)["sampling"]["stop"] == ["\n\n", "日本"]
    restored = GenerationParams.from_json(encoded.encode())
    assert restored == original
    assert isinstance(restored.sampling.bad_words_ids[0], tuple)
    assert hash(restored) == hash(original)  # frozen and made of tuples again


def test_parsed_params_survive_the_json_round_trip():
    p = full(sampling_parameters=params_json(stop=["x"], bad_words=["yz"], seed=3, temperature=0.5))
    assert GenerationParams.from_json(p.to_json()) == p


# --- hostile numbers and sizes (issue 11): refused before any narrowing or tokenizing ------------

@pytest.mark.parametrize(("inputs", "message"), [
    (dict(max_tokens=num(2**32 + 4, np.int64)), "max_tokens must be <="),
    (dict(sampling_parameters=params_json(max_tokens=2**32 + 4)), "max_tokens must be <="),
    (dict(top_k=num(2**32 + 1, np.int64)), "top_k must be <="),
    (dict(sampling_parameters=params_json(top_k=2**32 + 1)), "top_k must be <="),
    (dict(sampling_parameters=params_json(min_tokens=2**32 + 1)), "min_tokens"),
    (dict(seed=num(-1, np.int64)), r"seed must be in \[0, 18446744073709551615\]"),
    (dict(sampling_parameters=params_json(seed=2**64)), "seed must be in"),
    (dict(end_id=num(2**40, np.int64)), "end_id must be in"),
    (dict(temperature=num(1e-45, np.float32)), "temperature must be 0 .greedy. or at least"),
    (dict(temperature=num(np.finfo(np.float32).smallest_subnormal, np.float32)), "temperature must be 0"),
    (dict(sampling_parameters=params_json(temperature=1e-30)), "temperature must be 0"),
    (dict(temperature=num(np.inf, np.float32)), "temperature must be >= 0"),
    (dict(temperature=num(np.nan, np.float32)), "temperature must be >= 0"),
    (dict(top_p=num(-0.5, np.float32)), r"top_p must be in \(0, 1\]"),
    (dict(top_p=num(np.nan, np.float32)), r"top_p must be in \(0, 1\]"),
    (dict(sampling_parameters=text(b'{"max_tokens": ' + b"9" * 5000 + b"}")), "not valid JSON"),
    (dict(sampling_parameters=params_json(max_tokens=10**400)), "max_tokens must be <="),
    (dict(sampling_parameters=params_json(temperature=10**400)), "temperature is out of range"),
    (dict(sampling_parameters=text(b"[" * 100_000 + b"]" * 100_000)), "sampling_parameters is"),
    (dict(stop_words=text([b"x"] * 300, (1, 300))), "at most 256"),
    (dict(bad_words=text(b"y" * 5000)), "bad_words is 5000 bytes"),
])
def test_out_of_range_and_oversized_inputs_get_a_clear_error(inputs, message):
    with pytest.raises(InvalidRequest, match=message):
        parse(**inputs)


def test_prompt_over_the_byte_bound_is_refused_before_decoding():
    bound = LIMITS.max_prompt_bytes
    assert bound == 1 << 16  # at least 64 KiB, else 32 bytes per context token
    assert Limits(4096, 1024, 16).max_prompt_bytes == 4096 * 32
    assert parse(text_input=text(b"a" * bound))[0] == "a" * bound
    with pytest.raises(InvalidRequest, match=f"text_input is {bound + 1} bytes; at most {bound}"):
        parse(text_input=text(b"\xff" * (bound + 1)))  # refused for its size, not its UTF-8


def test_tiny_top_p_and_huge_temperature_have_their_documented_meaning():
    # top_p keeps the smallest prefix reaching its mass: a denormal keeps the top token only.
    assert full(top_p=num(1e-45, np.float32)).sampling.top_p > 0
    assert full(sampling_parameters=params_json(temperature=1e30)).sampling.temperature == 1e30
    assert full(sampling_parameters=params_json(seed=2**64 - 1)).sampling.seed == 2**64 - 1
