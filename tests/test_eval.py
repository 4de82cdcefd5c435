"""Evaluation: lm-eval rolling windows, perplexity formulas, the unigram baseline, the eval stage.

The stage tests build a real (tiny) pipeline in a temp dir: corpus -> tokenizer -> pack with
the real stages, plus a randomly initialised micro model saved with lmlab.models.save_model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmlab.eval import perplexity
from lmlab.eval.baseline import unigram_cross_entropy

from conftest import SHARED_DATA, build_micro_pipeline

WIKITEXT = SHARED_DATA / "wikitext-2" / "valid.txt"


# ------------------------------------------------------------------ rolling windows

def test_rolling_windows_hand_checked_example():
    # tokens 1..10, prefix 0, max_seq_len 4 (lm-eval get_rolling_token_windows, context_len=1,
    # then make_disjoint_window), worked out by hand:
    w = perplexity.rolling_windows(list(range(1, 11)), prefix_token=0, max_seq_len=4)
    assert w == [
        ([0], [1, 2, 3, 4]),        # first window: the prefix predicts token 1
        ([4], [5, 6, 7, 8]),        # full window: one token of carried context
        ([6, 7, 8], [9, 10]),       # last window topped up to 4 inputs with earlier context
    ]
    x, y = perplexity.window_batch(w, pad_id=99)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [-100, -100, 9, 10]]


@pytest.mark.parametrize("n,max_len", [(1, 1), (1, 5), (5, 5), (6, 5), (17, 4), (100, 7), (64, 16)])
def test_rolling_windows_cover_every_token_once(n, max_len):
    tokens = list(range(1000, 1000 + n))
    windows = perplexity.rolling_windows(tokens, prefix_token=7, max_seq_len=max_len)
    predicted = [t for _, cont in windows for t in cont]
    assert predicted == tokens  # every token exactly once, in order
    assert windows[0][0] == [7]
    x, y = perplexity.window_batch(windows)
    assert x.shape[1] <= max_len
    for (ctx, cont), xi, yi in zip(windows, x, y):
        seq = ctx + cont
        assert len(seq) - 1 <= max_len
        # each target is the token that follows its input position in the real sequence
        kept = yi != -100
        assert yi[kept].tolist() == cont
        pos = torch.nonzero(kept).flatten().tolist()
        for p in pos:
            assert seq[p + 1] == yi[p].item() and seq[p] == xi[p].item()
    assert perplexity.rolling_windows([], 0, 4) == []


# ------------------------------------------------------------------------- formulas

def test_perplexity_formulas_on_known_nll():
    text = "the cat  sat\non the mat"   # 6 words by re.split(r"\s+")
    assert perplexity.count_words(text) == 6
    assert perplexity.count_words(" leading space") == 3  # lm-eval counts the empty piece
    assert perplexity.count_bytes("héllo") == 6
    nll = 12.0
    m = perplexity.text_metrics(nll, words=6, n_bytes=24)
    assert m["word_perplexity"] == pytest.approx(math.exp(2.0))
    assert m["byte_perplexity"] == pytest.approx(math.exp(0.5))
    assert m["bits_per_byte"] == pytest.approx(0.5 / math.log(2))
    assert m["bits_per_byte"] == pytest.approx(math.log2(m["byte_perplexity"]))
    # split bpb: 2 nats/token, 1000 tokens over 4000 bytes -> 2/ln2/4
    assert perplexity.bits_per_byte(2.0, 1000, 4000) == pytest.approx(2.0 / math.log(2) / 4)


def test_unigram_cross_entropy_hand_computed():
    # vocab 4; train counts [3, 1, 0, 0] -> N=4, V=4, smoothed p = [4, 2, 1, 1] / 8
    train = np.array([3, 1, 0, 0])
    val = np.array([1, 1, 1, 1])  # one of each token
    expected = -(math.log(4 / 8) + math.log(2 / 8) + 2 * math.log(1 / 8)) / 4
    assert unigram_cross_entropy(train, val) == pytest.approx(expected)
    # a val split of only the most frequent token costs ln 2 nats
    assert unigram_cross_entropy(train, np.array([5, 0, 0, 0])) == pytest.approx(math.log(2))


class _Uniform(torch.nn.Module):
    """A 'model' with constant logits: every token costs exactly ln(V) nats."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx, targets=None):
        return torch.zeros(*idx.shape, self.vocab), None


