"""`RequestOutput`: decode's token events → client response chunks (byte tokenizer: 1 token = 1 byte)."""

import threading
import time

import pytest

from adrenaline_py.config import NAMED_SHAPES
from adrenaline_py.engine.decode import Sequence, TokenEvent
from adrenaline_py.engine.output import RequestOutput, ResponseChunk
from adrenaline_py.request import GenerationParams, OutputOptions, SamplingParams
from adrenaline_py.weights.dummy import byte_tokenizer

TOK = byte_tokenizer(NAMED_SHAPES["tiny"])
PROMPT = "Say: "


def make_seq(stream=False, exclude_input=True, stop=()):
    params = GenerationParams(
        SamplingParams(max_tokens=100, stop=tuple(stop)),
        OutputOptions(stream=stream, exclude_input_in_output=exclude_input),
    )
    return Sequence(7, TOK.encode(PROMPT), [], [0], "decode", params)


def events_for(seq, text, finish_reason="length"):
    """One event per token (as decode sends them); the last one carries the finish reason."""
    ids = TOK.encode(text)
    return [TokenEvent(seq, [t], finish_reason if i == len(ids) - 1 else None) for i, t in enumerate(ids)]


def play(seq, events):
    out = RequestOutput(TOK, events[0])
    return out, [out.on_event(ev) for ev in events]


def chunks(results):
    return [c for c, _ in results if c is not None]


def test_non_streaming_sends_one_final_chunk_with_all_text_and_tokens():
    seq = make_seq()
    text = "héllo 日本"
    _, results = play(seq, events_for(seq, text))
    assert [c for c, _ in results[:-1]] == [None] * (len(results) - 1)
    assert results[-1] == (ResponseChunk(text, len(text.encode()), len(PROMPT), "length"), False)


def test_non_streaming_with_input_in_output_prefixes_the_prompt_text():
    seq = make_seq(exclude_input=False)
    _, results = play(seq, events_for(seq, "ok"))
    assert chunks(results) == [ResponseChunk(PROMPT + "ok", 2, len(PROMPT), "length")]


def test_streaming_deltas_add_up_to_the_text_and_the_token_count():
    seq = make_seq(stream=True)
    text = "a日b🎉"
    _, results = play(seq, events_for(seq, text, "stop"))
    sent = chunks(results)
    assert "".join(c.text for c in sent) == text
    assert sum(c.num_output_tokens for c in sent) == len(text.encode())
    assert [c.finish_reason for c in sent] == [None] * (len(sent) - 1) + ["stop"]
    assert all(c.num_input_tokens == len(PROMPT) for c in sent)


def test_streaming_holds_partial_characters_but_answers_every_token():
    seq = make_seq(stream=True)
    _, results = play(seq, events_for(seq, "a日", None))
    # 'a' at once; the first two bytes of 日 get responses with no text (a token each: clients time
    # tokens by responses), the last byte brings the whole character.
    assert [None if c is None else (c.text, c.num_output_tokens) for c, _ in results] == [
        ("a", 1), ("", 1), ("", 1), ("日", 1)
    ]


def test_streaming_without_input_prefix():
    seq = make_seq(stream=True, exclude_input=False)
    _, results = play(seq, events_for(seq, "hi"))
    assert "".join(c.text for c in chunks(results)) == "hi"


def test_error_event_ends_the_request_with_an_error_chunk():
    seq = make_seq(stream=True)
    evs = events_for(seq, "ab", None)
    out, _ = play(seq, evs)
    chunk, stopped = out.on_event(TokenEvent(seq, [], "error", "executor gone"))
    assert chunk == ResponseChunk("", 0, len(PROMPT), "error", "executor gone")
    assert not stopped
    assert out.on_event(evs[0]) == (None, False)     # nothing after the end


