"""The engine's greedy tokens equal transformers' on the same weights (fp32, CPU)."""

import re

import pytest
import torch
from conftest import greedy, small_engine_config

from adrenaline_py.engine.local import LocalEngine


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("offload", ["never", "always", "ratio:0.5", "always, two batches",
                                     "ratio:0.5, two batches"])
def test_tiny_gqa_greedy_matches_transformers(tiny_hf, offload):
    hf, ckpt = tiny_hf
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 5, 17, 33, 64, 100]
    prompts = [torch.randint(3, ckpt.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    n_new = 24
    expected = [hf_greedy(hf, p, n_new) for p in prompts]
    two_batch = "on" if offload.endswith("two batches") else "off"
    offload = offload.split(",")[0]
    # ratio:0.5 cut in two: the local rows and the offloaded rows are the two batches (from one row each)
    cfg = small_engine_config(offload=offload, two_batch_overlap=two_batch, two_batch_min_rows=1)
    with LocalEngine(ckpt, cfg) as engine:
        got = engine.generate(prompts, [greedy(n_new) for _ in prompts])
        two_batch_steps = engine.decode.runner.two_batch_steps
        local_remote_steps = engine.decode.runner.local_remote_steps
    assert [c.output_ids for c in got] == expected
    assert (two_batch_steps > 0) == (two_batch == "on")  # the interleaved schedule really ran
    assert (local_remote_steps > 0) == (two_batch == "on" and offload == "ratio:0.5")
    assert all(c.finish_reason == "length" for c in got)
    if offload == "always":
        assert all(c.offloaded for c in got)
    if offload == "ratio:0.5":
        assert sum(c.offloaded for c in got) == len(prompts) // 2


def _tiny_hf_model(**overrides):
    import dataclasses

    transformers = pytest.importorskip("transformers")
    from adrenaline_py.config import NAMED_SHAPES
    from adrenaline_py.loader import Checkpoint
    from adrenaline_py.weights.dummy import byte_tokenizer

    cfg = dataclasses.replace(NAMED_SHAPES["tiny"], **overrides)
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_dict())).eval()
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return hf, Checkpoint("tiny", cfg, byte_tokenizer(cfg), state)


def test_llama3_rope_scaling_and_tied_embeddings_match_transformers():
    from adrenaline_py.config import RopeScaling

    # Short original context so that positions of a few hundred tokens reach the scaled bands.
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    hf, ckpt = _tiny_hf_model(rope_scaling=scaling, rope_theta=500000.0, tie_word_embeddings=True)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (7, 130, 300)]
    expected = [hf_greedy(hf, p, 16) for p in prompts]
    with LocalEngine(ckpt, small_engine_config(offload="ratio:0.5")) as engine:
        got = engine.generate(prompts, [greedy(16) for _ in prompts])
    assert [c.output_ids for c in got] == expected


