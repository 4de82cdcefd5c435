"""The outcome verifier: metrics against sklearn and hand-computed values, the BCE losses, the rendering
of a (problem, answer), the CLI end to end on a micro model, the Scorer API, the split by problem, exact
resume and bad input."""

from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch

from conftest import build_micro_pipeline
from lmlab.cli import main
from lmlab.train import verifier
from lmlab.train.scorer_losses import outcome_bce, token_bce
from lmlab.train.scorer_metrics import (accuracy, auroc, average_ranks, binary_metrics, brier, ece,
                                        reliability_table)

# ----------------------------------------------------------------------------- metrics

# 8 samples; bins (lo, hi] of width 0.1: 0.05 -> 0; 0.15, 0.15 -> 1; 0.5 -> 4; 0.55 -> 5; 0.65 -> 6; 0.95, 1.0 -> 9
P = [0.05, 0.15, 0.15, 0.55, 0.65, 0.95, 1.0, 0.5]
Y = [0, 0, 1, 1, 0, 1, 1, 0]


def test_metrics_equal_hand_computed_values():
    # predictions p >= 0.5: 0 0 0 1 1 1 1 1 against 0 0 1 1 0 1 1 0 -> 5 of 8 right
    assert accuracy(P, Y) == pytest.approx(0.625)
    # Brier: (.0025 + .0225 + .7225 + .2025 + .4225 + .0025 + 0 + .25) / 8
    assert brier(P, Y) == pytest.approx(1.625 / 8)
    # ECE: bin 0 |.05 - 0|·1, bin 1 |.15 - .5|·2, bin 4 |.5 - 0|·1, bin 5 |.55 - 1|·1, bin 6 |.65 - 0|·1,
    # bin 9 |.975 - 1|·2; / 8
    assert ece(P, Y) == pytest.approx((0.05 + 0.7 + 0.5 + 0.45 + 0.65 + 0.05) / 8)
    # AUROC: positives .15 .55 .95 1.0 against negatives .05 .15 .65 .5: 1.5 + 3 + 4 + 4 of 16 (the tie counts half)
    assert auroc(P, Y) == pytest.approx(12.5 / 16)
    table = reliability_table(P, Y)
    assert [r["count"] for r in table] == [1, 2, 0, 0, 1, 1, 1, 0, 0, 2]
    assert table[9]["confidence"] == pytest.approx(0.975) and table[1]["accuracy"] == 0.5
    assert table[2]["confidence"] is None and table[9]["hi"] == 1.0 and table[0]["lo"] == 0.0
    m = binary_metrics(P, Y)
    assert m["n"] == 8 and m["base_rate"] == 0.5 and m["auroc"] == pytest.approx(0.78125)
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert auroc([0.2, 0.9], [1, 1]) is None and binary_metrics([0.3], [0])["auroc"] is None


def test_auroc_and_calibration_bins_equal_sklearn():
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install scikit-learn)")
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    cases = [(P, Y), ([0.5] * 6, [0, 1, 0, 1, 1, 0]), ([0.1, 0.3, 0.3, 0.3, 0.7, 0.7], [0, 1, 0, 1, 1, 0])]
    for n in (10, 57, 400):  # probabilities rounded to 1 or 2 decimals: many ties, many at bin edges
        y = rng.integers(0, 2, n)
        p = np.round(np.clip(0.35 * y + rng.uniform(0, 0.65, n), 0, 1), 1 if n == 57 else 2)
        cases.append((p, y))
    for p, y in cases:
        assert auroc(p, y) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        frac_pos, mean_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
        filled = [r for r in reliability_table(p, y) if r["count"]]
        assert np.allclose([r["accuracy"] for r in filled], frac_pos)
        assert np.allclose([r["confidence"] for r in filled], mean_pred)


# ----------------------------------------------------------------------------- losses

