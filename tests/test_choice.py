"""Multiple choice by log-likelihood: format detection, errors with file:line, acc / acc_norm vs direct sums."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmlab.errors import UserError
from lmlab.eval import choice

from conftest import build_micro_pipeline

ARC = [
    {"id": "a1", "question": "Which gas do plants take in?", "choices": {"text": ["oxygen", "carbon dioxide", "argon"],
     "label": ["A", "B", "C"]}, "answerKey": "B"},
    {"id": "a2", "question": "What is 2 + 2?", "choices": {"text": ["4", "five", "22", "zero"],
     "label": ["1", "2", "3", "4"]}, "answerKey": "1"},
    {"id": "a3", "question": "Return the list?", "choices": {"text": ["def", "return", "import"],
     "label": ["A", "B", "C"]}, "answerKey": "C"},
]
BOOLQ = [
    {"question": "is the sky blue", "passage": "The sky is blue on clear days.", "answer": True},
    {"question": "does the function return none", "passage": "Return the value of x.", "answer": False},
]


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_formats_are_detected(tmp_path):
    fmt, items = choice.read_choice_file(_write(tmp_path / "arc.jsonl", ARC))
    assert fmt == "arc" and [it["gold"] for it in items] == [1, 0, 2]
    assert items[0]["context"] == "Question: Which gas do plants take in?\nAnswer:"
    fmt, items = choice.read_choice_file(_write(tmp_path / "boolq.jsonl", BOOLQ))
    assert fmt == "boolq" and [it["gold"] for it in items] == [1, 0] and items[0]["choices"] == ["no", "yes"]
    assert items[0]["context"] == "The sky is blue on clear days.\nQuestion: is the sky blue?\nAnswer:"
    assert len(choice.read_choice_file(tmp_path / "arc.jsonl", n=2)[1]) == 2


def test_bad_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    _write(bad, [ARC[0], {**ARC[1], "answerKey": "Z"}])
    with pytest.raises(UserError, match=r"bad.jsonl:2: not a valid arc record"):
        choice.read_choice_file(bad)
    bad.write_text(json.dumps(ARC[0]) + "\n{oops\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        choice.read_choice_file(bad)
    _write(bad, [{"question": "q", "answer": "x"}])
    with pytest.raises(UserError, match=r"bad.jsonl:1: neither BoolQ-style"):
        choice.read_choice_file(bad)
    with pytest.raises(UserError, match="not found"):
        choice.read_choice_file(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from lmlab.models import load_model

    p = build_micro_pipeline(tmp_path_factory.mktemp("choice"), steps=4)
    model, tok, _ = load_model(p["model"])
    return model.eval(), tok, p["model"]


def _direct_loglik(model, tok, context, cont):
    """Score one sequence alone, token by token, without batching or padding."""
    ctx = [tok.bos_id] + tok.encode(context)
    whole = tok.encode(context + cont)
    cont_ids = whole[len(tok.encode(context)):]
    seq = torch.tensor([ctx + cont_ids])
    with torch.no_grad():
        logits, _ = model(seq[:, :-1])
    lp = torch.log_softmax(logits.float(), -1)[0]
    return sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont_ids))


def test_acc_and_acc_norm_equal_direct_computation(micro, tmp_path):
    model, tok, _ = micro
    for recs in (ARC, BOOLQ):
        _, items = choice.read_choice_file(_write(tmp_path / "f.jsonl", recs))
        res = choice.score_choices(model, tok, items, batch_size=3)
        acc = acc_norm = 0
        for it in items:
            ll = [_direct_loglik(model, tok, it["context"], " " + c) for c in it["choices"]]
            norm = [v / len(c) for v, c in zip(ll, it["choices"])]
            acc += max(range(len(ll)), key=ll.__getitem__) == it["gold"]
            acc_norm += max(range(len(ll)), key=norm.__getitem__) == it["gold"]
        assert res["acc"] == acc / len(items) and res["acc_norm"] == acc_norm / len(items)
        for rec, it in zip(res["records"], items):
            direct = [_direct_loglik(model, tok, it["context"], " " + c) for c in it["choices"]]
            assert rec["loglik"] == pytest.approx(direct, abs=1e-4)
            assert all(v < 0 and math.isfinite(v) for v in rec["loglik"])


def test_known_answer_from_one_next_token_distribution(micro):
    # Choices that are single tokens after the context: their log-likelihoods are entries of ONE
    # next-token distribution, so the right answer is the argmax of that distribution's entries.
    model, tok, _ = micro
    ctx = "The os module provides"
    ctx_ids = tok.encode(ctx)
    cands = []
    for i in range(tok.vocab_size):
        piece = tok.decode([i])
        if len(piece) >= 2 and piece.startswith(" ") and piece[1:].isalpha() and tok.encode(ctx + piece)[len(ctx_ids):] == [i]:
            cands.append((i, piece[1:]))
        if len(cands) == 6:
            break
    assert len(cands) >= 2
    with torch.no_grad():
        logits, _ = model(torch.tensor([[tok.bos_id] + ctx_ids]))
    lp = torch.log_softmax(logits[0, -1].float(), -1)
    best = max(range(len(cands)), key=lambda j: lp[cands[j][0]].item())
    best_norm = max(range(len(cands)), key=lambda j: lp[cands[j][0]].item() / len(cands[j][1]))
    items = [{"context": ctx, "choices": [c for _, c in cands], "gold": g} for g in (best, best_norm)]
    res = choice.score_choices(model, tok, items, batch_size=4)
    assert res["records"][0]["loglik"] == pytest.approx([lp[i].item() for i, _ in cands], abs=1e-4)
    assert res["acc"] == (1.0 if best == best_norm else 0.5)
    assert res["acc_norm"] == (1.0 if best == best_norm else 0.5)
    assert res["records"][0]["correct"] and res["records"][0]["completion"] == cands[best][1]


def test_eval_stage_choice_section(micro, tmp_path):
    from lmlab.eval import evaluate

    _, _, model_dir = micro
    arc, boolq = _write(tmp_path / "arc.jsonl", ARC), _write(tmp_path / "boolq.jsonl", BOOLQ)
    out = evaluate.run(evaluate.Config(model=str(model_dir), out=str(tmp_path / "eval"), packed_default=False,
                                       max_new_tokens=0, choice=[str(arc), str(boolq)], device="cpu"))
    res = json.loads((out / "eval.json").read_text())
    assert [(c["name"], c["format"], c["n"]) for c in res["choice"]] == [
        (f"{tmp_path.name}_arc", "arc", 3), (f"{tmp_path.name}_boolq", "boolq", 2)]
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats[f"{tmp_path.name}_arc_acc"] == res["choice"][0]["acc"]
    kinds = [json.loads(x)["kind"] for x in (out / "samples.jsonl").read_text().splitlines()]
    assert kinds == ["choice"] * 5