def test_text_nll_of_uniform_model_is_n_log_v():
    nll, predicted, windows = perplexity.text_nll(_Uniform(50), list(range(1, 38)), 0, 8, 3, torch.device("cpu"))
    assert predicted == 37 and windows == 5
    assert nll == pytest.approx(37 * math.log(50))


# ----------------------------------------------------------------- the eval stage (real pipeline)

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """corpus -> tokenizer -> pack -> a 12-step micro model, all by the real stages."""
    return build_micro_pipeline(tmp_path_factory.mktemp("pipe"))


def _eval_cfg(pipeline, **kw):
    from lmlab.eval import evaluate

    base = dict(model=str(pipeline["model"]), packed=[str(pipeline["packed"])], max_batches=3, batch_size=8,
                prompts=["The os module provides", "def "], max_new_tokens=4, device="cpu")
    return evaluate.Config(**{**base, **kw})


def test_eval_stage_writes_metrics_and_rerun_is_noop(pipeline, tmp_path, capsys):
    from lmlab import artifacts
    from lmlab.data.loader import PackedDataset
    from lmlab.eval import evaluate
    from lmlab.eval.baseline import token_counts
    from lmlab.models import load_model

    text = tmp_path / "doc.txt"
    text.write_text("The os module provides a portable way of using operating system functionality.\n" * 6)
    out = evaluate.run(_eval_cfg(pipeline, texts=[str(text)]))
    assert out == pipeline["root"] / "eval"  # default: 'eval' next to the model dir
    m = artifacts.read_manifest(out)
    assert m["kind"] == "eval" and m["tokenizer_sha256"]
    ev = json.loads((out / "eval.json").read_text())
    p = ev["packed"][0]
    assert p["rows"] == 24 and p["tokens_scored"] == 24 * 64
    assert 0 < p["bits_per_byte"] < 20 and 0 < p["unigram_bits_per_byte"] < 20
    assert p["perplexity"] == pytest.approx(math.exp(p["loss"]))
    assert m["stats"]["val_bpb"] == p["bits_per_byte"]

    # The packed loss equals a direct forward pass over the same rows.
    model, tok, _ = load_model(pipeline["model"])
    rows = torch.from_numpy(PackedDataset(pipeline["packed"], "val").rows(np.arange(24)))
    with torch.no_grad():
        _, loss = model(rows[:, :-1], rows[:, 1:])
    assert p["loss"] == pytest.approx(loss.item(), rel=1e-5)

    # The unigram baseline is the smoothed-train-unigram cross-entropy on the val split.
    train_counts = token_counts(PackedDataset(pipeline["packed"], "train"), tok.vocab_size)
    val_counts = token_counts(PackedDataset(pipeline["packed"], "val"), tok.vocab_size)
    assert p["unigram_nats_per_token"] == pytest.approx(unigram_cross_entropy(train_counts, val_counts))

    t = ev["texts"][0]
    ids = tok.encode(text.read_text())
    assert t["tokens"] == len(ids) and t["windows"] == math.ceil(len(ids) / 64)
    assert t["words"] == perplexity.count_words(text.read_text())
    assert t["bits_per_byte"] == pytest.approx(t["nll"] / t["bytes"] / math.log(2))
    # The rolling-window NLL equals scoring [bos] + tokens window by window by hand.
    full = [tok.bos_id] + ids
    nll = 0.0
    for (ctx, cont) in perplexity.rolling_windows(ids, tok.bos_id, 64):
        x, y = perplexity.window_batch([(ctx, cont)])
        nll += perplexity.summed_nll(model, x, y)
    assert t["nll"] == pytest.approx(nll, rel=1e-6)
    assert len(full) - 1 == t["tokens"]

    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(g["prompt"], g["setting"]) for g in gens] == [
        ("The os module provides", "greedy"), ("def ", "greedy"),
        ("The os module provides", "sampled"), ("def ", "sampled")]
    assert all(isinstance(g["completion"], str) for g in gens)

    mtime = (out / "eval.json").stat().st_mtime_ns
    capsys.readouterr()
    evaluate.run(_eval_cfg(pipeline, texts=[str(text)]))
    assert "up to date" in capsys.readouterr().out
    assert (out / "eval.json").stat().st_mtime_ns == mtime
    # A changed text file is a changed input: the stage runs again.
    text.write_text("Something else entirely, to be scored again.\n" * 3)
    evaluate.run(_eval_cfg(pipeline, texts=[str(text)], max_new_tokens=0))
    assert json.loads((out / "eval.json").read_text())["texts"][0]["bytes"] == len(text.read_bytes())


