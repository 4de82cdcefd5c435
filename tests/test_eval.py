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
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.eval import perplexity
from lmlab.eval.baseline import unigram_cross_entropy

os.environ.setdefault("LMLAB_NO_PROGRESS", "1")
WIKITEXT = Path("/work/shared/data/wikitext-2/valid.txt")


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