def test_abort_with_no_tokens_flushes_held_text():
    seq = make_seq(stream=True, stop=("STOP",))
    out, results = play(seq, events_for(seq, "the ST", None))
    sent = "".join(c.text for c in chunks(results))
    assert sent != "the ST"                            # "ST" may still become "STOP"
    chunk, stopped = out.on_event(TokenEvent(seq, [], "abort"))
    assert sent + chunk.text == "the ST"
    assert chunk.finish_reason == "abort" and not stopped


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_request_and_reports_stopped(stream):
    seq = make_seq(stream=stream, stop=("STOP",))
    evs = events_for(seq, "ab STOP cd", None)
    out, results = play(seq, evs)
    at = len("ab STOP") - 1                            # the event of the token completing the stop
    assert [s for _, s in results] == [i == at for i in range(len(evs))]
    assert all(c is None for c, _ in results[at + 1:])  # later events are ignored
    sent = chunks(results)
    assert sent[-1].finish_reason == "stop"
    text = "".join(c.text for c in sent) if stream else sent[-1].text
    assert text == "ab "
    # Tokens up to and including the one that completed the stop string.
    assert sum(c.num_output_tokens for c in sent) == len("ab STOP")
    assert out.on_event(TokenEvent(seq, [], "abort")) == (None, False)   # the engine's abort echo


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_on_the_last_token_needs_no_abort(stream):
    seq = make_seq(stream=stream, stop=("END",))
    _, results = play(seq, events_for(seq, "xEND", "length"))
    assert [s for _, s in results] == [False] * 4    # decode has already ended the request
    sent = chunks(results)
    assert sent[-1].finish_reason == "stop"
    assert "".join(c.text for c in sent) == "x"
    assert sum(c.num_output_tokens for c in sent) == 4


def test_non_streaming_stop_with_input_in_output():
    seq = make_seq(exclude_input=False, stop=("\n",))
    _, results = play(seq, events_for(seq, "one\ntwo", "length"))
    assert chunks(results) == [ResponseChunk(PROMPT + "one", 4, len(PROMPT), "stop")]


# --- output workers: merging when behind ----------------------------------------------------------

def test_merge_events_joins_each_requests_tokens_and_keeps_its_end():
    from adrenaline_py.engine.output import merge_events

    a, b = make_seq(stream=True), make_seq(stream=True)
    b.seq_id = 8
    merged = merge_events([TokenEvent(a, [1]), TokenEvent(b, [5]), TokenEvent(a, [2]),
                           TokenEvent(b, [6], "length"), TokenEvent(a, [3], None)])
    assert [(e.seq.seq_id, e.token_ids, e.finish_reason) for e in merged] == [(7, [1, 2, 3], None),
                                                                                (8, [5, 6], "length")]


def test_a_worker_that_fell_behind_sends_fewer_responses_with_every_token():
    from adrenaline_py.engine.output import OutputWorkers

    seq = make_seq(stream=True)
    sent, entered, gate = [], threading.Event(), threading.Event()

    def send(handle, chunk):
        entered.set()
        gate.wait(5)                      # the first send blocks while decode queues more steps
        sent.append(chunk)

    workers = OutputWorkers(TOK, send, lambda seq_id: None, num_threads=1)
    workers.start()
    try:
        events = events_for(seq, "Hello, world")
        workers.submit(events[:1])
        assert entered.wait(5)
        for ev in events[1:]:
            workers.submit([ev])
        gate.set()
    finally:
        workers.stop()                    # stops after the queued work
    assert "".join(c.text for c in sent) == "Hello, world" and sent[-1].finish_reason == "length"
    assert sum(c.num_output_tokens for c in sent) == len(events)
    assert len(sent) == 2                 # the first token alone, then everything queued behind it
    stats = workers.stats()
    assert stats.events == len(events) and stats.responses == 2 and stats.lag_s > 0


def test_queued_counts_events_until_their_responses_are_out_and_ignores_cancel_checks():
    from adrenaline_py.engine.output import OutputWorkers

    seq = make_seq(stream=True)
    entered, gate = threading.Event(), threading.Event()

    def send(handle, chunk):
        entered.set()
        gate.wait(5)

    workers = OutputWorkers(TOK, send, lambda seq_id: None, num_threads=2)
    workers.start()
    try:
        events = events_for(seq, "Hi!")
        workers.submit(events)
        assert entered.wait(5)
        workers.check_cancelled(lambda handle: False, lambda seq_id: None)
        assert workers.queued() == len(events)  # taken but still being sent: not out yet
        gate.set()
        deadline = time.monotonic() + 5
        while workers.queued() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert workers.queued() == 0            # the cancel checks queued meanwhile do not count
    finally:
        gate.set()
        workers.stop()


def test_output_threads_wait_at_a_closed_gate_and_go_when_it_opens():
    from adrenaline_py.engine.output import HostGate, OutputWorkers

    gate = HostGate(max_wait_s=5.0)
    sent = threading.Event()
    workers = OutputWorkers(TOK, lambda handle, chunk: sent.set(), lambda seq_id: None, num_threads=1, gate=gate)
    workers.start()
    try:
        gate.close()                      # the decode loop is on the host
        workers.submit(events_for(make_seq(stream=True), "a"))
        assert not sent.wait(0.2)
        gate.open()                       # it waits for the GPU: the outputs' turn
        assert sent.wait(5)
    finally:
        workers.stop()


