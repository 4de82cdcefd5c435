"""Perplexity and bits per byte: on packed token rows and on raw text with rolling windows.

Two ways of scoring a model on held-out text:

* `packed_nll(model, dataset, ...)`: the val split of a packed artifact, scored exactly as
  training scores it (`x = row[:-1]`, `y = row[1:]`). Bits per byte then follow from the
  split's tokens/bytes ratio: bpb = (mean nats / ln 2) * tokens / bytes.
* `text_nll(model, tokens, ...)`: a whole document scored with lm-evaluation-harness's
  `loglikelihood_rolling` convention (`rolling_windows` below), which is what lm-eval's
  `word_perplexity`, `byte_perplexity` and `bits_per_byte` on WikiText are computed from.

Both return a summed negative log-likelihood in nats (float64) and the number of predicted
tokens, so callers can aggregate across files before turning sums into metrics with
`text_metrics` / `bits_per_byte`. This module holds no stage logic; `lmlab eval` drives it
(see lmlab/eval/evaluate.py).
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100


# ----------------------------------------------------------------------------- formulas

def count_words(text: str) -> int:
    """Words as lm-eval counts them for word_perplexity: `len(re.split(r"\\s+", doc))`.

    Kept byte-for-byte identical to lm-eval (including the empty piece a leading or trailing
    whitespace run produces), so our word perplexity is comparable to published numbers.
    """
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def bits_per_byte(mean_nats_per_token: float, tokens: int, n_bytes: int) -> float:
    """(mean loss in nats / ln 2) * tokens / bytes: the tokenizer-independent measure."""
    return mean_nats_per_token / math.log(2) * tokens / n_bytes


def text_metrics(nll: float, words: int, n_bytes: int) -> dict:
    """lm-eval's perplexity metrics from a document's summed NLL (nats) and its word/byte counts."""
    return {
        "word_perplexity": math.exp(nll / words),
        "byte_perplexity": math.exp(nll / n_bytes),
        "bits_per_byte": nll / n_bytes / math.log(2),
    }


# ------------------------------------------------------------------------ rolling windows

def rolling_windows(tokens: list[int], prefix_token: int, max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Split a tokenized document into (context, continuation) pairs, as lm-eval does.

    This is lm-eval's `get_rolling_token_windows(tokens, prefix_token, max_seq_len,
    context_len=1)` followed by `make_disjoint_window`:

    * the continuations are disjoint and together cover every token exactly once, in order;
      each holds at most `max_seq_len` tokens;
    * the first window's context is `[prefix_token]` alone, so the very first token is
      predicted from the prefix (bos, or eos when the tokenizer has no bos);
    * every window is one model input of at most `max_seq_len` tokens,
      `(context + continuation)[:-1]`: a full window keeps one token of the previous window
      as context, and the last, shorter window is topped up to `max_seq_len` inputs with
      preceding tokens as context (so it is conditioned on up to max_seq_len earlier tokens).
    """
    if max_seq_len < 1:
        raise ValueError("max_seq_len must be >= 1")
    out: list[tuple[list[int], list[int]]] = []
    n = len(tokens)
    if n == 0:
        return out
    first = min(max_seq_len, n)
    out.append(([prefix_token], list(tokens[:first])))
    predicted = first
    while predicted < n:
        pred_len = min(n - predicted, max_seq_len)  # context_len=1 -> pred_len = max_seq_len
        end = predicted + pred_len
        inputs = list(tokens[end - max_seq_len - 1:end - 1])
        continuation = list(tokens[end - pred_len:end])
        # make_disjoint_window: drop the inputs that overlap the continuation (all but one).
        out.append((inputs[:len(inputs) - (len(continuation) - 1)], continuation))
        predicted = end
    return out


def window_batch(windows: list[tuple[list[int], list[int]]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (inputs, targets) for a list of windows; targets are IGNORE except on continuations."""
    seqs = [(ctx + cont)[:-1] for ctx, cont in windows]
    width = max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, ((ctx, cont), s) in enumerate(zip(windows, seqs)):
        x[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        # input position j predicts token j+1 of ctx+cont; the continuation starts at len(ctx).
        start = len(ctx) - 1
        y[i, start:start + len(cont)] = torch.tensor(cont, dtype=torch.long)
    return x, y


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def summed_nll(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """Sum of -log p(y | x) in nats over targets != IGNORE, accumulated in float64 (a model's
    `scorer`, lmlab.models.family.Scorer, computes it in its place: the JAX Griffin)."""
    scorer = getattr(model, "scorer", None)
    if scorer is not None:
        return float(scorer.row_scores(x.cpu().numpy(), y.cpu().numpy())[0].sum())
    logits, _ = model(x)
    nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
    return float(nll.double())


def text_nll(model, tokens: list[int], prefix_token: int, max_seq_len: int, batch_size: int,
             device: torch.device, bar=None) -> tuple[float, int, int]:
    """Score one document with rolling windows. Returns (nll nats, predicted tokens, windows)."""
    windows = rolling_windows(tokens, prefix_token, max_seq_len)
    total = 0.0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        x, y = window_batch(chunk)
        total += summed_nll(model, x.to(device), y.to(device))
        if bar is not None:
            bar.update(len(chunk))
    return total, sum(len(c) for _, c in windows), len(windows)


def packed_nll(model, dataset, batch_size: int, max_batches: int, device: torch.device,
               bar=None, seq_len: int | None = None) -> tuple[float, int, int]:
    """Score the rows of a PackedDataset as training does. Returns (nll nats, targets, rows).

    `max_batches` <= 0 scores every row. Rows are taken in order (the val split is already a
    held-out sample), so the same config always scores the same tokens. `seq_len` cuts rows
    to their first `seq_len` tokens, as the trainer does for a model with a shorter context.
    """
    n_rows = len(dataset)
    if max_batches > 0:
        n_rows = min(n_rows, max_batches * batch_size)
    total, count = 0.0, 0
    for start in range(0, n_rows, batch_size):
        idx = np.arange(start, min(start + batch_size, n_rows))
        rows = torch.from_numpy(np.asarray(dataset.rows(idx)[:, :seq_len], dtype=np.int64))
        x, y = rows[:, :-1].to(device), rows[:, 1:].to(device)
        total += summed_nll(model, x, y)
        count += y.numel()
        if bar is not None:
            bar.update(1)
    return total, count, n_rows
