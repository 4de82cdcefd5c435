"""Unigram baseline: the bits per byte a model gets by knowing only token frequencies.

A trained language model should beat this by a wide margin; the gap is what context buys.
Frequencies come from the train split of a packed artifact with add-one (Laplace)
smoothing over the vocabulary, p(t) = (count(t) + 1) / (N + V), so a token unseen in
training still has a finite cost. The cross-entropy of that distribution on every token of
the val split, converted with the val split's tokens/bytes, gives bits per byte that sit on
the same scale as the model's (docs/architecture.md: bpb = nats / ln 2 * tokens / bytes).

    from lmlab.eval.baseline import unigram_baseline
    unigram_baseline("runs/smoke/packed", vocab_size=4096)
    # {'bits_per_byte': 2.31, 'nats_per_token': 5.9, 'train_tokens': ..., 'val_tokens': ...}
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

ROWS_PER_CHUNK = 4096  # rows read per memmap slice: bounded memory on any split size


def token_counts(dataset, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in a PackedDataset split (length >= vocab_size)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(dataset), ROWS_PER_CHUNK):
        rows = np.asarray(dataset.rows(np.arange(start, min(start + ROWS_PER_CHUNK, len(dataset)))))
        c = np.bincount(rows.reshape(-1), minlength=len(counts))
        if len(c) > len(counts):  # ids beyond the declared vocab: grow rather than crash
            counts = np.concatenate([counts, np.zeros(len(c) - len(counts), dtype=np.int64)])
        counts += c
    return counts


def unigram_cross_entropy(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
    """Mean nats per token of the add-one-smoothed train unigram on tokens with `eval_counts`."""
    v = max(len(train_counts), len(eval_counts))
    train = np.zeros(v, dtype=np.float64)
    train[:len(train_counts)] = train_counts
    ev = np.zeros(v, dtype=np.float64)
    ev[:len(eval_counts)] = eval_counts
    log_p = np.log(train + 1.0) - math.log(train.sum() + v)
    return float(-(ev * log_p).sum() / ev.sum())


def unigram_baseline(packed_dir: str | Path, vocab_size: int) -> dict:
    """The unigram baseline of one packed artifact: train frequencies scored on its val split."""
    from lmlab.data.loader import PackedDataset

    train = PackedDataset(packed_dir, "train")
    val = PackedDataset(packed_dir, "val")
    train_counts = token_counts(train, vocab_size)
    val_counts = token_counts(val, vocab_size)
    nats = unigram_cross_entropy(train_counts, val_counts)
    stats = val.manifest.get("stats", {})
    val_tokens = int(stats.get("val_tokens") or val_counts.sum())
    val_bytes = int(stats["val_bytes"])
    return {
        "nats_per_token": nats,
        "bits_per_byte": nats / math.log(2) * val_tokens / val_bytes,
        "train_tokens": int(train_counts.sum()),
        "val_tokens": int(val_counts.sum()),
        "vocab_size": int(max(len(train_counts), len(val_counts))),
    }