def test_bce_outcome_and_token_level_hand_computed():
    ln2, ln43 = math.log(2), math.log(4 / 3)
    # bce(0, 1) = ln 2; bce(ln 3, 0) = -log(1 - 0.75) = ln 4
    logits, labels = torch.tensor([0.0, math.log(3)]), torch.tensor([1.0, 0.0])
    assert torch.allclose(outcome_bce(logits, labels), torch.tensor([ln2, math.log(4)]))
    assert torch.allclose(outcome_bce(logits, labels, torch.tensor([2.0, 0.5])), torch.tensor([2 * ln2, math.log(2)]))
    # token level: every masked position is trained towards its row's label; off the mask 0
    scores = torch.tensor([[9.0, 0.0, math.log(3), 5.0], [0.0, -math.log(3), 7.0, 7.0]])
    mask = torch.tensor([[False, True, True, False], [False, True, True, True]])
    losses = token_bce(scores, labels, mask)
    softplus7 = 7 + math.log1p(math.exp(-7))  # bce(7, 0)
    expected = torch.tensor([[0, ln2, ln43, 0], [0, ln43, softplus7, softplus7]])
    assert torch.allclose(losses, expected, atol=1e-6)
    # the batch loss: the mean over the 5 solution tokens
    assert (losses.sum() / mask.sum()).item() == pytest.approx((ln2 + 2 * ln43 + 2 * softplus7) / 5, rel=1e-6)
    weighted = token_bce(scores, labels, mask, torch.tensor([1.0, 3.0]))
    assert torch.allclose(weighted[1], 3 * expected[1], atol=1e-5) and torch.allclose(weighted[0], expected[0])


# ----------------------------------------------------------------------------- on a micro model