def test_hf_directory_checkpoint_loads_and_matches_transformers(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    from adrenaline_py.loader import load_checkpoint

    hf, ckpt = _tiny_hf_model()
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors
    tok: HFTokenizer = ckpt.tokenizer.tokenizer
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_checkpoint(str(tmp_path))
    assert loaded.config == ckpt.config
    assert loaded.tokenizer.encode("héllo") == ckpt.tokenizer.encode("héllo")
    prompts = [[5, 9, 200, 31], list(range(40, 90))]
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    with LocalEngine(loaded, small_engine_config(offload="always")) as engine:
        got = engine.generate(prompts, [greedy(12) for _ in prompts])
    assert [c.output_ids for c in got] == expected


def test_smollm2_batch_greedy_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from adrenaline_py.loader import load_checkpoint

    try:
        ckpt = load_checkpoint("smollm2")
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 GGUF not installed: {e}")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ckpt.config.to_hf_dict()))
    hf.load_state_dict(ckpt.state_dict, strict=False)
    hf.tie_weights()
    hf.eval()
    texts = ["The capital of France is", "def add(a, b):\n    return",
             "Once upon a time there was a little robot who lived in a lighthouse. Every night it",
             "1 2 3 4"]
    prompts = [ckpt.tokenizer.encode(t) for t in texts]
    n_new = 16
    expected = [hf_greedy(hf, p, n_new) for p in prompts]
    with LocalEngine(ckpt, small_engine_config(offload="ratio:0.5")) as engine:
        got = engine.generate(prompts, [greedy(n_new) for _ in prompts])
    assert [c.output_ids for c in got] == expected
    assert {c.offloaded for c in got} == {True, False}


def test_dummy_weights_of_a_named_shape_generate():
    from adrenaline_py.config import NAMED_SHAPES
    from adrenaline_py.loader import load_checkpoint

    assert NAMED_SHAPES["llama-3.1-8b"].num_key_value_heads == 8
    assert NAMED_SHAPES["llama-2-13b"].num_hidden_layers == 40
    ckpt = load_checkpoint("dummy:tiny")
    with LocalEngine(ckpt, small_engine_config(offload="always")) as engine:
        out = engine.generate([ckpt.tokenizer.encode("hello")], [greedy(8)])
    assert len(out[0].output_ids) == 8 and out[0].finish_reason == "length"


def test_min_tokens_and_bad_words_steer_generation_in_prefill_and_decode(tiny_hf):
    """Logits processing runs on inference-mode logits in both prefill and decode."""
    _, ckpt = tiny_hf
    prompt = [7, 8, 9, 10]
    with LocalEngine(ckpt, small_engine_config(offload="ratio:0.5")) as engine:
        free = engine.generate([prompt], [greedy(6)])[0].output_ids
        banned = tuple((t,) for t in set(free))
        steered = engine.generate([prompt, prompt], [greedy(6, bad_words_ids=banned)] * 2)
        eos_first = engine.generate([prompt], [greedy(6, end_ids=(free[0],), min_tokens=3)])[0]
    for c in steered:
        assert not set(c.output_ids) & set(free)
    assert eos_first.output_ids[:3] != free[:3] and len(eos_first.output_ids) >= 3


def test_the_decode_loop_opens_the_output_gate_only_while_it_waits(tiny_hf):
    """CPU has no gate (its loop computes on the host); a recording one shows where a GPU loop puts it:
    closed for the host phases, opened once the step is launched and again when the events go out."""
    import threading

    from adrenaline_py.engine.output import HostGate

    class RecordingGate(HostGate):
        def __init__(self):
            super().__init__(max_wait_s=1.0)
            self.calls = []

        def open(self):
            if threading.current_thread().name == "decode-loop":
                self.calls.append("open")
            super().open()

        def close(self):
            self.calls.append("close")
            super().close()

    hf, ckpt = tiny_hf
    prompt = [5, 6, 7, 8]
    with LocalEngine(ckpt, small_engine_config(offload="never", overlap_steps=False)) as engine:
        gate = RecordingGate()
        engine.decode.runner.gate = gate
        engine.decode.outputs._gate = gate
        got = engine.generate([prompt], [greedy(6, stream=True)])
        steps = engine.decode.loop.num_steps
    assert got[0].output_ids == hf_greedy(hf, prompt, 6)       # streamed through the gate, same tokens
    # a step: close (start), open (launched), close (tokens back), open (emit), open (end); an idle
    # turn of the loop while the gate was being swapped in: close, open
    calls = " ".join(c[0] for c in gate.calls)
    assert steps == 5 and len(re.findall("c o c o o", calls)) == steps, calls
    assert "c c" not in calls and gate.calls[-1] == "open"


# --- overlapped steps (--overlap-steps): step N+1 launches before step N's tokens reach the host ----

def _engine_tokens(ckpt, prompts, params, **cfg):
    with LocalEngine(ckpt, small_engine_config(**cfg)) as engine:
        got = engine.generate(prompts, params)
        loop = engine.decode.loop
        pools = engine.pools
        free = {name: (pool.allocator.num_free, pool.allocator.num_blocks) for name, pool in pools.items()}
        return got, loop, free


@pytest.mark.parametrize("offload", ["never", "always", "ratio:0.5"])
def test_overlapped_steps_match_transformers_with_requests_ending_at_different_steps(tiny_hf, offload):
    hf, ckpt = tiny_hf
    gen = torch.Generator().manual_seed(4)
    lengths, n_new = [3, 9, 30, 64, 17], [2, 11, 5, 20, 8]   # each request ends by length at its own step
    prompts = [torch.randint(3, ckpt.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    expected = [hf_greedy(hf, p, n) for p, n in zip(prompts, n_new)]
    got, loop, free = _engine_tokens(ckpt, prompts, [greedy(n) for n in n_new], offload=offload, overlap_steps=True)
    assert [c.output_ids for c in got] == expected
    assert all(c.finish_reason == "length" for c in got)
    assert loop.overlapped_steps > 0                          # steps really launched ahead
    assert all(n == total for n, total in free.values())     # every block came back


def test_overlapped_steps_drop_the_extra_token_of_a_request_that_ends_on_an_end_token(tiny_hf):
    """A request that step N ends with its end token is a row of step N+1 (launched before N's tokens
    were seen): that row's token is dropped and its blocks are freed once N+1 is done, while the
    other requests go on untouched."""
    hf, ckpt = tiny_hf
    prompts = [[11, 12, 13, 14], [40, 41, 42], list(range(60, 90))]
    free_run = [hf_greedy(hf, p, 12) for p in prompts]
    stop_at = free_run[0][5]                                   # request 0 ends at its 6th token
    first = free_run[0].index(stop_at)
    params = [greedy(12, end_ids=(stop_at,)), greedy(12), greedy(12)]
    sync, _, _ = _engine_tokens(ckpt, prompts, params, offload="ratio:0.5", overlap_steps=False)
    got, loop, free = _engine_tokens(ckpt, prompts, params, offload="ratio:0.5", overlap_steps=True)
    assert got[0].output_ids == free_run[0][:first + 1] and got[0].finish_reason == "stop"
    assert [c.output_ids for c in got[1:]] == free_run[1:]    # no end ids: they run to their length
    assert [c.output_ids for c in got] == [c.output_ids for c in sync]
    assert loop.overlapped_steps > 0
    assert all(n == total for n, total in free.values())


def test_overlapped_steps_keep_seeded_sampling_reproducible(tiny_hf):
    _, ckpt = tiny_hf
    prompts = [[5, 6, 7], list(range(20, 45)), [99] * 9]
    params = [greedy(10, temperature=0.8, top_p=0.9, seed=100 + i) for i in range(3)]
    sync, _, _ = _engine_tokens(ckpt, prompts, params, offload="ratio:0.5", overlap_steps=False)
    got, loop, _ = _engine_tokens(ckpt, prompts, params, offload="ratio:0.5", overlap_steps=True)
    assert [c.output_ids for c in got] == [c.output_ids for c in sync]
    assert loop.overlapped_steps > 0


def test_overlapped_steps_fall_back_to_synchronous_steps_for_penalties_and_bad_words(tiny_hf):
    """Penalties and bad words read the latest token on the host: such batches run synchronously,
    with the same tokens as without overlap."""
    _, ckpt = tiny_hf
    prompts = [[7, 8, 9, 10], [30, 31]]
    params = [greedy(8, repetition_penalty=1.3), greedy(8, bad_words_ids=((50,),))]
    sync, _, _ = _engine_tokens(ckpt, prompts, params, offload="never", overlap_steps=False)
    got, loop, free = _engine_tokens(ckpt, prompts, params, offload="never", overlap_steps=True)
    assert [c.output_ids for c in got] == [c.output_ids for c in sync]
    assert loop.overlapped_steps == 0
    assert all(n == total for n, total in free.values())


def _recovery_case(tiny_hf):
    """Three offloaded requests of 14 tokens and transformers' greedy tokens for them."""
    hf, ckpt = tiny_hf
    prompts = [[3, 4, 5, 6], list(range(100, 130)), [77] * 12]
    n_new = 14
    return ckpt, prompts, n_new, [hf_greedy(hf, p, n_new) for p in prompts]


def test_overlapped_steps_recover_when_the_executor_is_lost_mid_step(tiny_hf):
    """The executor's answers stop in the middle of an overlapped step: the step before it is
    committed, the next tries run synchronously, and the recovery recomputes the offloaded requests'
    KV in decode's pool; every output still equals transformers'."""
    from adrenaline_py.transport import ExecutorGone

    ckpt, prompts, n_new, expected = _recovery_case(tiny_hf)
    with LocalEngine(ckpt, small_engine_config(offload="always", overlap_steps=True)) as engine:
        transport = engine.decode.runner.transport
        real_recv, calls = transport.recv, {"n": 0}

        def breaking_recv(layer, out, part=0, row0=0):
            calls["n"] += 1
            if calls["n"] > 3 * ckpt.config.num_hidden_layers:  # from layer 0 of the 4th offloaded step on
                transport.close()
                raise ExecutorGone("connection reset (test)")
            return real_recv(layer, out, part, row0)

        transport.recv = breaking_recv
        got = engine.generate(prompts, [greedy(n_new) for _ in prompts])
        loop = engine.decode.loop
        recovered, overlapped = loop.num_recovered, loop.overlapped_steps
    assert [c.output_ids for c in got] == expected
    assert recovered == len(prompts) and overlapped > 0


def test_overlapped_steps_redo_a_step_whose_executor_failure_shows_at_collection(tiny_hf):
    """As the device transport reports it: step N's offloaded rows are found void only when N's tokens
    are collected, while step N+1 (fed N's tokens on the device) is already launched. N+1 is waited
    out and thrown away, N is redone after the recovery; every output still equals transformers'
    and every block comes back."""
    from adrenaline_py.transport import ExecutorGone

    ckpt, prompts, n_new, expected = _recovery_case(tiny_hf)
    with LocalEngine(ckpt, small_engine_config(offload="always", overlap_steps=True)) as engine:
        transport = engine.decode.runner.transport
        real_landed, real_dropped = transport.step_landed, transport.step_dropped
        landed, dropped = {"n": 0}, {"n": 0}

        def failing_landed():
            landed["n"] += 1
            real_landed()
            if landed["n"] == 4:  # the 4th offloaded step: its executor went away mid-step
                transport.close()
                raise ExecutorGone("executor died (test)")

        def counting_dropped():
            dropped["n"] += 1
            real_dropped()

        transport.step_landed, transport.step_dropped = failing_landed, counting_dropped
        got = engine.generate(prompts, [greedy(n_new) for _ in prompts])
        loop = engine.decode.loop
        recovered, overlapped = loop.num_recovered, loop.overlapped_steps
        free = {name: (pool.allocator.num_free, pool.allocator.num_blocks) for name, pool in engine.pools.items()}
    assert [c.output_ids for c in got] == expected
    assert recovered == len(prompts) and overlapped > 0
    assert dropped["n"] == 1                                   # step N+1 was in flight and thrown away
    assert all(n == total for n, total in free.values())


def test_overlapped_steps_end_a_request_at_its_stop_string_and_free_its_blocks(tiny_hf):
    """A stop string is found on an output thread, which aborts the request while steps are in
    flight: the text ends at the stop string as without overlap, and every block comes back."""
    _, ckpt = tiny_hf
    prompts = [[40, 41, 42], list(range(60, 90))]
    free, _, _ = _engine_tokens(ckpt, prompts, [greedy(20), greedy(20)], offload="ratio:0.5", overlap_steps=False)
    text = free[0].text  # a dummy byte tokenizer's text: take a printable character seen first late on
    stop = next(c for i, c in enumerate(text) if i >= 3 and c.isprintable() and c != "\ufffd" and c not in text[:i])
    params = [greedy(20, stop=(stop,)), greedy(20)]
    sync, _, _ = _engine_tokens(ckpt, prompts, params, offload="ratio:0.5", overlap_steps=False)
    got, loop, blocks = _engine_tokens(ckpt, prompts, params, offload="ratio:0.5", overlap_steps=True)
    assert got[0].finish_reason == sync[0].finish_reason == "stop"
    assert got[0].text == sync[0].text and stop not in got[0].text
    assert got[1].output_ids == sync[1].output_ids == free[1].output_ids
    assert loop.overlapped_steps > 0
    assert all(n == total for n, total in blocks.values())


def test_one_gpu_in_process_offloading_without_cuda_graphs_is_refused_not_hung(tiny_hf):
    # eager steps load Triton kernels while the exchange's flag waits spin in the same CUDA context,
    # which hangs (docs/performance.md, ninth run): refused up front, before any CUDA work
    _, ckpt = tiny_hf
    cfg = small_engine_config(device="cuda", offload="always", prefill_gpu=0, decode_gpu=0, cuda_graphs=False)
    with pytest.raises(ValueError, match="needs CUDA graphs"):
        LocalEngine(ckpt, cfg)
