"""The continuous-batching scheduler (lmlab.serve.scheduler), in process, for every text family:
requests arriving while others decode give the same text as alone, stops and budgets end
them, a cancelled one leaves at once, a full queue is refused."""

from __future__ import annotations

import threading
import time

import pytest

from lmlab.infer.prompting import Stops
from lmlab.infer.sampling import Sampling
from lmlab.serve.scheduler import QueueFull, Scheduler, Sequence


@pytest.fixture(scope="module", params=["transformer", "griffin"])
def loaded(request, tmp_path_factory):
    from serving import random_model_dir

    from lmlab.models import load_model

    d = random_model_dir(tmp_path_factory.getbasetemp() / "serve-models", request.param, context=256)
    model, tok, _ = load_model(d)
    return model.eval(), tok


class Collector:
    def __init__(self):
        self.text, self.reason, self.events = "", None, 0
        self.done = threading.Event()

    def __call__(self, ev):
        self.events += 1
        self.text += ev.text
        if ev.finish_reason:
            self.reason = ev.finish_reason
            self.done.set()


def run_alone(model, tok, prompt, sampling, stops=Stops()):
    s = Scheduler(model, tok, max_batch=1, max_len=256).start()
    c = Collector()
    c.seq = Sequence(prompt, sampling, stops, on_event=c)
    try:
        s.submit(c.seq)
        assert c.done.wait(60)
    finally:
        s.close()
    return c


def prompts(tok, n):
    words = ["The", "cat", "sat", "on", "a", "mat", "while", "the", "dog", "ran", "far", "away"]
    return [[tok.bos_id] + tok.encode(" ".join(words[i % 7:i % 7 + 2 + i % 5])) for i in range(n)]


def test_staggered_arrivals_decode_as_alone(loaded):
    model, tok = loaded
    ps = prompts(tok, 16)
    settings = [Sampling(max_new_tokens=6 + 3 * (i % 4), temperature=0.0 if i % 2 == 0 else 0.9, top_p=0.9, seed=i)
                for i in range(16)]
    alone = [run_alone(model, tok, p, s).text for p, s in zip(ps, settings)]
    sched = Scheduler(model, tok, max_batch=16, max_len=256).start()
    try:
        got = []
        for i, (p, s) in enumerate(zip(ps, settings)):
            c = Collector()
            sched.submit(Sequence(p, s, on_event=c))
            got.append(c)
            if i % 3 == 0:
                time.sleep(0.01)  # arrivals while the others decode: prefills merge into the batch
        for c in got:
            assert c.done.wait(60)
        m = sched.metrics()
    finally:
        sched.close()
    assert [c.text for c in got] == alone
    assert all(c.reason == "length" for c in got)
    assert m["peak_active_sequences"] > 1 and m["generated_tokens"] == sum(s.max_new_tokens for s in settings)
    assert len(set(alone)) > 8  # the texts differ: the comparison can fail


def test_stop_string_and_stop_id_end_a_sequence(loaded):
    model, tok = loaded
    p = prompts(tok, 1)[0]
    free = run_alone(model, tok, p, Sampling(max_new_tokens=12))
    assert len(free.text) >= 4
    stop = free.text[2:4]
    cut = run_alone(model, tok, p, Sampling(max_new_tokens=12), Stops((stop,)))
    assert cut.reason == "stop" and cut.text == free.text[:free.text.index(stop)]
    third = free.seq.ids[2]
    by_id = run_alone(model, tok, p, Sampling(max_new_tokens=12), Stops(ids=(third,)))
    assert by_id.reason == "stop" and by_id.seq.ids == free.seq.ids[:free.seq.ids.index(third) + 1]
    assert by_id.text == tok.decode(by_id.seq.ids[:-1])


def test_cancel_frees_the_slot_and_the_others_go_on(loaded):
    model, tok = loaded
    p = prompts(tok, 2)
    want = run_alone(model, tok, p[1], Sampling(max_new_tokens=40)).text
    sched = Scheduler(model, tok, max_batch=4, max_len=256).start()
    try:
        long, other = Collector(), Collector()
        seq = Sequence(p[0], Sampling(max_new_tokens=200), on_event=long)
        sched.submit(seq)
        sched.submit(Sequence(p[1], Sampling(max_new_tokens=40), on_event=other))
        deadline = time.monotonic() + 30
        while len(seq.ids) < 3 and time.monotonic() < deadline:  # (bytes of a character may send no event)
            time.sleep(0.001)
        sched.cancel(seq)
        assert long.done.wait(10) and long.reason == "cancelled"
        assert len(seq.ids) < 200
        assert other.done.wait(60) and other.text == want
        deadline = time.monotonic() + 2  # the row leaves the batch right after its last event
        while sched.metrics()["active_sequences"] and time.monotonic() < deadline:
            time.sleep(0.001)
        assert sched.metrics()["active_sequences"] == 0
    finally:
        sched.close()


def test_a_full_queue_is_refused(loaded):
    model, tok = loaded
    sched = Scheduler(model, tok, max_batch=1, max_queue=2, max_len=256)  # not started: nothing leaves the queue
    p = prompts(tok, 1)[0]
    sched.submit(Sequence(p, Sampling(max_new_tokens=4)))
    sched.submit(Sequence(p, Sampling(max_new_tokens=4)))
    with pytest.raises(QueueFull):
        sched.submit(Sequence(p, Sampling(max_new_tokens=4)))
    c = Collector()
    sched._waiting[0].on_event = c
    sched.start().close()
    assert c.reason == "error"  # closing fails what still waits, it never hangs


def test_sinks_stream_past_the_context_as_generate_does(loaded):
    """truncate=sinks: a prompt longer than the cache and a reply past it, among other rows;
    greedy text equal to lmlab.infer.engine's generation with the same sinks alone."""
    from lmlab.infer.engine import generate_ids

    model, tok = loaded
    if model.max_context is None:
        pytest.skip("an unbounded family streams past any length without sinks")
    ctx = 48
    long = (prompts(tok, 1)[0] * 20)[:ctx + 30]
    # generate_ids sizes its sink cache to the model's context: shrink that to ctx meanwhile
    model_ctx = model.cfg.max_seq_len
    model.cfg.max_seq_len = ctx
    try:
        want = [s[0] for s in generate_ids(model, [long], max_new_tokens=60, sinks=4)]
        sched = Scheduler(model, tok, max_batch=4, max_len=ctx, sinks=4).start()
        c, other = Collector(), Collector()
        seq = Sequence(long, Sampling(max_new_tokens=60), ignore_eos=True, on_event=c)
        sched.submit(Sequence(prompts(tok, 3)[2], Sampling(max_new_tokens=30), ignore_eos=True, on_event=other))
        sched.submit(seq)
        assert c.done.wait(60) and other.done.wait(60)
        sched.close()
    finally:
        model.cfg.max_seq_len = model_ctx
    assert seq.ids == want[:len(seq.ids)] and len(seq.ids) == 60 and c.reason == "length"
