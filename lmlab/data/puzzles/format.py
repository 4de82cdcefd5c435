"""Puzzle sets on disk: numpy arrays in the official TRM/HRM layout, plus lmlab's manifest.

A puzzle-set directory (artifact kind "puzzles", written by `lmlab puzzles`):

    puzzles.json                 what the set is: {"kind": "sudoku"|"maze"|"arc", "grid": [rows, cols],
                                 "vocab": [token strings, index = id], "splits": [...], ...}
    identifiers.json             puzzle identifier -> name (index 0 is "<blank>")
    test_puzzles.json            ARC only: the evaluation tasks' test pairs in ARC JSON, for voting
    {split}/dataset.json         the official metadata (PuzzleDatasetMetadata's fields)
    {split}/all__inputs.npy      (N, L) token ids of the inputs, L = rows * cols
    {split}/all__labels.npy      (N, L) token ids of the answers; 0 = not scored (ignore_label_id)
    {split}/all__puzzle_identifiers.npy   (P,) int32, one per puzzle
    {split}/all__puzzle_indices.npy       (P + 1,) int32: puzzle p's examples are rows [i[p], i[p+1])
    {split}/all__group_indices.npy        (G + 1,) int32: group g's puzzles are [j[g], j[g+1])
                                          (a group is one original puzzle and its augmentations)
    {split}/all__ratings.npy     (P,) float32 difficulty of each puzzle (NaN when unknown); lmlab's addition
    manifest.json

The file names and fields are the official builders' (dataset/build_*_dataset.py in
SamsungSAILMontreal/TinyRecursiveModels), so the official training code reads our sets and
ours reads theirs (`read_split` accepts a directory without ratings). Token 0 is padding in
inputs and "ignore" in labels (pad_id = ignore_label_id = 0, blank_identifier_id = 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmlab.errors import UserError

INFO = "puzzles.json"
IDENTIFIERS = "identifiers.json"
TEST_PUZZLES = "test_puzzles.json"
FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
SET = "all"  # the official builders write one set per split, named "all"


@dataclass
class PuzzleSplit:
    """One split of a puzzle set, in memory (or memory-mapped when read)."""

    inputs: np.ndarray  # (N, L) integer token ids
    labels: np.ndarray  # (N, L); 0 = not scored
    puzzle_identifiers: np.ndarray  # (P,)
    puzzle_indices: np.ndarray  # (P + 1,)
    group_indices: np.ndarray  # (G + 1,)
    ratings: np.ndarray | None = None  # (P,) float32, NaN = unknown
    extra: dict = field(default_factory=dict)  # more per-split metadata for dataset.json's neighbour

    @property
    def num_examples(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def num_puzzles(self) -> int:
        return int(self.puzzle_identifiers.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.group_indices.shape[0] - 1)

    def check(self, vocab_size: int, where: str, values: bool = True) -> None:
        """Shapes and index arrays consistent and (with `values`: a pass over the arrays) every id
        inside the vocabulary, or a UserError."""
        n, p = self.num_examples, self.num_puzzles
        problems = []
        if self.inputs.ndim != 2 or self.labels.shape != self.inputs.shape:
            problems.append(f"inputs {self.inputs.shape} and labels {self.labels.shape} must be the same (N, L)")
        if self.puzzle_indices.shape != (p + 1,) or self.puzzle_indices[0] != 0 or self.puzzle_indices[-1] != n \
                or np.any(np.diff(self.puzzle_indices) <= 0):
            problems.append("puzzle_indices must rise strictly from 0 to the number of examples")
        if self.group_indices[0] != 0 or self.group_indices[-1] != p or np.any(np.diff(self.group_indices) <= 0):
            problems.append("group_indices must rise strictly from 0 to the number of puzzles")
        for name in ("inputs", "labels") if values else ():
            a = getattr(self, name)
            if a.size and (a.min() < 0 or a.max() >= vocab_size):
                problems.append(f"{name} hold ids outside the vocabulary [0, {vocab_size})")
        if self.ratings is not None and self.ratings.shape != (p,):
            problems.append(f"ratings has shape {self.ratings.shape}, expected ({p},)")
        if problems:
            raise UserError(f"{where}: " + "; ".join(problems) + " (rebuild it with `lmlab puzzles`)")


def metadata(split: PuzzleSplit, vocab_size: int, num_identifiers: int) -> dict:
    """The official dataset.json of a split."""
    return {
        "pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0,
        "vocab_size": int(vocab_size), "seq_len": int(split.inputs.shape[1]),
        "num_puzzle_identifiers": int(num_identifiers),
        "total_groups": split.num_groups,
        "mean_puzzle_examples": split.num_examples / max(split.num_puzzles, 1),
        "total_puzzles": split.num_puzzles,
        "sets": [SET],
    }


def write_split(root: str | Path, name: str, split: PuzzleSplit, vocab_size: int, num_identifiers: int) -> None:
    """Write `root/name/` (the caller writes into a temporary directory and renames it: atomic)."""
    from lmlab.artifacts import write_json_atomic

    d = Path(root) / name
    d.mkdir(parents=True, exist_ok=True)
    split.check(vocab_size, f"{name} split")
    dtype = np.uint8 if vocab_size <= 256 else np.int32
    np.save(d / f"{SET}__inputs.npy", np.ascontiguousarray(split.inputs, dtype=dtype))
    np.save(d / f"{SET}__labels.npy", np.ascontiguousarray(split.labels, dtype=dtype))
    for f in ("puzzle_identifiers", "puzzle_indices", "group_indices"):
        np.save(d / f"{SET}__{f}.npy", np.asarray(getattr(split, f), dtype=np.int32))
    ratings = split.ratings if split.ratings is not None else np.full(split.num_puzzles, np.nan)
    np.save(d / f"{SET}__ratings.npy", np.asarray(ratings, dtype=np.float32))
    write_json_atomic(d / "dataset.json", {**metadata(split, vocab_size, num_identifiers), **split.extra})


def read_info(root: str | Path) -> dict:
    """puzzles.json of a set (or a UserError naming what to run)."""
    p = Path(root) / INFO
    if not p.is_file():
        raise UserError(f"{root} is not a puzzle set ({INFO} is missing); make one with `lmlab puzzles`")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{p} cannot be read ({e}); rebuild the set with `lmlab puzzles`") from None


def read_split(root: str | Path, name: str, mmap: bool = True) -> tuple[PuzzleSplit, dict]:
    """(split, its dataset.json) from `root/name`; inputs and labels memory-mapped when `mmap`."""
    d = Path(root) / name
    meta_path = d / "dataset.json"
    if not meta_path.is_file():
        raise UserError(f"{root} has no '{name}' split ({meta_path} is missing); splits: "
                        f"{', '.join(sorted(p.parent.name for p in Path(root).glob('*/dataset.json'))) or 'none'}")
    try:
        meta = json.loads(meta_path.read_text())
        arrays = {f: np.load(d / f"{SET}__{f}.npy", mmap_mode="r" if mmap and f in ("inputs", "labels") else None)
                  for f in FIELDS}
        rp = d / f"{SET}__ratings.npy"
        ratings = np.load(rp) if rp.is_file() else None
    except (OSError, ValueError) as e:
        raise UserError(f"{d} cannot be read ({e}); rebuild the set with `lmlab puzzles`") from None
    split = PuzzleSplit(**arrays, ratings=ratings)
    split.check(int(meta["vocab_size"]), str(d), values=False)  # the writer checked the values
    return split, meta