def test_cancellation_polls_also_wait_for_an_open_gate():
    from adrenaline_py.engine.output import HostGate, OutputWorkers

    gate = HostGate(max_wait_s=5.0)
    asked, sent = threading.Event(), threading.Event()
    workers = OutputWorkers(TOK, lambda handle, chunk: sent.set(), lambda seq_id: None, num_threads=1, gate=gate)
    workers.start()
    try:
        seq = make_seq(stream=True)
        workers.submit(events_for(seq, "ab")[:1])  # the request is under way on its worker
        assert sent.wait(5)
        gate.close()                               # the decode loop is on the host
        workers.check_cancelled(lambda handle: asked.set() or False, lambda seq_id: None)
        assert not asked.wait(0.2)                 # no IPC to tritonserver meanwhile
        gate.open()
        assert asked.wait(5)
    finally:
        gate.open()
        workers.stop()


def test_a_gate_left_closed_delays_outputs_only_up_to_its_bound():
    from adrenaline_py.engine.output import HostGate

    gate = HostGate(max_wait_s=0.05)
    gate.close()
    t0 = time.perf_counter()
    gate.wait()
    assert 0.04 <= time.perf_counter() - t0 < 1.0


def test_a_worker_that_fell_behind_answers_new_requests_before_running_streams():
    # a new request's first response is its time to first token: it must not queue behind the
    # merged tokens of every stream already running on its worker
    from adrenaline_py.engine.output import OutputWorkers

    running, new = make_seq(stream=True), make_seq(stream=True)
    new.seq_id, running.handle, new.handle = 8, "running", "new"
    sent, entered, gate = [], threading.Event(), threading.Event()

    def send(handle, chunk):
        if not sent:                  # the running stream's first response blocks while more queue up
            entered.set()
            gate.wait(5)
        sent.append((handle, chunk.text))

    workers = OutputWorkers(TOK, send, lambda seq_id: None, num_threads=1)
    workers.start()
    try:
        a, b = events_for(running, "ab", finish_reason=None)
        workers.submit([a])
        assert entered.wait(5)
        workers.submit([b])           # queued first ...
        workers.submit(events_for(new, "x"))  # ... before the new request's first token
        gate.set()
    finally:
        workers.stop()
    assert sent == [("running", "a"), ("new", "x"), ("running", "b")]


def _started_streams(n):
    streams = [make_seq(stream=True) for _ in range(n)]
    for i, seq in enumerate(streams):
        seq.seq_id, seq.handle = i, f"r{i}"
    return streams


def _round_blocked_at_its_first_send(streams, record):
    """One output thread that sent each stream's first token ("a") and is in a round of their second
    tokens ("b"), its first send (r0's) blocked until the returned gate is set; ``sent`` collects
    ``record(handle, chunk)`` per response."""
    from adrenaline_py.engine.output import OutputWorkers

    sent, entered, gate = [], threading.Event(), threading.Event()

    def send(handle, chunk):
        sent.append(record(handle, chunk))
        if (handle, chunk.text) == ("r0", "b"):   # the round's first send blocks ...
            entered.set()
            gate.wait(5)

    workers = OutputWorkers(TOK, send, lambda seq_id: None, num_threads=1)
    workers.start()
    try:
        firsts, seconds = zip(*(events_for(seq, "ab", finish_reason=None) for seq in streams))
        workers.submit(list(firsts))
        deadline = time.monotonic() + 5
        while len(sent) < len(streams) and time.monotonic() < deadline:
            time.sleep(0.01)
        workers.submit(list(seconds))              # one round: r0, r1, r2
        assert entered.wait(5)
    except BaseException:
        gate.set()
        workers.stop()
        raise
    return workers, sent, gate


