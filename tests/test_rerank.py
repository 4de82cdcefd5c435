"""Reranking samples: best-of-N's subset expectation against brute force, weighted vote, maj@N, pass@N."""

from __future__ import annotations

import itertools
import random

import pytest

from lmlab.eval.rerank import expected_best_of_n, rerank_metrics, weighted_vote


def _brute_best_of_n(scores, correct, n):
    """The mean over every n-subset of whether its top-scored sample (ties: the earliest) is correct."""
    hits = []
    for subset in itertools.combinations(range(len(scores)), n):
        best = max(subset, key=lambda i: (scores[i], -i))
        hits.append(bool(correct[best]))
    return sum(hits) / len(hits)


def test_best_of_n_is_the_expectation_over_subsets():
    rng = random.Random(0)
    for _ in range(30):
        k = rng.randint(1, 7)
        scores = [rng.choice([0.1, 0.5, 0.9, rng.random()]) for _ in range(k)]   # ties included
        correct = [rng.random() < 0.4 for _ in range(k)]
        for n in range(1, k + 1):
            assert expected_best_of_n(scores, correct, n) == pytest.approx(_brute_best_of_n(scores, correct, n))
    # by hand: scores 0.9 (wrong), 0.2 (right), 0.5 (right); best-of-1 = 2/3; best-of-2: {0,1}->0, {0,2}->0, {1,2}->1
    assert expected_best_of_n([0.9, 0.2, 0.5], [False, True, True], 2) == pytest.approx(1 / 3)
    assert expected_best_of_n([0.9, 0.2, 0.5], [False, True, True], 3) == 0.0
    with pytest.raises(ValueError):
        expected_best_of_n([0.1], [True], 2)


def test_weighted_vote_sums_scores_per_answer():
    assert weighted_vote(["3", "4", "4", None], [0.9, 0.4, 0.4, 1.0]) == "3"     # 0.9 > 0.8
    assert weighted_vote(["3", "4", "4"], [0.7, 0.4, 0.4]) == "4"               # 0.8 > 0.7
    assert weighted_vote(["5", "6"], [0.5, 0.5]) == "5"                          # tie: the earliest
    assert weighted_vote([None, None], [1.0, 1.0]) is None


def test_rerank_metrics_side_by_side():
    # problem 1: the verifier likes the right answer; problem 2: it likes a wrong one; problem 3: none right
    scores = [[0.9, 0.1, 0.2, 0.3], [0.8, 0.9, 0.1, 0.2], [0.5, 0.5, 0.5, 0.5]]
    answers = [["7", "1", "1", "1"], ["2", "9", "2", "2"], ["0", None, "1", "0"]]
    refs = ["7", "2", "5"]
    res = rerank_metrics(scores, answers, refs, [1, 4])
    p = res["per_problem"]
    assert p[0]["best_of_4"] == 1.0 and p[1]["best_of_4"] == 0.0 and p[2]["best_of_4"] == 0.0
    assert p[0]["maj@4"] == 0.0 and p[1]["maj@4"] == 1.0                      # majority: "1" and "2"
    assert p[0]["weighted_vote@4"] == 1.0 and p[1]["weighted_vote@4"] == 1.0  # 0.9 vs 0.6; "2": 1.1 vs 0.9
    assert p[0]["pass@4"] == 1.0 and p[0]["pass@1"] == pytest.approx(0.25) and p[2]["pass@4"] == 0.0
    assert p[0]["best_of_1"] == pytest.approx(0.25)                            # best-of-1 is pass@1
    assert res["best_of_4"] == pytest.approx(1 / 3) and res["maj@4"] == pytest.approx(1 / 3)
    assert res["best_of_4_stderr"] is not None and res["ns"] == [1, 4] and res["n_samples"] == 4
    with pytest.raises(ValueError):
        rerank_metrics(scores, answers, refs, [8])
