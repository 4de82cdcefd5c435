"""lmlab.infer.prompting and sampling: stop truncation, the streaming stop detector, template
resolution, and that every verb that generates prompts and stops the same way."""

from __future__ import annotations

import io
import json
import random
from types import SimpleNamespace

import pytest
import torch

from lmlab.data.chat import TEMPLATES, prompt_ids
from lmlab.errors import UserError
from lmlab.infer.prompting import (Detokenizer, StopStream, Stops, chat_stops, question_prompt, resolve_template,
                                   stop_checker, truncate_at_stop)
from lmlab.infer.sampling import Sampling

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A real sentencepiece tokenizer (byte fallback, lmlab's special tokens), trained in seconds."""
    from lmlab.data import corpus, tokenizer
    from lmlab.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("prompting")
    c = corpus.run(corpus.Config(out=str(root / "corpus"), sources=[{"kind": "stdlib", "max_docs": 40}]))
    t = tokenizer.run(tokenizer.Config(corpus=str(c), out=str(root / "tokenizer"), vocab_size=400, threads=1))
    return Tokenizer.load(t)


class Bytes:
    """A byte-level tokenizer: id = byte, so any character may arrive split over several ids."""
    special_tokens: dict = {}

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def encode(self, text):
        return list(text.encode("utf-8"))


def _stream(stops, pieces):
    """(what push showed after each piece, what finish showed, the stream)."""
    s = StopStream(stops)
    shown = [s.push(p) for p in pieces]
    return shown, s.finish(), s


# ----------------------------------------------------------------------------- truncation

@pytest.mark.parametrize("text, stops, expected", [
    ("STOPabc", ["STOP"], ("", True)),                                  # at the start
    ("abcSTOPdef", ["STOP"], ("abc", True)),                           # in the middle
    ("abcSTOP", ["STOP"], ("abc", True)),                              # at the end
    ("a\n\nb Question: c", ["Question:", "\n\n"], ("a", True)),        # several: the earliest wins
    ("a Question: b\n\nc", ["\n\n", "Question:"], ("a ", True)),       # whatever their order in the list
    ("xabcd", ["bc", "abcd"], ("x", True)),                            # overlapping: earliest start
    ("abc", ["X", "Y"], ("abc", False)),                               # none
    ("abc", [], ("abc", False)),
    ("abc", [""], ("abc", False)),                                     # an empty stop matches nothing
])
def test_truncate_at_stop(text, stops, expected):
    assert truncate_at_stop(text, stops) == expected


# ----------------------------------------------------------------------------- streaming

def test_a_stop_split_across_chunks_is_never_shown():
    shown, rest, s = _stream([IM_END], ["Hello", " wor", "ld<|im", "_e", "nd|>", "after", " more"])
    assert "".join(shown) + rest == "Hello world" == s.text and s.stopped
    assert not any("<" in x for x in shown + [rest])          # not even the stop's first character
    assert shown[:3] == ["Hello", " wor", "ld"]               # text before a possible stop is not held


def test_a_false_prefix_is_released_later():
    shown, rest, s = _stream(["\n\nQuestion:"], ["a\n", "\nQ", "uick", " fox"])
    assert shown == ["a", "", "\n\nQuick", " fox"] and rest == "" and not s.stopped
    # held to the end, a possible prefix comes out at finish()
    shown, rest, s = _stream([IM_END], ["abc<|im"])
    assert shown == ["abc"] and rest == "<|im" and s.text == "abc<|im" and not s.stopped


def test_text_after_the_stop_is_dropped():
    shown, rest, s = _stream([IM_END], ["abc<|im_end|>tail", "more"])
    assert shown == ["abc", ""] and rest == "" and s.text == "abc" and s.stopped


def test_streaming_earliest_stop_wins_over_a_held_prefix():
    # "X" might start "XY"; then "Z" (another stop) arrives: the held "X" is text before the stop
    shown, rest, s = _stream(["XY", "Z"], ["aX", "Zb"])
    assert shown == ["a", "X"] and s.text == "aX" and s.stopped


def test_a_stop_completed_first_wins_over_one_that_would_start_earlier():
    # as decoding does: generation ends at the first stop to complete ("\n" here) ...
    shown, rest, s = _stream(["b\n\n", "\n"], ["ab", "\n", "\n"])
    assert "".join(shown) + rest == "ab" == s.text
    # ... and within one piece the earliest start wins, as truncate_at_stop does
    assert _stream(["b\n\n", "\n"], ["ab\n\n"])[2].text == "a" == truncate_at_stop("ab\n\n", ["b\n\n", "\n"])[0]


def _checked_after_every_piece(pieces, stops):
    """The reference rule: truncate the text so far after each piece; the first hit ends it."""
    text = ""
    for p in pieces:
        text += p
        cut, hit = truncate_at_stop(text, stops)
        if hit:
            return cut, True
    return text, False


def test_streaming_equals_truncating_after_every_piece():
    """Any text in any chunks: what is shown is what truncating after every piece gives (the
    whole text's truncation when no stop ends inside another), and is shown in order (what has
    been shown is always a prefix of the final text)."""
    rng = random.Random(0)
    for _ in range(2000):
        stops = ["".join(rng.choice("ab\n") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc\n") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        want = _checked_after_every_piece(pieces, stops)
        s = StopStream(stops)
        shown = ""
        for p in pieces:
            shown += s.push(p)
            assert want[0].startswith(shown)
        shown += s.finish()
        assert (shown, s.stopped) == want and s.text == shown, (text, stops, pieces)
        if not any(a != b and b in a for a in stops for b in stops):
            assert want == truncate_at_stop(text, stops)


def test_detokenizer_waits_for_whole_characters():
    d = Detokenizer(Bytes())
    assert [d.push(b) for b in "é".encode()] == ["", "é"]
    assert [d.push(b) for b in "a€".encode()] == ["a", "", "", "€"]
    assert d.push(0xF0) == "" and d.pending == "\ufffd" and d.flush() == "\ufffd"   # cut mid-character


@pytest.mark.parametrize("which", ["bytes", "sentencepiece"])
def test_detokenizer_pieces_join_to_the_whole_decode(which, tok):
    """Random ids (byte-fallback pieces, broken UTF-8, special tokens): the pieces are decode(all ids)."""
    t = Bytes() if which == "bytes" else tok
    vocab = 256 if which == "bytes" else tok.vocab_size
    rng = random.Random(1)
    texts = ["héllo wörld € 😀", "<|im_end|>\n<|im_start|>user", "def f(x):\n    return x"]
    for n in range(300):
        ids = t.encode(rng.choice(texts)) if n % 3 == 0 else [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
        d = Detokenizer(t)
        assert "".join(d.push(i) for i in ids) + d.flush() == t.decode(ids), ids


def test_stream_of_tokens_equals_truncating_their_decode(tok):
    stops = ["### Instruction:", "\n\n", IM_END]
    rng = random.Random(2)
    words = ["It is 4.", "\n", "### Instr", "uction:", "\n\n", " é€", IM_END, "ok"]
    for _ in range(200):
        ids = [i for _ in range(rng.randint(1, 6)) for i in tok.encode(rng.choice(words))]
        s = StopStream(stops, tok)
        shown = "".join(s.push_token(i) for i in ids) + s.finish()
        # the reference: decode everything after every token, as the engine used to
        hit = next((truncate_at_stop(tok.decode(ids[:n]), stops) for n in range(1, len(ids) + 1)
                    if truncate_at_stop(tok.decode(ids[:n]), stops)[1]), (tok.decode(ids), False))
        assert (shown, s.stopped) == hit, ids


def test_stop_checker_stops_on_the_token_that_completes_a_stop(tok):
    ids = tok.encode("It is 4.\n### Instruction:\nnext")
    decoded = [tok.decode(ids[:n]) for n in range(1, len(ids) + 1)]
    first = next(n for n, text in enumerate(decoded) if "### Instruction:" in text)
    check = stop_checker(tok, Stops(("### Instruction:",)), rows=2)
    hits = [check(1, ids[:n + 1]) for n in range(first + 1)]
    assert hits == [False] * first + [True]
    # a stop id ends the row at once; rows are independent; nothing to stop at -> no checker
    check = stop_checker(tok, Stops(ids=(tok.special_tokens[IM_END],)), rows=1)
    assert check(0, [5, 6]) is False and check(0, [5, tok.special_tokens[IM_END]]) is True
    assert stop_checker(tok, Stops(), rows=1) is None


def test_stops_and_sampling_settings():
    assert Stops(["a", "", "b"], [3]) == Stops(("a", "b"), (3,))
    cfg = SimpleNamespace(temperature=0.7, top_p=0.9, max_new_tokens=12, seed=3, unrelated=1)
    assert Sampling.of(cfg) == Sampling(max_new_tokens=12, temperature=0.7, top_k=0, top_p=0.9, seed=3)
    assert Sampling.of(cfg, seed=5).seed == 5
    with pytest.raises(Exception):
        Sampling(top_p=0.0)


# ----------------------------------------------------------------------------- templates

def test_resolve_template(tmp_path, tok):
    run = tmp_path / "sft"
    run.mkdir()
    assert resolve_template(run) == "chatml"                   # no chat.json: the default
    assert resolve_template(run, default=None) is None
    (run / "chat.json").write_text(json.dumps({"template": "instruct"}))
    assert resolve_template(run, tok) == "instruct"            # the run's chat.json
    assert resolve_template(run, tok, template="chat") == "chat"  # an explicit name wins
    with pytest.raises(UserError, match="unknown chat template 'vicuna'; valid: chatml, instruct, chat, alpaca"):
        resolve_template(run, template="vicuna")
    plain = SimpleNamespace(special_tokens={"<|bos|>": 1, "<|eos|>": 2}, path="plain")
    with pytest.raises(UserError, match="needs special token"):
        resolve_template(None, plain, template="chatml")     # the tokenizer lacks <|im_start|>
    (run / "chat.json").write_text(json.dumps({"template": "nope"}))
    with pytest.raises(UserError, match="unknown chat template"):
        resolve_template(run)


@pytest.mark.parametrize("template", TEMPLATES)
def test_chat_stops_are_the_templates_end_of_turn_and_user_stops(template, tok):
    from lmlab.data.chat import end_of_turn_ids, stop_strings

    s = chat_stops(template, tok, extra=["\n\n"])
    assert s.strings == tuple(stop_strings(template)) + ("\n\n",)
    assert s.ids == tuple(end_of_turn_ids(template, tok))


# ----------------------------------------------------------------------------- callers agree

@pytest.mark.parametrize("template", TEMPLATES)
def test_eval_pairs_and_sft_prompt_a_question_identically(template, tok):
    from lmlab.eval.generative import build_prompt
    from lmlab.tasks import pairs
    from lmlab.tasks.problems import problem_stops

    problem = {"question": "Tom has 3 apples and buys 2 more. How many apples has he?", "answer": "#### 5"}
    want = prompt_ids(template, [{"role": "user", "content": problem["question"]}], tok)
    eval_ids, text, shots = build_prompt(tok, problem, template, [], 0, 1000)   # lmlab eval, zero-shot chat
    assert eval_ids == want and shots == 0 and text == tok.decode(want)
    assert pairs.problem_prompts(tok, [problem], template, 1000) == [want]     # lmlab pairs
    assert question_prompt(template, problem["question"], tok, max_len=1000) == want  # SFT's samples
    assert problem_stops(template, tok) == chat_stops(template, tok)
    # few-shot examples become earlier exchanges, the same in eval and question_prompt
    shot = {"question": "1+1?", "answer": "#### 2"}
    assert build_prompt(tok, problem, template, [shot], 1, 1000)[0] == \
        question_prompt(template, problem["question"], tok, [(shot["question"], shot["answer"])])


class Scripted(torch.nn.Module):
    """Speaks the engine's model protocol and emits `script` whatever the prompt; counts its forwards."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the engine reads the device from a parameter
        self.script, self.vocab, self.forwards = script, vocab, 0
        self.cfg = SimpleNamespace(max_seq_len=512)

    def new_cache(self, batch, max_len, device=None, dtype=None, left_pad=None):
        return SimpleNamespace(pos=0, batch=batch, max_len=max_len, select=lambda rows: None)

    def forward(self, idx, cache=None, last_only=False, **kw):
        t = self.script[min(cache.pos, len(self.script) - 1)]
        cache.pos += 1
        self.forwards += 1
        logits = torch.full((idx.shape[0], 1, self.vocab), -1e9)
        logits[:, :, t] = 0.0
        return logits, None


@pytest.mark.parametrize("template", ["chatml", "instruct"])
def test_every_verb_stops_a_reply_in_the_same_place(template, tok):
    """chat (streaming), eval, pairs, SFT samples and generate cut the same scripted reply at the
    same point: the end-of-turn id (chatml) or a stop string spanning tokens (instruct)."""
    from lmlab.eval.generative import score_generative
    from lmlab.infer import chat
    from lmlab.infer.engine import complete, generate
    from lmlab.tasks import pairs

    reply = "It is 4.\n"
    stop = IM_END if template == "chatml" else "### Instruction:"
    script = tok.encode(reply + stop + "\nmore")
    stop_at = next(n for n in range(len(script) + 1) if stop in tok.decode(script[:n]))  # tokens up to the stop
    problem = {"question": "2+2?", "answer": "#### 4"}

    model = Scripted(script, tok.vocab_size)
    res = score_generative(model, tok, [problem], template=template, n_samples=0, max_new_tokens=40)
    assert res["records"][0]["completion"] == reply and model.forwards <= stop_at   # stopped, not run to 40

    cfg = pairs.Config(model="m", problems="p", n_samples=2, max_new_tokens=40)
    assert pairs.sample(Scripted(script, tok.vocab_size), tok, [problem], template, cfg, "cpu") == [[reply, reply]]

    model, out = Scripted(script, tok.vocab_size), io.StringIO()
    ids = question_prompt(template, problem["question"], tok)
    got = chat.stream_reply(model, tok, ids, template, chat.Config(model="m", temperature=0, max_new_tokens=40), 0,
                            "cpu", out=out)
    assert got == reply.strip() and out.getvalue() == reply + "\n" and model.forwards <= stop_at

    if template == "chatml":  # SFT's samples end at the template's end-of-turn ids (only)
        stops = Stops(ids=chat_stops(template, tok).ids)
        assert complete(Scripted(script, tok.vocab_size), tok, [ids], Sampling(max_new_tokens=40), stops) == [reply]

    model = Scripted(script, tok.vocab_size)    # `lmlab generate` with the stop as a stop string
    assert generate(model, tok, ["2+2?"], max_new_tokens=40, stop=[stop]) == [reply] and model.forwards <= stop_at