def _run_cli(*args, cwd=None):
    env = {**os.environ, "LMLAB_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


def test_eval_refuses_other_tokenizer_through_cli(pipeline, tmp_path):
    from lmlab.data import pack, tokenizer
    from lmlab.data.tokenizer import Tokenizer

    other_tok = tokenizer.run(tokenizer.Config(corpus=str(pipeline["corpus"]), out=str(tmp_path / "tok2"),
                                               vocab_size=450, threads=1))
    other = pack.run(pack.Config(corpus=str(pipeline["corpus"]), tokenizer=str(other_tok), out=str(tmp_path / "packed2"),
                                 seq_len=65, workers=1, val_fraction=0.2))
    r = _run_cli("eval", str(pipeline["model"]), f"packed=[{other}]", f"out={tmp_path / 'ev'}")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ")
    assert Tokenizer.load(other_tok).sha256 in r.stderr
    assert Tokenizer.load(pipeline["tokenizer"]).sha256 in r.stderr
    assert not (tmp_path / "ev").exists()


def test_eval_user_errors(pipeline, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait".encode("latin-1"))
    r = _run_cli("eval", str(pipeline["model"]), f"texts=[{bad}]", f"out={tmp_path / 'ev'}")
    assert r.returncode == 2 and "latin1.txt" in r.stderr and "not UTF-8" in r.stderr and "Traceback" not in r.stderr
    r = _run_cli("eval", str(tmp_path / "no_such_model"))
    assert r.returncode == 2 and "no_such_model" in r.stderr and "Traceback" not in r.stderr


def test_eval_truncates_text_at_whitespace(tmp_path):
    from lmlab.eval.evaluate import read_text_file

    p = tmp_path / "t.txt"
    p.write_text("alpha beta gamma delta")
    text, truncated = read_text_file(p, max_bytes=13)
    assert (text, truncated) == ("alpha beta", True)
    assert read_text_file(p) == ("alpha beta gamma delta", False)


@pytest.mark.skipif(not WIKITEXT.is_file(), reason=f"WikiText-2 not present at {WIKITEXT}")
def test_wikitext2_valid_is_finite(pipeline, tmp_path):
    from lmlab.eval import evaluate

    out = evaluate.run(_eval_cfg(pipeline, packed=[], texts=[str(WIKITEXT)], max_text_bytes=6000,
                                 max_new_tokens=0, out=str(tmp_path / "wt")))
    ev = json.loads((out / "eval.json").read_text())
    # packed=[] defaults to the val split of the data the model was trained on
    assert [p["path"] for p in ev["packed"]] == [str(pipeline["packed"])]
    t = ev["texts"][0]
    assert t["truncated"] and t["bytes"] <= 6000 and t["windows"] >= 2
    for k in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isfinite(t[k]) and t[k] > 0
    assert t["word_perplexity"] > t["byte_perplexity"] > 1
