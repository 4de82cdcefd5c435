"""Reranking sampled solutions with a verifier or reward model: best-of-N, weighted vote, maj@N, pass@N.

    from lmlab.eval.rerank import rerank_metrics
    res = rerank_metrics(scores, answers, references, ns=[1, 2, 4, 8])
    res["best_of_8"], res["weighted_vote@8"], res["maj@8"], res["pass@8"], res["per_problem"][0]

For each problem there are n sampled solutions with their strict answers and a score each
(the verifier's P(correct), a reward model's reward). For every N ≤ n, side by side:

  best_of_N        the answer of the highest-scored of N samples is correct (Cobbe et al. 2021's
                   verifier reranking). Computed as its expectation over all N-subsets of the n
                   samples, as pass@k's unbiased estimator is: sorted by score, sample i (with
                   b_i samples scored below it) is the best of a random N-subset with probability
                   C(b_i, N−1) / C(n, N) — far less noisy than taking the first N samples, and at
                   N = n it is the plain best of all. Ties in score go to the earlier sample.
  weighted_vote@N  over the first N samples, each distinct answer gets the sum of its samples'
                   scores; the heaviest answer is correct (Li et al. 2023; "verifier-weighted
                   majority"). Samples without an answer vote for nothing.
  maj@N            plain majority vote over the first N samples (lmlab.eval.generative's maj@k)
  pass@N           the oracle: some sample is correct (the unbiased estimator from n samples),
                   the ceiling every reranker is measured against

Every metric comes with its standard error over problems (`_stderr`), and `per_problem` holds
each problem's values (for the report's paired differences across stages).
"""

from __future__ import annotations

from math import comb
from typing import Optional, Sequence


def expected_best_of_n(scores: Sequence[float], correct: Sequence[bool], n_pick: int) -> float:
    """E[the top-scored of a uniformly random n_pick-subset is correct]."""
    n = len(scores)
    if not 1 <= n_pick <= n:
        raise ValueError(f"best-of-{n_pick} needs 1 <= N <= {n} samples")
    # ascending by score, ties: the earlier sample ranks higher (it wins the tie), so it sorts later
    order = sorted(range(n), key=lambda i: (scores[i], -i))
    total = comb(n, n_pick)
    return sum(comb(below, n_pick - 1) * bool(correct[i]) for below, i in enumerate(order)) / total


def weighted_vote(answers: Sequence[Optional[str]], scores: Sequence[float]) -> Optional[str]:
    """The answer with the largest summed score (None answers never win); ties to the earliest."""
    weight: dict[str, float] = {}
    for a, s in zip(answers, scores):
        if a is not None:
            weight[a] = weight.get(a, 0.0) + float(s)
    if not weight:
        return None
    best = max(weight.values())
    return next(a for a in answers if a is not None and weight[a] == best)


def rerank_metrics(scores: Sequence[Sequence[float]], answers: Sequence[Sequence[Optional[str]]],
                   references: Sequence[Optional[str]], ns: Sequence[int]) -> dict:
    """Per-N reranking metrics over problems (see the module docstring), with standard errors."""
    from lmlab.eval.estimators import majority_vote, pass_at_k, stderr

    if not scores:
        raise ValueError("no problems to rerank")
    n = min(len(s) for s in scores)
    ns = sorted({int(x) for x in ns})
    if ns and ns[-1] > n:
        raise ValueError(f"rerank n={ns[-1]} needs {ns[-1]} samples per problem, got {n}")
    per_problem = []
    for sc, ans, ref in zip(scores, answers, references):
        ok = [ref is not None and a == ref for a in ans]
        row: dict = {}
        for N in ns:
            row[f"best_of_{N}"] = expected_best_of_n(sc[:n], ok[:n], N)
            row[f"weighted_vote@{N}"] = float(ref is not None and weighted_vote(ans[:N], sc[:N]) == ref)
            row[f"maj@{N}"] = float(ref is not None and majority_vote(ans[:N]) == ref)
            row[f"pass@{N}"] = pass_at_k(n, sum(ok[:n]), N)
        per_problem.append(row)
    out: dict = {"n": len(per_problem), "n_samples": n, "ns": ns}
    for key in per_problem[0]:
        values = [r[key] for r in per_problem]
        out[key] = sum(values) / len(values)
        out[f"{key}_stderr"] = stderr(values)
    out["per_problem"] = per_problem
    return out
