"""Which examples make up training batch b of a puzzle set: the official sampler, as a pure function of b.

    batches = PuzzleBatches(split, batch_size=768, seed=0)
    examples, puzzles = batches.indices(b)     # (batch_size,) example rows and their puzzle index
    batch = batches.batch(b)                   # {"inputs", "labels", "puzzle_identifiers"} int32 tensors

The official PuzzleDataset visits the groups (an original puzzle and its augmentations) in a
random order per epoch, picks one random puzzle of each visited group, and appends that
puzzle's examples to the batch until it holds batch_size rows (the puzzle that overflows gives
a random subset of its examples, the rest are dropped). We do the same over an endless stream
of epochs, so a batch may span an epoch boundary and nothing is dropped at an epoch's end (the
official code concatenates `eval_interval` epochs the same way and drops one batch per
concatenation). Every draw comes from a generator seeded by (seed, epoch) or (seed, batch), so
a batch depends on nothing but its index: a resumed run, or another process, rebuilds it
exactly. (The official code draws the within-puzzle subset from numpy's global generator.)
"""

from __future__ import annotations

import numpy as np
import torch

from lmlab.data.puzzles.format import PuzzleSplit


class PuzzleBatches:
    def __init__(self, split: PuzzleSplit, batch_size: int, seed: int) -> None:
        self.split, self.batch_size, self.seed = split, batch_size, seed
        groups = np.asarray(split.group_indices, dtype=np.int64)
        self.group_start, self.group_size = groups[:-1], np.diff(groups)
        self.num_groups = len(self.group_start)
        self.puzzle_start = np.asarray(split.puzzle_indices[:-1], dtype=np.int64)
        self.puzzle_size = np.diff(np.asarray(split.puzzle_indices, dtype=np.int64))
        self.single = bool(np.all(self.puzzle_size == 1))  # Sudoku, mazes: one example per puzzle
        self._epochs: dict[int, np.ndarray] = {}  # epoch -> the puzzle picked at each visit
        self._starts = [0]  # first visit of batch b (variable-size puzzles: computed in order, cached)

    def _epoch(self, e: int) -> np.ndarray:
        if e not in self._epochs:
            rng = np.random.default_rng([self.seed, e])
            order = rng.permutation(self.num_groups)
            pick = np.floor(rng.random(self.num_groups) * self.group_size[order]).astype(np.int64)
            if len(self._epochs) > 4:
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = self.group_start[order] + pick
        return self._epochs[e]

    def _visits(self, a: int, n: int) -> np.ndarray:
        """The puzzles picked at visits [a, a + n) of the stream."""
        out, g = [], self.num_groups
        while n > 0:
            e, off = divmod(a, g)
            take = min(n, g - off)
            out.append(self._epoch(e)[off:off + take])
            a, n = a + take, n - take
        return np.concatenate(out)

    def _start(self, b: int) -> int:
        if self.single:
            return b * self.batch_size
        while len(self._starts) <= b:
            s = self._starts[-1]
            sizes = self.puzzle_size[self._visits(s, self.batch_size)]
            # the visit whose puzzle fills the batch (every puzzle has >= 1 example)
            last = int(np.searchsorted(np.cumsum(sizes), self.batch_size))
            self._starts.append(s + last + 1)
        return self._starts[b]

    def indices(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        s = self._start(b)
        if self.single:
            puzzles = self._visits(s, self.batch_size)
            return self.puzzle_start[puzzles], puzzles
        n = self._start(b + 1) - s
        puzzles = self._visits(s, n)
        rows, owners, room = [], [], self.batch_size
        rng = np.random.default_rng([self.seed, 1 << 30, b])
        for p in puzzles:
            size = int(self.puzzle_size[p])
            k = min(size, room)
            pick = np.arange(size) if k == size else np.sort(rng.choice(size, k, replace=False))
            rows.append(self.puzzle_start[p] + pick)
            owners.append(np.full(k, p))
            room -= k
        return np.concatenate(rows), np.concatenate(owners)

    def batch(self, b: int, rows: slice | None = None) -> dict:
        examples, puzzles = self.indices(b)
        if rows is not None:
            examples, puzzles = examples[rows], puzzles[rows]
        return gather(self.split, examples, puzzles)


def gather(split: PuzzleSplit, examples: np.ndarray, puzzles: np.ndarray) -> dict:
    """Rows of a split as the model's batch: int32 tensors."""
    return {"inputs": torch.from_numpy(np.asarray(split.inputs[examples], dtype=np.int32)),
            "labels": torch.from_numpy(np.asarray(split.labels[examples], dtype=np.int32)),
            "puzzle_identifiers": torch.from_numpy(np.asarray(split.puzzle_identifiers[puzzles], dtype=np.int32))}


def owners(split: PuzzleSplit) -> np.ndarray:
    """(N,) the puzzle index of every example."""
    return np.searchsorted(np.asarray(split.puzzle_indices), np.arange(split.num_examples), side="right") - 1


def eval_batches(split: PuzzleSplit, batch_size: int, limit: int | None = None):
    """Evaluation order, as the official test iterator: every example once, in order, with its
    puzzle's identifier. Yields (example indices, batch dict); the last batch may be smaller."""
    n = split.num_examples if limit is None else min(limit, split.num_examples)
    owner = owners(split)
    for a in range(0, n, batch_size):
        idx = np.arange(a, min(a + batch_size, n))
        yield idx, gather(split, idx, owner[idx])
