"""Metrics of a binary scorer (the outcome verifier) as pure functions of probabilities and labels.

    from lmlab.train.scorer_metrics import auroc, binary_metrics, ece, reliability_table
    m = binary_metrics(probs, labels)   # {"accuracy", "auroc", "ece", "brier", "base_rate", "n"}
    table = reliability_table(probs, labels, bins=10)

`probs` are predicted probabilities that a solution is correct, `labels` the truth (1 correct,
0 wrong); both 1-D sequences of the same length (lists, numpy arrays, tensors).

Definitions:

    accuracy   mean(1[p >= threshold] == y), threshold 0.5: a probability of exactly 0.5
               counts as "correct"
    AUROC      P(p_pos > p_neg) + ½·P(p_pos = p_neg) over all (positive, negative) pairs: the
               Mann-Whitney statistic from the average ranks of the pooled scores (ties share
               the mean of their ranks), = (Σ rank(pos) − n_pos(n_pos+1)/2) / (n_pos·n_neg).
               Equal to sklearn.metrics.roc_auc_score (the trapezoidal area counts a tie as
               half), tested. None when the labels are all one class (it is undefined).
    brier      mean((p − y)²)
    ECE        the expected calibration error over `bins` equal-width bins of [0, 1]:
               Σ_b (n_b / N) · |conf_b − acc_b|, where for the samples in bin b
               conf_b = mean(p) (the mean predicted probability of "correct") and
               acc_b = mean(y) (the fraction that are correct). This is the binary
               calibration-curve form (what sklearn.calibration.calibration_curve with
               strategy="uniform" plots), not the top-label form max(p, 1−p) of multi-class
               ECE (Guo et al. 2017). Empty bins contribute nothing.
    bins       edges linspace(0, 1, bins + 1); a probability goes in the bin whose interval
               (lo, hi] holds it, the first bin is closed ([0, 0.1] for 10 bins), as in Guo et
               al. 2017; the same assignment as sklearn's calibration_curve (np.searchsorted
               on the inner edges).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

THRESHOLD = 0.5
DEFAULT_BINS = 10


def _arrays(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs.tolist() if hasattr(probs, "tolist") else probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels.tolist() if hasattr(labels, "tolist") else labels, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{len(p)} probabilities but {len(y)} labels")
    if len(y) and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return p, y


def accuracy(probs, labels, threshold: float = THRESHOLD) -> Optional[float]:
    """Fraction of samples whose prediction (p >= threshold means "correct") matches the label."""
    p, y = _arrays(probs, labels)
    if not len(p):
        return None
    return float(np.mean((p >= threshold) == (y == 1)))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x` ascending; tied values get the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of runs of equal values in the sorted array
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0  # mean of ranks s+1 .. e
    return ranks


def auroc(probs, labels) -> Optional[float]:
    """Area under the ROC curve from average ranks (ties count half); None with a single class."""
    p, y = _arrays(probs, labels)
    n_pos = int((y == 1).sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    r = average_ranks(p)
    return float((r[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def brier(probs, labels) -> Optional[float]:
    """Mean squared error of the probabilities against the 0/1 labels."""
    p, y = _arrays(probs, labels)
    return float(np.mean((p - y) ** 2)) if len(p) else None


def bin_index(probs, bins: int = DEFAULT_BINS) -> np.ndarray:
    """The bin of each probability (0 .. bins-1), as calibration_curve assigns them."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.searchsorted(edges[1:-1], p, side="left")


def reliability_table(probs, labels, bins: int = DEFAULT_BINS) -> list[dict]:
    """Per bin: {"lo", "hi", "count", "confidence" (mean p), "accuracy" (fraction correct)}.

    Every bin is listed; an empty bin has count 0 and confidence/accuracy None.
    """
    p, y = _arrays(probs, labels)
    idx = bin_index(p, bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                     "confidence": float(p[sel].mean()) if n else None,
                     "accuracy": float(y[sel].mean()) if n else None})
    return rows


def ece(probs, labels, bins: int = DEFAULT_BINS) -> Optional[float]:
    """Expected calibration error: the count-weighted mean |confidence − accuracy| over the bins."""
    p, _ = _arrays(probs, labels)
    if not len(p):
        return None
    table = reliability_table(probs, labels, bins)
    return float(sum(r["count"] * abs(r["confidence"] - r["accuracy"]) for r in table if r["count"]) / len(p))


def binary_metrics(probs: Sequence[float], labels: Sequence[int], bins: int = DEFAULT_BINS) -> dict:
    """accuracy, auroc, ece, brier, base_rate (fraction correct), mean_prob and n; None where undefined."""
    p, y = _arrays(probs, labels)
    return {"accuracy": accuracy(p, y), "auroc": auroc(p, y), "ece": ece(p, y, bins), "brier": brier(p, y),
            "base_rate": float(y.mean()) if len(y) else None, "mean_prob": float(p.mean()) if len(p) else None,
            "n": int(len(p))}
