"""The estimators every generative metric shares: unbiased pass@k, majority vote, standard error.

    pass_at_k(n=8, c=2, k=4)          # 1 - C(6, 4) / C(8, 4)
    majority_vote(["3", None, "3", "4"]) -> "3"
    stderr([1.0, 0.0, 1.0])           # sample std / sqrt(n), as lm-eval reports it

lmlab.eval.generative (exact match, pass@k, maj@k) and lmlab.eval.rerank (best-of-N) both
use them; the report's paired differences use `stderr`.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority_vote(answers: Sequence[Optional[str]]) -> Optional[str]:
    """The most frequent answer (None = no answer, never voted for); ties go to the earliest."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def stderr(values: Sequence[float]) -> Optional[float]:
    """Standard error of a mean over problems (sample std / sqrt(n)), as lm-eval reports it."""
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    return (sum((v - m) ** 2 for v in values) / (n - 1) / n) ** 0.5