def test_a_new_request_arriving_during_a_round_is_answered_before_the_rest_of_the_round():
    # a round of running streams takes rows x one send; a first token that arrives meanwhile must
    # not wait for the whole round (its time to first token), and each stream keeps its order
    streams = _started_streams(3)
    new = make_seq(stream=True)
    new.seq_id, new.handle = 10, "new"
    workers, sent, gate = _round_blocked_at_its_first_send(streams, lambda handle, chunk: (handle, chunk.text))
    try:
        x, y = events_for(new, "xy", finish_reason=None)
        workers.submit([x])                        # ... while a request arrives
        workers.submit([y])
        gate.set()
    finally:
        workers.stop()
    assert sent == [("r0", "a"), ("r1", "a"), ("r2", "a"), ("r0", "b"), ("new", "x"), ("r1", "b"), ("r2", "b"),
                    ("new", "y")]
    assert workers.stats().events == 8 and workers.queued() == 0


def test_a_worker_that_fell_behind_answers_ending_requests_before_running_streams():
    # a request's last response is its end-to-end latency (and, with its first, its TPOT): it must
    # not queue behind the merged tokens of every stream still running on its worker
    from adrenaline_py.engine.output import OutputWorkers

    streams = _started_streams(3)
    sent, entered, gate = [], threading.Event(), threading.Event()

    def send(handle, chunk):
        sent.append((handle, chunk.text, chunk.finish_reason))
        if len(sent) == 3:                 # the last first token blocks while decode queues more
            entered.set()
            gate.wait(5)

    workers = OutputWorkers(TOK, send, lambda seq_id: None, num_threads=1)
    workers.start()
    try:
        firsts = [events_for(seq, "a", finish_reason=None)[0] for seq in streams]
        workers.submit(firsts)
        assert entered.wait(5)
        r0, r1, r2 = (events_for(seq, "b", finish_reason=None)[0] for seq in streams)
        workers.submit([r0, r1, TokenEvent(streams[2], r2.token_ids, "length")])
        gate.set()
    finally:
        workers.stop()
    assert sent[3:] == [("r2", "b", "length"), ("r0", "b", None), ("r1", "b", None)]


def test_a_request_ending_during_a_round_is_answered_before_the_rest_of_the_round_with_all_its_tokens():
    # the end of a running stream that arrives while a round of running streams is being sent goes
    # out at once, joined with that stream's tokens still waiting in the round or taken meanwhile
    streams = _started_streams(3)
    workers, sent, gate = _round_blocked_at_its_first_send(
        streams, lambda handle, chunk: (handle, chunk.text, chunk.finish_reason))
    try:
        c1, c2 = (events_for(seq, "c", finish_reason=None)[0] for seq in streams[1:])
        workers.submit([c1])                       # ... while r1 goes on ...
        workers.submit([TokenEvent(streams[1], TOK.encode("d"), "length")])  # ... and ends,
        workers.submit([c2])                       # and r2 goes on
        gate.set()
    finally:
        workers.stop()
    assert sent[3:] == [("r0", "b", None), ("r1", "bcd", "length"), ("r2", "b", None), ("r2", "c", None)]
    assert workers.stats().events == 9 and workers.queued() == 0


@pytest.mark.parametrize("seed", range(5))
def test_every_stream_gets_all_its_tokens_in_order_whatever_the_interleaving(seed):
    # the reordering of a round (first tokens, ends, running streams) and the sends out of turn
    # during a round must never drop, repeat or reorder a stream's tokens
    import random

    from adrenaline_py.engine.output import OutputWorkers

    rng = random.Random(seed)
    streams = _started_streams(12)
    texts = {seq.handle: "".join(rng.choice("abcdef") for _ in range(rng.randint(1, 9))) for seq in streams}
    sent: dict[str, list] = {seq.handle: [] for seq in streams}

    def send(handle, chunk):
        sent[handle].append(chunk)
        if rng.random() < 0.3:
            time.sleep(0.002)             # a slow send: decode queues more meanwhile

    workers = OutputWorkers(TOK, send, lambda seq_id: None, num_threads=2)
    workers.start()
    try:
        queues = {seq.handle: events_for(seq, texts[seq.handle]) for seq in streams}
        while any(queues.values()):
            step = [evs.pop(0) for evs in queues.values() if evs and rng.random() < 0.7]
            workers.submit(step)
            time.sleep(rng.choice([0, 0, 0.001]))
    finally:
        workers.stop()
    for handle, chunks_ in sent.items():
        assert "".join(c.text for c in chunks_) == texts[handle]
        assert sum(c.num_output_tokens for c in chunks_) == len(texts[handle])
        assert [c.finish_reason for c in chunks_][-1] == "length"
        assert all(c.finish_reason is None for c in chunks_[:-1])
    assert workers.stats().events == sum(len(t) for t in texts.values()) and workers.queued() == 0
