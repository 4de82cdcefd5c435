"""Solve a puzzle split with a TRM and measure it: every supervision step recorded, as the paper evaluates.

    solved = solve(model, split, batch_size=256, device=dev)    # model in eval mode: all 16 steps
    summary(solved, ratings=split.ratings)                       # the metrics below, as a dict

Evaluation always runs `halt_max_steps` supervision steps per puzzle (the official code does,
so a batch finishes together); the answer scored is the last step's. We also record each
step's answer and Q-halt logit, which gives what the paper's figures and our report show:
accuracy after k steps, the step at which the model would have stopped (the first with
q_halt >= 0: "steps used") and how accurate it is there, and the histogram of steps used.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from lmlab.data.puzzles.format import PuzzleSplit
from lmlab.data.puzzles.sampler import eval_batches
from lmlab.models import unwrap


@dataclass
class Solved:
    preds: np.ndarray  # (N, L) the last step's answer (argmax ids)
    exact: np.ndarray  # (N, S) bool: the whole answer right after step s+1
    token_acc: np.ndarray  # (N, S) share of scored cells right after step s+1
    q_halt: np.ndarray  # (N, S) Q-halt logits
    scored: np.ndarray  # (N,) bool: the row has scored cells (padding rows do not)
    examples: np.ndarray  # (N,) example index in the split

    @property
    def steps_used(self) -> np.ndarray:
        """1-based step at which q_halt first says halt (>= 0); the last step if it never does."""
        says = self.q_halt >= 0
        return np.where(says.any(1), says.argmax(1) + 1, self.q_halt.shape[1])

    @property
    def exact_at_halt(self) -> np.ndarray:
        return self.exact[np.arange(len(self.exact)), self.steps_used - 1]


@torch.no_grad()
def solve(model, split: PuzzleSplit, batch_size: int, device, limit: int | None = None,
          autocast=contextlib.nullcontext, progress_bar=None) -> Solved:
    """Run every example of `split` (the first `limit`) through all supervision steps."""
    base = unwrap(model)
    steps = base.cfg.halt_max_steps
    was_training = base.training
    base.eval()
    parts: dict[str, list] = {k: [] for k in ("preds", "exact", "token_acc", "q_halt", "scored", "examples")}
    try:
        for idx, batch in eval_batches(split, batch_size, limit):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"].long()
            mask = labels != 0
            counts = mask.sum(-1)
            carry = base.initial_carry(len(idx), device=device)
            exact, tok, q = [], [], []
            for _ in range(steps):
                with autocast():
                    carry, out = model(carry, batch)
                pred = out["logits"].argmax(-1)
                right = (mask & (pred == labels)).sum(-1)
                exact.append((right == counts).cpu())
                tok.append((right.float() / counts.clamp_min(1)).cpu())
                q.append(out["q_halt_logits"].float().cpu())
            parts["preds"].append(pred.to(torch.int16).cpu().numpy())
            parts["exact"].append(torch.stack(exact, 1).numpy())
            parts["token_acc"].append(torch.stack(tok, 1).numpy())
            parts["q_halt"].append(torch.stack(q, 1).numpy())
            parts["scored"].append((counts > 0).cpu().numpy())
            parts["examples"].append(idx)
            if progress_bar is not None:
                progress_bar.update(len(idx))
    finally:
        base.train(was_training)
    if not parts["examples"]:
        raise ValueError("no examples to evaluate")
    return Solved(**{k: np.concatenate(v) for k, v in parts.items()})


def rating_edges(ratings: np.ndarray, n_bins: int = 5) -> np.ndarray:
    """Edges of up to n_bins quantile bins of the finite ratings (duplicate edges merged)."""
    r = ratings[np.isfinite(ratings)]
    return np.unique(np.quantile(r, np.linspace(0, 1, n_bins + 1))) if len(r) else np.zeros(0)


def binned(values: np.ndarray, correct: np.ndarray) -> list[dict]:
    """Exact accuracy in quantile bins of `values`: [{"rating_min", "rating_max", "examples",
    "exact_accuracy"}]; bins [e_i, e_i+1), the last one closed; one bin when all values agree."""
    edges, rows = rating_edges(values), []
    if not len(edges):
        return rows
    which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, max(len(edges) - 2, 0))
    for i in range(max(len(edges) - 1, 1)):
        sel = np.isfinite(values) & (which == i)
        if sel.any():
            rows.append({"rating_min": float(edges[i]), "rating_max": float(edges[min(i + 1, len(edges) - 1)]),
                         "examples": int(sel.sum()), "exact_accuracy": float(correct[sel].mean())})
    return rows


def cells_to_fill(split: PuzzleSplit) -> np.ndarray:
    """(N,) scored cells whose answer differs from the input: Sudoku's blanks, a maze's path cells."""
    labels, inputs = np.asarray(split.labels), np.asarray(split.inputs)
    return ((labels != 0) & (labels != inputs)).sum(1)


def summary(solved: Solved, ratings: np.ndarray | None = None, owners: np.ndarray | None = None,
            fill: np.ndarray | None = None) -> dict:
    """Metrics of a solved split. `ratings` are per puzzle, `owners` the puzzle of each example,
    `fill` per example (cells_to_fill), a second difficulty axis."""
    s = solved.scored
    n = int(s.sum())
    if not n:
        return {"examples": 0}
    exact, steps_used = solved.exact[s], solved.steps_used[s]
    last = exact[:, -1]
    out = {
        "examples": n,
        "exact_accuracy": float(last.mean()),
        "token_accuracy": float(solved.token_acc[s][:, -1].mean()),
        "q_halt_accuracy": float(((solved.q_halt[s][:, -1] >= 0) == last).mean()),
        "exact_accuracy_by_step": [round(float(x), 6) for x in exact.mean(0)],
        "steps_used_mean": float(steps_used.mean()),
        "steps_used_histogram": {int(k): int(v) for k, v in zip(*np.unique(steps_used, return_counts=True))},
        "exact_accuracy_at_halt": float(solved.exact_at_halt[s].mean()),
        # what the model answers when it stops by itself, by the step it stops at
        "accuracy_by_steps_used": {int(k): float(solved.exact_at_halt[s][steps_used == k].mean())
                                   for k in np.unique(steps_used)},
    }
    if ratings is not None and owners is not None:
        rows = binned(np.asarray(ratings, dtype=np.float64)[owners[solved.examples]][s], last)
        if rows:
            out["accuracy_by_rating"] = rows
    if fill is not None:
        rows = binned(np.asarray(fill, dtype=np.float64)[solved.examples][s], last)
        if rows:
            out["accuracy_by_fill"] = rows
    return out