def _answer(a: int, b: int, off: int = 0) -> str:
    return f"{a} + {b} = {a + b + off}\n#### {a + b + off}"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro chat model, a samples.jsonl of 24 problems x 4 samples (half right, the wrong ones mostly a
    refusal a micro model learns to spot in a few steps) and 8 synthetic preference pairs."""
    from lmlab.data.chat import save_chat_template

    root = tmp_path_factory.mktemp("verifier")
    p = build_micro_pipeline(root, steps=8)
    save_chat_template(p["model"], "chatml")
    rng = random.Random(0)
    rows, questions = [], []
    for i in range(24):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        q = f"What is {a} plus {b}?"
        questions.append(q)
        for k in range(4):
            ok = k % 2 == 0
            comp = _answer(a, b) if ok else ("I do not know." if k == 1 else _answer(a, b, 1))
            rows.append({"problem": i, "question": q, "solution": _answer(a, b), "task": "arithmetic",
                         "difficulty": 1, "k": k, "completion": comp, "answer": str(a + b) if ok else None,
                         "reference": str(a + b), "correct": ok})
    sdir = root / "samples"
    sdir.mkdir()
    (sdir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"prompt": questions[i], "chosen": rows[4 * i]["completion"], "rejected": "I do not know."}
             for i in range(0, 24, 3)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return {**p, "samples": sdir, "pairs": root / "pairs.jsonl", "rows": rows}


def _args(micro, out, *extra):
    return ["verifier", f"init={micro['model']}", f"data={micro['samples']}", f"synthetic={micro['pairs']}",
            f"out={out}", "train.steps=12", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=0",
            "train.device=cpu", "eval.every=6", "eval.batches=2", "log.every=3", "checkpoint.every=0",
            "val_fraction=0.25", *extra]


@pytest.fixture(scope="module")
def trained(micro, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "verifier"
    assert main(_args(micro, out)) == 0
    return out


def test_cli_writes_the_scorer_dir_metrics_and_plots(micro, trained, capsys):
    from lmlab.data.tokenizer import Tokenizer

    for f in ("model.safetensors", "model.json", "head.safetensors", "scorer.json", "tokenizer", "metrics.jsonl",
              "manifest.json", verifier.RELIABILITY_PNG, verifier.VAL_SCORES):
        assert (trained / f).exists(), f
    assert (trained / verifier.RELIABILITY_PNG).read_bytes()[:4] == b"\x89PNG"
    m = json.loads((trained / "manifest.json").read_text())
    st = m["stats"]
    assert m["kind"] == "verifier" and m["verb"] == "verifier" and m["config"]["template"] == "chatml"
    sha = Tokenizer.load(micro["model"] / "tokenizer").sha256
    assert m["tokenizer_sha256"] == sha
    meta = json.loads((trained / "scorer.json").read_text())
    assert meta["kind"] == "verifier" and meta["level"] == "outcome" and meta["tokenizer_sha256"] == sha
    assert meta["template"] == "chatml" and meta["max_len"] == 64 and meta["score"] == "probability"
    fm = st["final_val_metrics"]
    assert fm["n"] == st["examples_val"] > 0 and 0 < fm["base_rate"] < 1
    for k in ("val_accuracy", "val_auroc", "val_ece", "val_brier"):
        assert 0 <= fm[k] <= 1, (k, fm)
    assert fm["val_loss"] > 0 and fm["val_auroc"] > 0.5  # a refusal is easy to spot
    assert sum(r["count"] for r in st["reliability"]) == fm["n"] and len(st["reliability"]) == 10
    assert st["samples_read"] == 96 and st["synthetic_pairs_read"] == 8 and st["examples_read"] == 112
    assert st["examples_train"] + st["examples_val"] + st["synthetic_dropped_val_problems"] == 112
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    val_lines = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in val_lines] == [6, 12] and set(verifier.VAL_METRICS) <= set(val_lines[-1])
    assert all("accuracy" in r for r in lines if "loss" in r)
    scores = [json.loads(x) for x in (trained / verifier.VAL_SCORES).read_text().splitlines()]
    assert len(scores) == fm["n"] and set(scores[0]) == {"source", "problem", "k", "task", "score", "correct"}
    assert all(0 <= r["score"] <= 1 for r in scores)
    capsys.readouterr()
    assert main(_args(micro, trained)) == 0
    assert "up to date" in capsys.readouterr().out


def test_val_split_never_shares_a_problem(micro, trained):
    from lmlab.models import load_model

    scores = [json.loads(x) for x in (trained / verifier.VAL_SCORES).read_text().splitlines()]
    val_problems = {r["problem"] for r in scores}
    assert all(r["source"] == str(micro["samples"]) for r in scores)  # validation: the model samples
    # every sample of a held-out problem is held out, and no other
    assert len(scores) == 4 * len(val_problems)

    model, tok, _ = load_model(micro["model"])
    samples = [verifier.read_samples(verifier.SamplesSpec(path=str(micro["samples"])))]
    from lmlab.data.formats import read_preferences

    where: list[str] = []
    syn = [read_preferences(verifier.DataSpec(path=str(micro["pairs"]), format="preference"), locations=where)]
    ex, _ = verifier.tokenize_examples(samples, syn, [where], "chatml", tok, 64, "left")
    eligible = np.asarray(ex.source) == 0
    for seed in (0, 1, 2):
        train, val, dropped = verifier.split_by_problem(ex, eligible, 0.25, seed)
        train_keys, val_keys = {ex.key[i] for i in train}, {ex.key[i] for i in val}
        assert not train_keys & val_keys and len(val_keys) == 6  # ceil(0.25 x 24)
        assert eligible[val].all() and len(train) + len(val) + dropped == len(ex)


def test_scorer_api_batched_equals_one_by_one_and_the_forward(micro, trained):
    from lmlab.errors import UserError
    from lmlab.infer.scorer import RewardModel, Scorer, Verifier

    v = Verifier.load(trained)
    assert v.kind == "verifier" and v.template == "chatml" and v.max_len == 64 and v.level == "outcome"
    assert v.path == str(trained) and v.tokenizer_sha256 == v.tokenizer.sha256
    q, good, bad = "What is 3 plus 4?", _answer(3, 4), "I do not know."
    s = v.score(q, good)
    assert isinstance(s, float) and 0 <= s <= 1
    qs = [r["question"] for r in micro["rows"][:12]]
    answers = [r["completion"] for r in micro["rows"][:12]]
    batched = v.score(qs, answers, batch_size=5)
    assert isinstance(batched, list) and len(batched) == 12
    assert np.allclose(batched, [v.score(a, b) for a, b in zip(qs, answers)], atol=1e-5)
    # the score is σ(the scorer's own forward) at the last token: the reply's end-of-turn marker
    enc = v.encode(q, bad)
    assert enc.ids[-1] == v.tokenizer.special_tokens["<|im_end|>"] and enc.ids[0] == v.tokenizer.bos_id
    assert v.tokenizer.decode(enc.ids[enc.start:-1]) == bad
    with torch.no_grad():
        z = v.model(torch.tensor([enc.ids]))[0, -1]
    assert v.score(q, bad) == pytest.approx(torch.sigmoid(z).item(), abs=1e-6)
    assert np.mean([v.score(r["question"], r["completion"]) for r in micro["rows"] if r["correct"]]) > \
        np.mean([v.score(r["question"], r["completion"]) for r in micro["rows"] if not r["correct"]])
    # too long: bos and the end are kept, scoring never fails
    long = v.encode("word " * 200, good)
    assert len(long.ids) == 64 and long.ids[0] == v.tokenizer.bos_id and long.ids[-8:] == v.encode(q, good).ids[-8:]
    assert 0 <= v.score("word " * 200, "step " * 200) <= 1
    # a conversation ending with a user turn is a problem too
    assert v.score([{"role": "user", "content": q}], good) == pytest.approx(s)
    assert Scorer.load(trained).score(q, good) == pytest.approx(s)
    with pytest.raises(UserError, match="not a reward"):
        RewardModel.load(trained)
    v.check_tokenizer(v.tokenizer_sha256)
    with pytest.raises(UserError, match="tokenizer"):
        v.check_tokenizer("0" * 64)
    with pytest.raises(ValueError):
        v.score([q, q], [good])
    with pytest.raises(UserError, match="scorer.json"):
        Verifier.load(micro["model"])  # a model run dir is not a scorer


def test_token_level_balance_and_exact_resume(micro, tmp_path):
    from safetensors.torch import load_file

    from lmlab.infer.scorer import Verifier

    # one correct and two wrong samples per problem, no synthetic pairs: a third of the mixture is correct
    skewed = tmp_path / "skewed.jsonl"
    skewed.write_text("".join(json.dumps(r) + "\n" for r in micro["rows"] if r["k"] != 2))
    extra = (f"data={skewed}", "synthetic=[]", "level=token", "balance=true", "train.steps=4", "checkpoint.every=2",
             "eval.every=0")
    a = tmp_path / "a"
    assert main(_args(micro, a, *extra)) == 0
    m = json.loads((a / "manifest.json").read_text())
    assert m["stats"]["level"] == "token" and json.loads((a / "scorer.json").read_text())["level"] == "token"
    assert m["stats"]["train_positive_share"] == pytest.approx(1 / 3)
    # each class weighs 1 / (2 x its share): correct 1.5, wrong 0.75, so both carry half the loss
    assert m["stats"]["class_weights"] == pytest.approx({"correct": 1.5, "wrong": 0.75})
    assert 0 <= Verifier.load(a).score("What is 1 plus 2?", _answer(1, 2)) <= 1

    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_000004")          # as if killed during step 3 or 4
    for f in ("manifest.json", "model.safetensors", "head.safetensors", "scorer.json", verifier.VAL_SCORES):
        (b / f).unlink()
    assert main(_args(micro, b, *extra)) == 0
    for f in ("model.safetensors", "head.safetensors"):
        wa, wb = load_file(a / f), load_file(b / f)
        assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa), f
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for d in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 2  # log.every=3: steps 3 and 4


def test_bad_input_exits_2_and_writes_nothing(micro, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["verifier", f"init={micro['model']}", f"out={out}", "train.steps=1", "train.device=cpu"]

    def fails(*args) -> str:
        capsys.readouterr()
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and not out.exists()
        return err

    assert "no verifier data" in fails()
    rows = micro["rows"]
    missing = tmp_path / "missing.jsonl"
    broken = dict(rows[2])
    del broken["correct"]
    missing.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], rows[1], broken]))
    err = fails(f"data={missing}")
    assert f"{missing}:3" in err and "'correct'" in err
    one = tmp_path / "one_label.jsonl"
    one.write_text("".join(json.dumps(r) + "\n" for r in rows if r["correct"]))
    err = fails(f"data={one}")
    assert "both correct and wrong" in err and "synthetic" in err
    assert "samples.jsonl" in fails(f"data={tmp_path}")  # a directory without samples.jsonl
    err = fails(f"data={micro['samples']}", f"init={micro['packed']}")
    assert "'packed' artifact" in err
    assert "max_seq_len" in fails(f"data={micro['samples']}", "max_len=1000")
