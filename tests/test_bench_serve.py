"""`adrenaline bench serve` / `bench plot`: statistics, arrivals, workloads, metrics parsing, plots, and a
small sweep against a real tritonserver with SmolLM2 (HTTP and gRPC)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time

import numpy as np
import pytest
from conftest import free_ports, start_test_server

from adrenaline_py.cli import main as cli_main
from adrenaline_py.serving import bench_serve as bs
from adrenaline_py.serving import workloads as wl
from adrenaline_py.serving.workloads import BenchRequest


@pytest.fixture(scope="module")
def byte_tok():
    """dummy models' tokenizer: one token per byte, so every expected length is known exactly."""
    return bs.load_tokenizer("dummy:tiny")


@pytest.fixture(scope="module")
def smol_tok():
    try:
        return bs.load_tokenizer("smollm2")
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 GGUF not installed: {e}")


def record(index=0, ttft=None, e2e=None, n_out=0, error=None, input_len=10, output_len=None, itl=(),
           num_input_tokens=None):
    return bs.RequestRecord(index, input_len, output_len if output_len is not None else n_out, ttft_s=ttft,
                            e2e_s=e2e, itl_s=list(itl), num_output_tokens=n_out, num_input_tokens=num_input_tokens,
                            finish_reason=None if error else "length", error=error, end_s=e2e)


# --- statistics, SLOs ---------------------------------------------------------------------------


def test_percentile_matches_numpy_linear_interpolation():
    rng = random.Random(3)
    for n in (1, 2, 7, 100):
        xs = sorted(rng.random() for _ in range(n))
        for p in (0, 50, 90, 99, 100):
            assert bs.percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))
    with pytest.raises(ValueError):
        bs.percentile([], 50)


def test_distribution_of_no_values_is_empty_not_zero():
    d = bs.distribution([])
    assert d["count"] == 0 and d["mean"] is None and d["p99"] is None


def test_tpot_is_decode_time_per_token_after_the_first():
    assert record(ttft=0.1, e2e=1.1, n_out=11).tpot_s == pytest.approx(0.1)
    assert record(ttft=0.1, e2e=0.1, n_out=1).tpot_s is None
    assert record(error="boom").tpot_s is None


