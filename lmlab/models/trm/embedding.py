"""Puzzle embeddings: one learned vector per puzzle identifier, trained by sign-SGD on the rows a step used.

ARC has ~1M puzzle identifiers (a task x an augmentation) of 512 floats: a dense gradient
(2 GB) per step, all-reduced over the GPUs, would cost more than the model. The official code
therefore keeps the table out of autograd and trains it sparsely; so do we:

- `weight` is a Parameter with requires_grad=False: saved with the model, left out of the
  AdamW/AdamATan2 parameters, the gradient all-reduce, clipping and the EMA (the official EMA
  averages trainable parameters only, so the evaluated model uses the current table).
- In a training forward with gradients on, the looked-up rows are a fresh leaf tensor that
  requires grad; (ids, leaf) is appended to `pending`. Several micro-batches of one optimizer
  step append several (gradient accumulation), and lmlab.train.trm_optim's sign-SGD reads them
  all (gathered over processes), sums the gradients of each identifier, and updates only those
  rows: w <- w * (1 - lr * wd) - lr * sign(g). It clears `pending`.
- In evaluation (or without gradients) the rows are read directly.
"""

from __future__ import annotations

import torch
from torch import nn


class PuzzleEmbedding(nn.Module):
    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num, dim), requires_grad=False)  # zero init, as the official code
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids.long()]  # advanced indexing: already a copy
        if not (self.training and torch.is_grad_enabled()):
            return rows
        leaf = rows.detach().requires_grad_(True)
        self.pending.append((ids.detach().long(), leaf))
        return leaf