def test_summary_slo_attainment_and_goodput_on_hand_made_records():
    records = [
        record(0, ttft=0.1, e2e=1.1, n_out=11, itl=[0.1] * 10),       # TTFT 100 ms, TPOT 100 ms: attains
        record(1, ttft=0.3, e2e=2.3, n_out=11, itl=[0.2] * 10),       # TTFT 300 ms > 200: misses
        record(2, ttft=0.05, e2e=0.05, n_out=1, num_input_tokens=12),  # one token: TPOT holds vacuously
        record(3, error="boom"),                                        # failed: never attains
    ]
    s = bs.summarize(records, duration_s=4.0, ttft_slo_ms=200, tpot_slo_ms=150)
    assert (s["num_requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["total_output_tokens"] == 23
    assert s["output_throughput"] == pytest.approx(23 / 4)
    assert s["request_throughput"] == pytest.approx(3 / 4)
    assert s["total_input_tokens"] == 10 + 10 + 12  # the server's count wins where it was reported
    assert s["ttft_ms"]["mean"] == pytest.approx(150)
    assert s["ttft_ms"]["p50"] == pytest.approx(100)
    assert s["ttft_ms"]["p90"] == pytest.approx(260)  # sorted 50, 100, 300: 100 + 0.8 * 200
    assert s["tpot_ms"]["count"] == 2 and s["tpot_ms"]["mean"] == pytest.approx(150)
    assert s["itl_ms"]["count"] == 20 and s["itl_ms"]["mean"] == pytest.approx(150)
    assert s["e2e_ms"]["max"] == pytest.approx(2300)
    assert s["slo"]["attained"] == 2
    assert s["slo"]["attainment"] == pytest.approx(0.5)
    assert s["slo"]["goodput"] == pytest.approx(0.5)
    assert s["errors"] == {"boom": 1}
    # Only the TPOT SLO: the second request (TPOT 200 ms) is the only completed one to miss.
    assert bs.summarize(records, 4.0, None, 150)["slo"]["attained"] == 2
    assert bs.summarize(records, 4.0, None, 250)["slo"]["attained"] == 3
    # No SLO: attainment is the completed fraction.
    assert bs.summarize(records, 4.0)["slo"]["attainment"] == pytest.approx(0.75)


def test_slo_misses_say_why_and_which_output_lengths_missed_tpot():
    records = [
        record(0, ttft=4.0, e2e=5.0, n_out=11),      # TTFT 4 s > 3 s (its TPOT too): counted as TTFT
        record(1, ttft=0.1, e2e=0.4, n_out=3),       # TPOT 150 ms over 3 tokens: a short miss
        record(2, ttft=0.1, e2e=0.15, n_out=3),      # TPOT 25 ms: attains
        record(3, ttft=0.1, e2e=8.1, n_out=101),     # TPOT 80 ms over 101 tokens
        record(4, ttft=0.1, e2e=3.1, n_out=301),     # TPOT 10 ms: attains
        record(5, ttft=0.1, e2e=0.1, n_out=1),       # one token: TPOT holds vacuously
        record(6, error="boom"),
    ]
    s = bs.summarize(records, 10.0, ttft_slo_ms=3000, tpot_slo_ms=50)
    misses = s["slo"]["misses"]
    assert (misses["failed"], misses["ttft"], misses["tpot_only"]) == (1, 1, 2)
    assert misses["tpot_by_output_tokens"] == {"1-3": [1, 3], "4-15": [0, 1], "16-63": [0, 0],
                                               "64-255": [1, 1], "256+": [0, 1]}
    assert s["slo"]["attained"] == len(records) - sum((misses["failed"], misses["ttft"], misses["tpot_only"]))
    text = bs.format_summary({"summary": s, "server_metrics": {}, "request_rate": 1.0, "label": "x",
                              "concurrency": None})
    assert "1 / 1 / 2" in text and "1-3: 1/3" in text and "64-255: 1/1" in text


def test_stream_state_counts_tokens_from_responses_not_text():
    rec = bs.RequestRecord(0, 5, 4, send_s=3.0)
    st = bs._StreamState(rec, t_send=10.0)
    assert not st.on_event({"text_output": "a", "num_output_tokens": 1, "finish_reason": ""}, 10.2)
    assert not st.on_event({"text_output": "", "num_output_tokens": 0, "finish_reason": ""}, 10.25)
    assert not st.on_event({"text_output": "bcd", "num_output_tokens": 2, "finish_reason": ""}, 10.3)
    assert st.on_event({"text_output": "", "num_output_tokens": 1, "finish_reason": "length",
                        "num_input_tokens": 5}, 10.5)
    assert rec.num_output_tokens == 4 and rec.num_input_tokens == 5
    assert rec.ttft_s == pytest.approx(0.2) and rec.e2e_s == pytest.approx(0.5)
    assert rec.itl_s == pytest.approx([0.1, 0.2])
    assert rec.is_ok and rec.tpot_s == pytest.approx(0.1)
    # when each response's tokens came, from the start of the run (sent 3 s in, at t_send 10.0)
    assert [(round(t, 6), n) for t, n in rec.token_arrivals] == [(3.2, 1), (3.3, 2), (3.5, 1)]

    err = bs.RequestRecord(1, 5, 4)
    assert bs._StreamState(err, 0.0).on_event({"error": "max_tokens must be <= 512"}, 0.1)
    assert not err.is_ok and "max_tokens" in err.error
    lost = bs.RequestRecord(2, 5, 4)
    st = bs._StreamState(lost, 0.0)
    st.on_event({"num_output_tokens": 1}, 0.1)
    st.end_of_stream()
    assert not lost.is_ok and "without a finish reason" in lost.error


def test_request_settings_force_the_output_length():
    req = BenchRequest("hi", 1, 7)
    forced = bs.request_settings(req, bs.BenchConfig())
    assert forced["max_tokens"] == forced["min_tokens"] == 7 and forced["stream"] is True
    assert json.loads(forced["sampling_parameters"]) == {"ignore_eos": True}
    free = bs.request_settings(req, bs.BenchConfig(force_output_len=False))
    assert "min_tokens" not in free and "sampling_parameters" not in free


# --- arrivals -----------------------------------------------------------------------------------


def test_poisson_arrivals_have_the_asked_mean_gap():
    offsets = bs.poisson_offsets(5.0, random.Random(0))
    times = [next(offsets) for _ in range(20000)]
    gaps = np.diff([0.0, *times])
    assert (gaps > 0).all()
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    assert gaps.std() == pytest.approx(0.2, rel=0.05)  # exponential: std = mean
    inf = bs.poisson_offsets(math.inf, random.Random(0))
    assert [next(inf) for _ in range(5)] == [0.0] * 5


def test_arrival_schedule_counts_durations_cycles_and_replays():
    reqs = [BenchRequest(f"p{i}", 1, 1, arrival_s=float(i)) for i in range(4)]
    sent = list(bs.arrival_schedule(reqs, 2.0, seed=1, num_prompts=3, duration_s=None))
    assert [r.prompt for r, _ in sent] == ["p0", "p1", "p2"]
    assert sent == list(bs.arrival_schedule(reqs, 2.0, seed=1, num_prompts=3, duration_s=None))  # seeded
    cycled = list(bs.arrival_schedule(reqs, 20.0, seed=1, num_prompts=None, duration_s=2.0))
    assert len(cycled) > 4 and all(t <= 2.0 for _, t in cycled)
    assert [r.prompt for r, _ in cycled[:6]] == ["p0", "p1", "p2", "p3", "p0", "p1"]
    replay = list(bs.arrival_schedule(reqs, math.inf, 0, None, duration_s=1.0, trace_replay=True, time_scale=0.5))
    assert [(r.prompt, t) for r, t in replay] == [("p0", 0.0), ("p1", 0.5), ("p2", 1.0)]


def test_config_refuses_unbounded_or_inconsistent_runs():
    with pytest.raises(ValueError, match="infinite request rate"):
        bs.BenchConfig(dataset="fixed", duration_s=5).check()
    bs.BenchConfig(dataset="fixed", duration_s=5, concurrency=2).check()
    with pytest.raises(ValueError, match="timestamps"):
        bs.BenchConfig(dataset="fixed", trace_replay=True).check()
    assert cli_main(["bench", "serve", "--dataset", "fixed", "--trace-replay", "--no-progress"]) == 2


# --- workloads ----------------------------------------------------------------------------------


def _conv(*turns):
    return {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_read_sharegpt_takes_first_exchange_and_stops_at_a_truncated_record(tmp_path):
    records = [
        _conv(("system", "be nice"), ("human", "hello"), ("gpt", "hi there"), ("human", "more"), ("gpt", "no")),
        _conv(("gpt", "I start"), ("human", "question"), ("gpt", "answer")),
        _conv(("human", "no reply")),
        _conv(("human", "   "), ("gpt", "empty prompt")),
    ]
    text = json.dumps(records, indent=2)
    truncated = text[:-1].rstrip() + ",\n" + json.dumps(_conv(("human", "cut"), ("gpt", "off")))[:25]
    path = tmp_path / "sharegpt.json"
    path.write_text(truncated)
    assert wl.read_sharegpt(path) == [("hello", "hi there"), ("question", "answer")]
    path.write_text(text)
    assert wl.read_sharegpt(path) == [("hello", "hi there"), ("question", "answer")]


def test_sharegpt_lengths_are_filtered_and_clipped_in_tokens(byte_tok):
    pairs = [("a" * 5, "b" * 3), ("c" * 50, "d" * 3), ("e" * 8, "f" * 40), ("g" * 6, "h")]
    reqs = wl.sharegpt_requests(pairs, byte_tok, 10, seed=0, max_input_len=10, max_output_len=20, min_output_len=2)
    got = sorted((r.prompt, r.input_len, r.output_len) for r in reqs)
    # 50-byte prompt dropped (too long), 1-byte reply dropped (too short), 40-byte reply clipped to 20.
    assert got == [("aaaaa", 5, 3), ("eeeeeeee", 8, 20)]
    many = [(f"prompt {i}", "reply") for i in range(50)]
    a = wl.sharegpt_requests(many, byte_tok, 10, 1, 100, 100)
    assert a == wl.sharegpt_requests(many, byte_tok, 10, 1, 100, 100)
    assert a != wl.sharegpt_requests(many, byte_tok, 10, 2, 100, 100)
    assert len(a) == 10


def test_packaged_sharegpt_loads(smol_tok):
    try:
        path = wl.sharegpt_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    pairs = wl.read_sharegpt(path)
    assert 15000 < len(pairs) <= 17671  # whole conversations of the truncated file, those with an exchange
    reqs = wl.sharegpt_requests(pairs, smol_tok, 50, 0, max_input_len=256, max_output_len=128)
    assert len(reqs) == 50
    assert all(1 <= r.input_len <= 256 and 2 <= r.output_len <= 128 for r in reqs)
    assert all(r.input_len == len(smol_tok.encode(r.prompt)) for r in reqs)


def test_shipped_sharegpt_lengths_match_the_package_counted_by_a_real_tokenizer(smol_tok):
    """The CSV is what tools/sharegpt_lengths.py computes: the pairs `--dataset sharegpt` reads, in order,
    as SmolLM2 content tokens (checked on a sample), and a byte tokenizer would count far longer."""
    lengths = wl.read_sharegpt_lengths(wl.default_sharegpt_lengths_path())
    try:
        pairs = wl.read_sharegpt(wl.sharegpt_path())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert len(lengths) == len(pairs)
    for i in range(0, len(pairs), 997):
        prompt, reply = pairs[i]
        assert lengths[i] == (len(smol_tok.encode(prompt, add_special_tokens=False)),
                              len(smol_tok.encode(reply, add_special_tokens=False))), i
    inputs = sorted(i for i, _ in lengths)
    assert 10 <= inputs[len(inputs) // 2] <= 200  # a chat prompt's median, in BPE tokens
    assert len(pairs[0][0].encode()) > 2 * lengths[0][0]  # bytes: what the dummy models would count


def test_sharegpt_length_requests_have_the_drawn_lengths_in_the_served_tokens(byte_tok):
    lengths = [(5, 3), (50, 3), (8, 40), (6, 1)]
    maker = wl.PromptMaker(byte_tok, seed=0)
    reqs = wl.sharegpt_length_requests(lengths, maker, 10, seed=0, max_input_len=10, max_output_len=20)
    # 50 tokens dropped (too long), a 1-token reply dropped (too short), 40 clipped to 20
    assert sorted((r.input_len, r.output_len) for r in reqs) == [(5, 3), (8, 20)]
    assert all(len(byte_tok.encode(r.prompt)) == r.input_len for r in reqs)
    shipped = wl.read_sharegpt_lengths(wl.default_sharegpt_lengths_path())
    a = wl.sharegpt_length_requests(shipped, wl.PromptMaker(byte_tok, 1), 20, 1, 1024, 1024)
    assert len(a) == 20 and a == wl.sharegpt_length_requests(shipped, wl.PromptMaker(byte_tok, 1), 20, 1, 1024, 1024)
    cfg = bs.BenchConfig(model="dummy:tiny", dataset="sharegpt-lengths", num_prompts=7, max_input_len=256,
                         max_output_len=64)
    built = bs.build_requests(cfg)  # what --dataset sharegpt-lengths sends
    assert len(built) == 7 and all(r.input_len <= 256 and 2 <= r.output_len <= 64 for r in built)


@pytest.mark.parametrize("which", ["byte", "smollm2"])
def test_synthetic_prompts_have_exact_token_lengths(which, request):
    tok = request.getfixturevalue("byte_tok" if which == "byte" else "smol_tok")
    maker = wl.PromptMaker(tok, seed=0)
    rng = random.Random(0)
    for n in [1, 2, 3, 16, 37, 128, 1000]:
        text, count = maker.make(n, rng)
        assert count == n == len(tok.encode(text)), n
    fixed = wl.fixed_requests(maker, 5, 16, 8, seed=0)
    assert [(r.input_len, r.output_len) for r in fixed] == [(16, 8)] * 5
    assert fixed == wl.fixed_requests(wl.PromptMaker(tok, 0), 5, 16, 8, seed=0)


def test_long_output_lengths_follow_the_documented_lognormal(byte_tok):
    maker = wl.PromptMaker(byte_tok, 0)
    reqs = wl.long_output_requests(maker, 400, seed=0, max_input_len=4096, max_output_len=100000,
                                   output_median=3000, output_sigma=0.6)
    outs = [r.output_len for r in reqs]
    assert statistics.median(outs) == pytest.approx(3000, rel=0.1)
    assert statistics.stdev(np.log(outs)) == pytest.approx(0.6, rel=0.15)
    assert statistics.median(r.input_len for r in reqs) == pytest.approx(wl.LONG_OUTPUT_INPUT_MEDIAN, rel=0.15)
    clipped = wl.long_output_requests(maker, 100, seed=0, max_input_len=64, max_output_len=1024,
                                      output_median=3000, output_sigma=0.6)
    assert all(r.input_len <= 64 and 2 <= r.output_len <= 1024 for r in clipped)
    assert sum(r.output_len == 1024 for r in clipped) > 90  # median 3000 clipped at 1024


def test_mooncake_rows_keep_timestamps_and_shared_prefix_blocks(tmp_path, byte_tok):
    rows = [
        {"timestamp": 1000, "input_length": 600, "output_length": 20, "hash_ids": [7, 8]},
        {"timestamp": 1500, "input_length": 600, "output_length": 900, "hash_ids": [7, 9]},
        {"timestamp": 2500, "input_length": 5000, "output_length": 3, "hash_ids": list(range(10, 20))},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    maker = wl.PromptMaker(byte_tok, 0)
    reqs = wl.mooncake_requests(wl.read_mooncake(path), maker, max_input_len=1024, max_output_len=512)
    assert [(r.input_len, r.output_len, r.arrival_s) for r in reqs] == [(600, 20, 0.0), (600, 512, 0.5),
                                                                       (1024, 3, 1.5)]
    block = wl.MOONCAKE_BLOCK_TOKENS  # one byte per token: blocks are byte ranges
    assert reqs[0].prompt[:block] == reqs[1].prompt[:block]
    assert reqs[0].prompt[block:] != reqs[1].prompt[block:]
    assert len(wl.mooncake_requests(wl.read_mooncake(path), maker, 1024, 512, max_arrival_s=0.5)) == 2
    assert len(wl.mooncake_requests(wl.read_mooncake(path), maker, 1024, 512, num_requests=1)) == 1


def test_shipped_mooncake_trace_loads(byte_tok):
    path = wl.default_mooncake_path()
    if not path.exists():
        pytest.skip(f"no trace at {path}")
    reqs = wl.mooncake_requests(wl.read_mooncake(path), wl.PromptMaker(byte_tok, 0), 2048, 256, num_requests=40)
    assert len(reqs) == 40
    arrivals = [r.arrival_s for r in reqs]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    assert all(r.input_len == len(byte_tok.encode(r.prompt)) <= 2048 for r in reqs)


# --- server metrics -----------------------------------------------------------------------------

PROM = """\
# HELP adrenaline_kv_blocks_used KV cache blocks in use, per pool
# TYPE adrenaline_kv_blocks_used gauge
adrenaline_kv_blocks_used{pool="executor"} 256
adrenaline_kv_blocks_used{pool="decode"} 64
# TYPE adrenaline_kv_blocks_total gauge
adrenaline_kv_blocks_total{pool="executor"} 1024
adrenaline_kv_blocks_total{pool="decode"} 1024
# TYPE adrenaline_decode_steps_total counter
adrenaline_decode_steps_total 7 1700000000000
# TYPE adrenaline_decode_batch_size histogram
adrenaline_decode_batch_size_count{rows="all"} 8
adrenaline_decode_batch_size_sum{rows="all"} 24
adrenaline_decode_batch_size_bucket{rows="all",le="+Inf"} 8
# TYPE odd gauge
odd{msg="a \\"quoted\\" \\\\ word, and more",x="1"} +Inf
"""


def test_parse_prometheus_text():
    samples, types = bs.parse_prometheus(PROM)
    assert types["adrenaline_decode_batch_size"] == "histogram"
    assert samples[("adrenaline_kv_blocks_used", (("pool", "executor"),))] == 256
    assert samples[("adrenaline_decode_steps_total", ())] == 7  # the timestamp is not the value
    assert samples[("adrenaline_decode_batch_size_bucket", (("le", "+Inf"), ("rows", "all")))] == 8
    assert samples[("odd", (("msg", 'a "quoted" \\ word, and more'), ("x", "1")))] == math.inf
    assert len(samples) == 9


def test_server_metric_summary_over_samples():
    def snap(used_d, used_e, steps, count, total):
        text = PROM.replace('pool="decode"} 64', f'pool="decode"}} {used_d}')
        text = text.replace('pool="executor"} 256', f'pool="executor"}} {used_e}')
        text = text.replace("_steps_total 7", f"_steps_total {steps}")
        text = text.replace('_count{rows="all"} 8', f'_count{{rows="all"}} {count}')
        return bs.parse_prometheus(text.replace('_sum{rows="all"} 24', f'_sum{{rows="all"}} {total}'))

    (s0, types), (s1, _), (s2, _) = snap(0, 0, 10, 10, 10), snap(512, 256, 20, 20, 50), snap(256, 0, 30, 30, 70)
    m = bs.summarize_server_metrics([(0.0, s0), (0.5, s1), (1.0, s2)], types)
    assert m["num_samples"] == 3
    assert m["kv_use"]["decode"] == pytest.approx({"mean": 0.25, "max": 0.5})
    assert m["kv_use"]["executor"]["max"] == pytest.approx(0.25)
    assert m["counters"]["adrenaline_decode_steps_total"] == 20
    h = m["histograms"]['adrenaline_decode_batch_size{rows="all"}']
    assert h["count"] == 20 and h["mean"] == pytest.approx(3.0) and h["max_interval_mean"] == pytest.approx(4.0)
    assert m["gauges"]['adrenaline_kv_blocks_used{pool="decode"}']["max"] == 512
    assert bs.summarize_server_metrics([], {})["num_samples"] == 0


def test_metrics_sampler_warns_and_continues_without_an_endpoint(capsys):
    (port,) = free_ports(1)

    async def go():
        sampler = bs.MetricsSampler(f"http://127.0.0.1:{port}/metrics", interval_s=0.05)
        sampler.start(time.perf_counter())
        await asyncio.sleep(0.2)
        return await sampler.stop()

    m = asyncio.run(go())
    assert m["num_samples"] == 0 and "unavailable" in m["warning"]
    assert capsys.readouterr().err.count("warning:") == 1  # once, not every interval


# --- output and plots ---------------------------------------------------------------------------


def _fake_result(label, rate, ttft):
    recs = [record(i, ttft=ttft, e2e=ttft + 0.7, n_out=8) for i in range(4)]
    return {"label": label, "request_rate": rate, "concurrency": None, "config": {},
            "summary": bs.summarize(recs, 2.0, ttft_slo_ms=250), "server_metrics": {"num_samples": 0}}


def test_plots_one_line_per_label(tmp_path):
    paths = []
    for label, ttfts in (("never", (0.1, 0.3)), ("always", (0.1, 0.2))):
        for rate, ttft in zip((1.0, math.inf), ttfts):
            path = tmp_path / f"{label}-{rate}.json"
            bs.write_result(_fake_result(label, rate, ttft), path)
            paths.append(path)
    assert json.loads(paths[1].read_text())["request_rate"] == "inf"
    out = bs.plot_results(paths, tmp_path / "plots")
    assert sorted(p.name for p in out) == ["slo_attainment.png", "throughput.png", "tpot.png", "ttft.png"]
    for p in out:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_summary_table_mentions_every_latency():
    text = bs.format_summary(_fake_result("x", 2.0, 0.1))
    for word in ("TTFT", "TPOT", "ITL", "E2E", "goodput", "SLO"):
        assert word in text


# --- against a real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, smol_tok):
    server = start_test_server(tmp_path_factory.mktemp("bench-serve") / "server.log", model="smollm2",
                               offload="ratio:0.5", max_model_len=1024, max_tokens_limit=256)
    yield server
    server.stop()


def _bench(server, out_dir, *args) -> list[dict]:
    o = server.options
    argv = ["bench", "serve", "--url", server.http_url, "--grpc-url", f"127.0.0.1:{o.grpc_port}",
            "--metrics-url", f"http://127.0.0.1:{o.metrics_port}/metrics", "--model", "smollm2",
            "--result-dir", str(out_dir), "--no-progress", *args]
    assert cli_main(argv) == 0
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]


def _check_consistent(result, n, n_out, n_in):
    recs = result["requests"]
    s = result["summary"]
    assert len(recs) == n == s["num_requests"]
    for r in recs:
        assert r["error"] is None and r["finish_reason"] == "length", r
        assert r["num_output_tokens"] == n_out  # forced: every request ran to max_tokens
        assert r["num_input_tokens"] == n_in     # the server counted what the benchmark counted
        assert 0 < r["ttft_s"] < r["e2e_s"]
        assert len(r["itl_s"]) <= n_out - 1
        assert r["ttft_s"] + sum(r["itl_s"]) == pytest.approx(r["e2e_s"], abs=1e-6)
    assert s["total_output_tokens"] == n * n_out and s["num_short_outputs"] == 0
    slo = s["slo"]
    expected = sum(r["ttft_s"] * 1000 <= slo["ttft_ms"] and r["tpot_s"] * 1000 <= slo["tpot_ms"] for r in recs)
    assert slo["attained"] == expected and 0.0 <= slo["attainment"] == expected / n <= 1.0
    assert slo["goodput"] == pytest.approx(expected / s["duration_s"])


@pytest.mark.server
def test_sweep_over_http_and_grpc_against_a_real_server(server, tmp_path, smol_tok):
    t0 = time.monotonic()
    http = _bench(server, tmp_path / "http", "--backend", "http", "--dataset", "fixed", "--input-len", "16",
                  "--output-len", "8", "--num-prompts", "6", "--request-rates", "4", "inf",
                  "--ttft-slo", "1500", "--tpot-slo", "150", "--label", "ci-http")
    assert len(http) == 2
    by_rate = {r["request_rate"]: r for r in http}
    assert set(by_rate) == {4.0, "inf"}
    for result in http:
        _check_consistent(result, 6, 8, 16)
        m = result["server_metrics"]
        assert m["num_samples"] >= 2 and m["warning"] is None
        assert m["counters"]["adrenaline_decode_steps_total"] >= 7  # 8 tokens: prefill + 7 steps at least
        assert m["histograms"]['adrenaline_decode_batch_size{rows="all"}']["mean"] >= 1
        for pool in ("decode", "executor"):
            assert 0.0 <= m["kv_use"][pool]["mean"] <= m["kv_use"][pool]["max"] <= 1.0
        # each request's 7 decode steps attend 17..23 context tokens (16 prompt + outputs so far)
        read = sum(m["counters"][f'adrenaline_attention_kv_tokens_read_total{{pool="{p}"}}']
                   for p in ("decode", "executor"))
        assert read == 6 * sum(range(17, 24))
        assert m["kv_read_gbs"]["decode"] > 0 and m["kv_read_gbs"]["executor"] > 0  # ratio:0.5 uses both
        pre = m["prefill"]   # 6 prompts of 16 tokens, in one or more passes; Triton queued each before its pass
        assert m["counters"]["adrenaline_prefill_prompts_total"] == 6
        assert m["counters"]["adrenaline_prefill_tokens_total"] == 96
        assert 1 <= m["counters"]["adrenaline_prefill_passes_total"] <= 6
        assert 0 < pre["busy"] < 1 and pre["ms_per_pass"] > 0 and pre["queue_ms"] >= 0
        assert pre["tokens_per_pass"] == pytest.approx(16 * pre["prompts_per_pass"])
        before = m["before_decode"]   # every request went through admission and a prefill call
        assert m["counters"]["adrenaline_scheduler_prefilled_total"] == 6
        assert before["admission_ms"] >= 0 and before["prefill_call_ms"] >= pre["ms_per_pass"] / 6
    sends = [r["send_s"] for r in by_rate[4.0]["requests"]]
    assert sends == sorted(sends) and sends[-1] > 0.2      # Poisson arrivals at 4 req/s are spread out
    assert max(r["send_s"] for r in by_rate["inf"]["requests"]) < 0.5  # all at once

    grpc = _bench(server, tmp_path / "grpc", "--backend", "grpc", "--dataset", "fixed", "--input-len", "16",
                  "--output-len", "8", "--num-prompts", "3", "--concurrency", "2", "--metrics-url", "none",
                  "--ttft-slo", "1500", "--tpot-slo", "150", "--label", "ci-grpc")
    assert len(grpc) == 1 and grpc[0]["concurrency"] == 2
    _check_consistent(grpc[0], 3, 8, 16)
    assert grpc[0]["server_metrics"]["num_samples"] == 0

    plots = tmp_path / "plots"
    assert cli_main(["bench", "plot", *map(str, sorted((tmp_path / "http").glob("*.json"))),
                     *map(str, (tmp_path / "grpc").glob("*.json")), "--out", str(plots)]) == 0
    assert all((plots / f).stat().st_size > 5000 for f in ("throughput.png", "ttft.png", "tpot.png",
                                                            "slo_attainment.png"))
    assert time.monotonic() - t0 < 60


@pytest.mark.server
@pytest.mark.parametrize("backend", ["http", "grpc"])
def test_rejected_requests_are_counted_as_failures(server, tmp_path, backend):
    results = _bench(server, tmp_path, "--backend", backend, "--dataset", "fixed", "--input-len", "8",
                     "--output-len", "300", "--num-prompts", "2", "--metrics-url", "none")
    s = results[0]["summary"]
    assert (s["completed"], s["failed"]) == (0, 2)
    assert s["slo"]["attainment"] == 0.0
    assert all("max_tokens must be <= 256" in r["error"] for r in results[0]["requests"])


def test_steady_throughput_counts_the_tokens_that_arrived_in_the_window():
    def rec(i, send, arrivals):
        r = bs.RequestRecord(i, 8, 4, send_s=send, ttft_s=arrivals[0][0] - send, e2e_s=arrivals[-1][0] - send,
                          num_output_tokens=sum(n for _, n in arrivals), finish_reason="length")
        r.token_arrivals = arrivals
        return r

    records = [rec(0, 0.0, [(1.0, 1), (2.0, 3)]), rec(1, 4.0, [(5.0, 1), (9.0, 2), (30.0, 4)])]
    s = bs.summarize(records, 30.0, steady_window=(2.0, 10.0))
    assert s["steady_window_s"] == [2.0, 10.0]
    assert s["steady_output_throughput"] == pytest.approx((3 + 1 + 2) / 8.0)  # the drain at 30 s is outside
    assert s["output_throughput"] == pytest.approx(11 / 30.0)
    assert "steady_output_throughput" not in bs.summarize(records, 30.0)
    assert bs.steady_window(records, 2.0, None) == (1.0, 4.0)       # a quarter of the sending time to its end
    assert bs.steady_window(records, math.inf, None) is None          # all at once: no steady load
    assert bs.steady_window(records, math.inf, 16) == (1.0, 4.0)      # a closed loop keeps sending


def test_kv_read_bandwidth_is_tokens_times_bytes_per_token_over_the_span():
    counters = {'adrenaline_attention_kv_tokens_read_total{pool="decode"}': 2e6,
                'adrenaline_attention_kv_tokens_read_total{pool="executor"}': 1e6}
    gauges = {"adrenaline_kv_bytes_per_token": {"mean": 524288.0, "max": 524288.0, "last": 524288.0}}
    assert bs.kv_read_bandwidth(counters, gauges, 2.0) == pytest.approx({"decode": 524.288, "executor": 262.144})
    assert bs.kv_read_bandwidth(counters, {}, 2.0) == {}  # an older server: no per-token size


def test_prefill_breakdown_is_busy_time_over_the_span_and_triton_queue_time_per_prompt():
    counters = {"adrenaline_prefill_passes_total": 10.0, "adrenaline_prefill_prompts_total": 40.0,
                "adrenaline_prefill_tokens_total": 4000.0, "adrenaline_prefill_busy_seconds_total": 0.5,
                'nv_inference_queue_duration_us{model="prefill",version="1"}': 80000.0,
                'nv_inference_request_success{model="prefill",version="1"}': 40.0,
                'nv_inference_queue_duration_us{model="ensemble",version="1"}': 1e9,   # another model's queue
                'nv_inference_request_success{model="ensemble",version="1"}': 1.0}
    b = bs.prefill_breakdown(counters, 2.0)
    assert b == pytest.approx({"busy": 0.25, "prompt_tokens_per_s": 2000.0, "prompts_per_pass": 4.0,
                               "tokens_per_pass": 400.0, "ms_per_pass": 50.0, "queue_ms": 2.0})
    assert bs.prefill_breakdown({}, 2.0) == {}                     # an older server, or no prompt in the span
    assert "queue_ms" not in bs.prefill_breakdown({"adrenaline_prefill_passes_total": 1.0}, 2.0)


def test_before_decode_is_the_scheduler_time_per_request():
    counters = {"adrenaline_scheduler_prefilled_total": 4.0, "adrenaline_admission_wait_seconds_total": 0.2,
                "adrenaline_scheduler_prefill_seconds_total": 0.6}
    assert bs.before_decode(counters) == pytest.approx({"admission_ms": 50.0, "prefill_call_ms": 150.0})
    assert bs.before_decode({}) == {}


def test_decode_loop_breakdown_is_milliseconds_per_step_and_per_response():
    counters = {"adrenaline_decode_steps_total": 100.0,
                'adrenaline_decode_step_seconds_total{phase="prepare"}': 0.2,
                'adrenaline_decode_step_seconds_total{phase="wait"}': 2.0,
                'adrenaline_decode_step_seconds_total{phase="device"}': 1.9,
                'adrenaline_decode_step_seconds_total{phase="offload_wait"}': 0.3,
                'adrenaline_decode_step_seconds_total{phase="executor_idle"}': 0.1,
                "adrenaline_executor_steps_total": 50.0, "adrenaline_executor_host_seconds_total": 0.05,
                "adrenaline_output_responses_total": 400.0, "adrenaline_output_events_total": 500.0,
                "adrenaline_output_send_seconds_total": 0.04, "adrenaline_output_lag_seconds_total": 2.0,
                "adrenaline_decode_two_batch_steps_total": 25.0}
    b = bs.decode_loop_breakdown(counters)
    assert b["two_batch_share"] == pytest.approx(0.25)
    assert b["step_ms"] == pytest.approx({"prepare": 2.0, "wait": 20.0, "device": 19.0, "offload_wait": 3.0,
                                          "executor_idle": 1.0})
    assert list(b["step_ms"])[:2] == ["prepare", "wait"]   # host phases first, then GPU times
    assert b["host_step_ms"] == pytest.approx(22.0)        # GPU times are not host phases
    assert b["executor_host_ms"] == pytest.approx(1.0)     # per executor step
    assert b["send_ms"] == pytest.approx(0.1) and b["lag_ms"] == pytest.approx(5.0) and b["events"] == 500
    assert bs.decode_loop_breakdown({}) == {}


def test_pyspy_summary_puts_threads_in_roles_and_counts_leaf_frames():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "tools" / "pyspy_summary.py"
    spec = importlib.util.spec_from_file_location("pyspy_summary", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lines = ["thread (1): decode-loop;DecodeEngine._loop (decode.py:1);sample (sampler.py:9) 30",
             "thread (2): output-0;OutputWorkers._work (output.py:2);Role._send (role_decode.py:3) 60",
             "thread (2): output-0;OutputWorkers._work (output.py:2);tensor (common.py:4) 10",
             "process 7:\"x\" not-a-count"]
    total, roles, leaves = mod.summarize(lines)
    assert total == 100 and roles == {"output": 70, "decode-loop": 30}
    assert leaves[("output", "Role._send (role_decode.py:3)")] == 60


def _timed(i, send, end):
    return bs.RequestRecord(i, 8, 4, send_s=send, end_s=end, ttft_s=0.1, e2e_s=None if end is None else end - send,
                            num_output_tokens=4, finish_reason=None if end is None else "length")


def test_in_flight_levels_off_under_a_sustained_load_and_grows_past_it():
    sends = [i * 0.1 for i in range(100)]                      # 10 req/s for 10 s
    sustained = [_timed(i, t, t + 1.0) for i, t in enumerate(sends)]   # each takes 1 s: ~10 in flight
    trend = bs.in_flight_trend(sustained, 9.9)
    assert trend["steady"] and trend["at_half"] == trend["at_end"] == 10
    queued = [_timed(i, t, t + 1.0 + t) for i, t in enumerate(sends)]  # each waits as long as it was sent late
    trend = bs.in_flight_trend(queued, 9.9)
    assert not trend["steady"] and trend["growth"] == pytest.approx(trend["at_end"] / trend["at_half"])
    assert trend["at_end"] > 1.5 * trend["at_half"]
    unfinished = [_timed(i, t, None) for i, t in enumerate(sends)]      # nothing ends: all still in flight
    assert bs.in_flight_trend(unfinished, 9.9)["at_end"] == 100


def test_a_sweep_says_when_its_capacity_run_was_not_steady():
    sends = [i * 0.1 for i in range(100)]
    growing = [_timed(i, t, t + 1.0 + t) for i, t in enumerate(sends)]
    summary = bs.summarize(growing, 30.0, 3000.0, None, steady_window=(2.5, 9.9))
    assert summary["in_flight"]["steady"] is False and summary["slo"]["attainment"] == 1.0
    run = {"request_rate": 10.0, "summary": summary}
    assert bs.slo_capacity([run])["steady"] is False
    text = bs.format_sweep([run])
    assert "not steady" in text and "!" in text.splitlines()[1]
    assert "NOT STEADY" in bs.format_summary({**run, "label": "x", "server_metrics": {}, "concurrency": None,
                                              "trace_replay": False})
    steady = bs.summarize([_timed(i, t, t + 1.0) for i, t in enumerate(sends)], 30.0, 3000.0, None, (2.5, 9.9))
    assert bs.slo_capacity([{"request_rate": 10.0, "summary": steady}])["steady"] is True
    assert "not steady" not in bs.format_sweep([{"request_rate": 10.0, "summary": steady}])


def test_slo_capacity_is_the_best_throughput_among_runs_that_attain_the_target():
    def run(rate, tok_s, attainment):
        return {"request_rate": rate, "summary": {"output_throughput": tok_s, "slo": {"attainment": attainment}}}

    results = [run(8, 3400.0, 1.0), run(14, 5500.0, 0.93), run(20, 6100.0, 0.37)]
    assert bs.slo_capacity(results) == {"target": 0.9, "request_rate": 14, "output_throughput": 5500.0}
    assert bs.slo_capacity(results, target=0.95)["request_rate"] == 8
    assert bs.slo_capacity([run(20, 6100.0, 0.37)]) is None
