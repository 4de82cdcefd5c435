"""Sudoku puzzle sets for TRM: an exact solver, a seeded generator, the paper's augmentations
and an importer of Sudoku-Extreme CSV files.

A grid is 81 cells in row-major order, written as a string of 81 digits ('0' = blank) or any
sequence of 81 ints 0-9; a CSV may also write a blank as '.'.

**Solver** (`solve`): candidates are 9-bit masks; propagation applies naked singles (a cell
with one candidate) and hidden singles (a digit with one place in a row, column or box) until
nothing changes, then the search branches on the unsolved cell with the fewest candidates
(the lowest index on ties; digits in increasing order unless an rng shuffles them). It stops
after `limit` solutions (2 proves uniqueness) and counts `guesses` (trial assignments at
branch points) and `backtracks` (trials that propagation refuted: dead ends).

**Rating** (`rating`): the number of backtracks of the deterministic solver searching for two
solutions, i.e. proving the puzzle unique. 0 = solved by singles alone with no dead end. It
is in the spirit of Sudoku-Extreme's `rating` column (the backtrack count of the tdoku solver),
not the same scale: our propagation is stronger, so our counts are smaller. Imported puzzles
keep their file's rating unless `rating: solver`. An augmented copy keeps its original's rating
(the symmetries do not change the difficulty).

**Generator** (`generate`): a random full grid (the solver on an empty grid, digits tried in a
seeded random order), then cells blanked in a seeded random order, each kept blank only while
the solution stays unique (blanking cell i keeps it unique iff no solution has another digit
at i), until the puzzle's target number of blanks (drawn from the `blanks` range) is reached.
A pass that cannot reach the range's low end, or a puzzle outside `min_rating`/`max_rating`,
is drawn again from a new full grid, up to `max_attempts` times. Puzzle i of a split has its
own seed (stage seed, split, i): the same config gives the same puzzles, and the first n
puzzles do not change when n grows.

**Augmentation** (`augment`): as the official builder's shuffle_sudoku: a permutation of the
digits 1-9 (blank unchanged), a transpose with probability 1/2, the three bands shuffled and
the rows inside each band, the three stacks and the columns inside each stack; the same
transformation for puzzle and solution. Every one of them maps valid Sudokus to valid Sudokus.

**Tokens** (the official encoding): vocab ["<pad>", "0", "1", ..., "9"]; cell value v (0 =
blank) -> token v + 1, so pad = 0, blank = 1, digit d = d + 1; labels are the full solution.
One puzzle identifier ("<blank>", 0); each augmentation is its own puzzle with one example;
a group is an original puzzle plus its augmentations.
"""

from __future__ import annotations

import csv
import hashlib
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal, Optional, Sequence

import numpy as np
from pydantic import Field, model_validator

from lmlab.config import Strict
from lmlab.errors import UserError

if TYPE_CHECKING:
    from lmlab.data.puzzles.format import PuzzleSplit

VOCAB = ["<pad>"] + [str(d) for d in range(10)]
SEQ_LEN = 81
HEADER = ("source", "question", "answer", "rating")
HF_REPO = "sapientinc/sudoku-extreme"

# ----------------------------------------------------------------------------- geometry

ALL = 0x1FF  # the 9 candidate bits
POP = [bin(m).count("1") for m in range(512)]
DIGIT_OF = [0] * 512  # single bit -> digit
for _d in range(1, 10):
    DIGIT_OF[1 << (_d - 1)] = _d
BITS_OF = [tuple(1 << k for k in range(9) if m >> k & 1) for m in range(512)]
UNITS: tuple[tuple[int, ...], ...] = tuple(
    [tuple(r * 9 + c for c in range(9)) for r in range(9)]
    + [tuple(r * 9 + c for r in range(9)) for c in range(9)]
    + [tuple((br + r) * 9 + bc + c for r in range(3) for c in range(3)) for br in (0, 3, 6) for bc in (0, 3, 6)])
PEERS: tuple[tuple[int, ...], ...] = tuple(
    tuple(sorted({p for u in UNITS if c in u for p in u} - {c})) for c in range(81))
_UNIT_INDEX = np.array(UNITS, dtype=np.int64)  # (27, 9)


def cells(grid: str | Sequence[int] | np.ndarray) -> list[int]:
    """A grid as 81 ints 0-9 (0 = blank), from a string ('0' or '.' = blank) or a sequence."""
    if isinstance(grid, str):
        if len(grid) != 81:
            raise ValueError(f"a grid has 81 cells, got {len(grid)} characters")
        out = [0 if ch == "." else ord(ch) - 48 for ch in grid]
    else:
        out = [int(v) for v in np.asarray(grid).reshape(-1)]
        if len(out) != 81:
            raise ValueError(f"a grid has 81 cells, got {len(out)}")
    if any(v < 0 or v > 9 for v in out):
        raise ValueError("cells must be digits 0-9 (0 = blank)")
    return out


def to_str(grid: Sequence[int]) -> str:
    return "".join(chr(48 + v) for v in grid)


def givens(grid: str | Sequence[int]) -> int:
    """The number of given (non-blank) cells."""
    return sum(1 for v in cells(grid) if v)


# ----------------------------------------------------------------------------- solver

@dataclass
class SolveResult:
    solutions: list[str]  # up to `limit`, as 81-digit strings
    guesses: int = 0  # trial assignments at branch points
    backtracks: int = 0  # trials refuted by propagation (dead ends)

    @property
    def count(self) -> int:
        return len(self.solutions)

    @property
    def unique(self) -> bool:
        return len(self.solutions) == 1


def _propagate(cand: list[int], queue: list[int]) -> bool:
    """Naked and hidden singles until a fixed point; False on a contradiction. `queue` holds the
    cells that became single and whose digit is not yet removed from their peers."""
    pop, peers = POP, PEERS
    while True:
        while queue:
            c = queue.pop()
            b = cand[c]
            nb = ~b
            for p in peers[c]:
                m = cand[p]
                if m & b:
                    m &= nb
                    if not m:
                        return False
                    cand[p] = m
                    if pop[m] == 1:
                        queue.append(p)
        for unit in UNITS:
            once = twice = 0
            for c in unit:
                m = cand[c]
                twice |= once & m
                once |= m
            if once != ALL:
                return False  # a digit has no place left in this unit
            only = once & ~twice
            if only:
                for c in unit:
                    m = cand[c]
                    h = m & only
                    if h and m != h:
                        if pop[h] > 1:
                            return False  # two digits need this one cell
                        cand[c] = h
                        queue.append(c)
        if not queue:
            return True


def _search(cand: list[int], limit: int, out: list[list[int]], stats: SolveResult,
            rng: Optional[random.Random]) -> None:
    best, best_n = -1, 10
    for c in range(81):
        n = POP[cand[c]]
        if 1 < n < best_n:
            best, best_n = c, n
            if n == 2:
                break
    if best < 0:
        out.append(cand)
        return
    bits = list(BITS_OF[cand[best]])
    if rng is not None:
        rng.shuffle(bits)
    for b in bits:
        stats.guesses += 1
        trial = cand[:]
        trial[best] = b
        if _propagate(trial, [best]):
            _search(trial, limit, out, stats, rng)
            if len(out) >= limit:
                return
        else:
            stats.backtracks += 1


def _start(grid: Sequence[int]) -> tuple[list[int], list[int]]:
    cand = [ALL] * 81
    queue = []
    for i, v in enumerate(grid):
        if v:
            cand[i] = 1 << (v - 1)
            queue.append(i)
    return cand, queue


def _run(cand: list[int], queue: list[int], limit: int, rng: Optional[random.Random]) -> SolveResult:
    stats = SolveResult([])
    found: list[list[int]] = []
    if _propagate(cand, queue):
        _search(cand, limit, found, stats, rng)
    else:
        stats.backtracks += 1
    stats.solutions = [to_str([DIGIT_OF[m] for m in s]) for s in found]
    return stats


def solve(grid: str | Sequence[int], limit: int = 2, rng: Optional[random.Random] = None) -> SolveResult:
    """Up to `limit` solutions of `grid` with the search statistics (deterministic without `rng`;
    with it, the digits at each branch are tried in a random order)."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    cand, queue = _start(cells(grid))
    return _run(cand, queue, limit, rng)


def rating(grid: str | Sequence[int]) -> int:
    """Difficulty: the backtracks of the deterministic solver proving uniqueness (see the module doc)."""
    return solve(grid, limit=2).backtracks


def _has_other_solution(grid: list[int], i: int, digit: int) -> bool:
    """Whether `grid` (cell i blank) has a solution with a digit other than `digit` at cell i."""
    cand, queue = _start(grid)
    cand[i] = ALL & ~(1 << (digit - 1))
    return _run(cand, queue, 1, None).count > 0


# ----------------------------------------------------------------------------- validity

class InvalidSudoku(ValueError):
    """A puzzle/solution pair that is not a valid Sudoku with that solution."""


def _problems(puzzles: np.ndarray, solutions: np.ndarray) -> list[Optional[str]]:
    """Per row of (N, 81) int arrays: None, or what is wrong."""
    n = puzzles.shape[0]
    out: list[Optional[str]] = [None] * n
    if n == 0:
        return out
    p = puzzles.astype(np.int64)
    s = solutions.astype(np.int64)
    bad_range = (p < 0).any(1) | (p > 9).any(1)
    incomplete = (s < 1).any(1) | (s > 9).any(1)
    masks = np.where((s >= 1) & (s <= 9), 1 << np.clip(s - 1, 0, 8), 0)
    unit_or = np.bitwise_or.reduce(masks[:, _UNIT_INDEX], axis=2)  # (N, 27)
    invalid = (unit_or != ALL).any(1)
    disagree = ((p != 0) & (p != s)).any(1)
    for k in np.flatnonzero(bad_range | incomplete | invalid | disagree):
        if bad_range[k]:
            out[k] = "the puzzle has cells outside 0-9"
        elif incomplete[k]:
            out[k] = "the answer is not a complete grid of digits 1-9"
        elif invalid[k]:
            u = int(np.flatnonzero(unit_or[k] != ALL)[0])
            where = ("row", "column", "box")[u // 9]
            out[k] = f"the answer is not a valid Sudoku (a digit repeats in {where} {u % 9 + 1})"
        else:
            c = int(np.flatnonzero((p[k] != 0) & (p[k] != s[k]))[0])
            out[k] = (f"the answer contradicts a given: row {c // 9 + 1} column {c % 9 + 1} is "
                      f"{p[k, c]} in the question but {s[k, c]} in the answer")
    return out


def validate(puzzle: str | Sequence[int], solution: str | Sequence[int]) -> None:
    """Raise InvalidSudoku unless `solution` is a valid complete Sudoku that agrees with every
    given of `puzzle` (uniqueness is the solver's business, not checked here)."""
    try:
        p, s = cells(puzzle), cells(solution)
    except ValueError as e:
        raise InvalidSudoku(str(e)) from None
    problem = _problems(np.array([p]), np.array([s]))[0]
    if problem:
        raise InvalidSudoku(problem)


# ----------------------------------------------------------------------------- puzzle lists

@dataclass
class Puzzles:
    """Puzzles of one split as parallel lists (81-digit strings, '0' = blank)."""

    puzzles: list[str] = field(default_factory=list)
    solutions: list[str] = field(default_factory=list)
    ratings: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.puzzles)

    def append(self, puzzle: str, solution: str, rating_: float) -> None:
        self.puzzles.append(puzzle)
        self.solutions.append(solution)
        self.ratings.append(float(rating_))

    def subset(self, indices: Iterable[int]) -> "Puzzles":
        idx = list(indices)
        return Puzzles([self.puzzles[i] for i in idx], [self.solutions[i] for i in idx],
                       [self.ratings[i] for i in idx])


def _seed(*parts) -> int:
    """A 64-bit seed from parts (stable across runs and Python versions)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


# ----------------------------------------------------------------------------- generator

def full_grid(rng: random.Random) -> str:
    """A random complete Sudoku grid."""
    return solve([0] * 81, limit=1, rng=rng).solutions[0]


def dig(solution: str, target_blanks: int, rng: random.Random) -> str:
    """Blank cells of `solution` in a random order while the solution stays unique, until
    `target_blanks` are blank or no cell can be blanked (returns the puzzle)."""
    grid = cells(solution)
    order = list(range(81))
    rng.shuffle(order)
    blanks = 0
    for i in order:
        if blanks >= target_blanks:
            break
        digit = grid[i]
        grid[i] = 0
        if _has_other_solution(grid, i, digit):
            grid[i] = digit
        else:
            blanks += 1
    return to_str(grid)


def generate_one(rng: random.Random, blanks: tuple[int, int], min_rating: Optional[float] = None,
                 max_rating: Optional[float] = None, max_attempts: int = 100) -> tuple[str, str, int]:
    """(puzzle, solution, rating): a puzzle with a unique solution and lo..hi blanks (a target
    drawn uniformly), rated within the bounds; UserError after `max_attempts` failed draws."""
    lo, hi = blanks
    reached = []
    for _ in range(max_attempts):
        solution = full_grid(rng)
        puzzle = dig(solution, rng.randint(lo, hi), rng)
        n_blank = puzzle.count("0")
        if n_blank < lo:
            reached.append(n_blank)
            continue
        check = solve(puzzle, limit=2)
        if not check.unique or check.solutions[0] != solution:  # the digging guarantees it: a bug otherwise
            raise RuntimeError(f"generated Sudoku {puzzle} does not have the unique solution {solution}")
        validate(puzzle, solution)
        r = check.backtracks
        if (min_rating is not None and r < min_rating) or (max_rating is not None and r > max_rating):
            reached.append(n_blank)
            continue
        return puzzle, solution, r
    what = []
    if reached and max(reached) < lo:
        what.append(f"the most blanks reached was {max(reached)} of the {lo} asked (blanks={list(blanks)})")
    if min_rating is not None or max_rating is not None:
        what.append(f"ratings must lie in [{min_rating}, {max_rating}]")
    raise UserError(f"sudoku: no puzzle met the constraints in {max_attempts} attempts ("
                    + "; ".join(what or ["constraints too strict"])
                    + "); lower `blanks`, widen `min_rating`/`max_rating` or raise `max_attempts`")


def generate(n: int, seed: int = 0, split: str = "train", blanks: tuple[int, int] = (30, 40),
             min_rating: Optional[float] = None, max_rating: Optional[float] = None,
             max_attempts: int = 100, show_progress: bool = True) -> Puzzles:
    """n puzzles; puzzle i is a function of (seed, split, i) only."""
    from lmlab.runtime import progress

    out = Puzzles()
    with progress(n, desc=f"sudoku: generate {split}", unit="puzzle", disable=not show_progress) as bar:
        for i in range(n):
            rng = random.Random(_seed("sudoku", seed, split, i))
            out.append(*generate_one(rng, tuple(blanks), min_rating, max_rating, max_attempts))
            bar.update(1)
    return out


# ----------------------------------------------------------------------------- augmentation

def _transforms(k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k random symmetries: (index (k, 81): new cell j takes old cell index[j]; digit map (k, 10))."""
    digit_map = np.zeros((k, 10), dtype=np.int64)
    digit_map[:, 1:] = rng.permuted(np.tile(np.arange(1, 10), (k, 1)), axis=1)
    transpose = rng.random(k) < 0.5

    def line_perm() -> np.ndarray:  # (k, 9): shuffled groups of three, shuffled inside each group
        groups = rng.permuted(np.tile(np.arange(3), (k, 1)), axis=1)
        inner = rng.permuted(np.tile(np.arange(3), (k * 3, 1)), axis=1).reshape(k, 3, 3)
        return (groups[:, :, None] * 3 + inner).reshape(k, 9)

    rows, cols = line_perm(), line_perm()
    mapping = rows[:, :, None] * 9 + cols[:, None, :]  # (k, 9, 9): from the (possibly transposed) grid
    mapping = mapping.reshape(k, 81)
    flipped = (mapping % 9) * 9 + mapping // 9  # the same cell of the transposed grid
    index = np.where(transpose[:, None], flipped, mapping)
    return index, digit_map


def augment_many(puzzle: str | Sequence[int], solution: str | Sequence[int], k: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k augmented copies of (puzzle, solution): two (k, 81) int arrays of cell values 0-9."""
    p = np.asarray(cells(puzzle), dtype=np.int64)
    s = np.asarray(cells(solution), dtype=np.int64)
    index, digit_map = _transforms(k, rng)
    rows = np.arange(k)[:, None]
    return digit_map[rows, p[index]], digit_map[rows, s[index]]


def augment(puzzle: str | Sequence[int], solution: str | Sequence[int],
            rng: np.random.Generator) -> tuple[str, str]:
    """One augmented copy, as 81-digit strings (the official shuffle_sudoku)."""
    p, s = augment_many(puzzle, solution, 1, rng)
    return to_str(p[0].tolist()), to_str(s[0].tolist())


# ----------------------------------------------------------------------------- CSV import

class _RowError(Exception):
    pass


def _row(fields: list[str], cols: dict[str, int]) -> tuple[str, str, str, float]:
    if len(fields) != len(cols):
        raise _RowError(f"has {len(fields)} fields, expected {len(cols)} ({','.join(cols)})")
    q, a = fields[cols["question"]].strip(), fields[cols["answer"]].strip()
    src = fields[cols["source"]] if "source" in cols else ""
    for name, v, alphabet in (("question", q, "0123456789."), ("answer", a, "0123456789.")):
        if len(v) != 81:
            raise _RowError(f"the {name} has {len(v)} characters, expected 81")
        bad = set(v) - set(alphabet)
        if bad:
            raise _RowError(f"the {name} has the character {sorted(bad)[0]!r} (allowed: digits, '.' or '0' = blank)")
    r = float("nan")
    if "rating" in cols:
        raw = fields[cols["rating"]].strip()
        if raw:
            try:
                r = float(raw)
            except ValueError:
                raise _RowError(f"the rating {raw!r} is not a number") from None
    return src, q.replace(".", "0"), a.replace(".", "0"), r


def read_csv(path: str | Path, on_error: Literal["stop", "skip"] = "stop", *, n: Optional[int] = None,
             min_rating: Optional[float] = None, max_rating: Optional[float] = None,
             rating_from: Literal["file", "solver"] = "file", seed: int = 0,
             split: str = "train", show_progress: bool = True) -> tuple[Puzzles, dict]:
    """Puzzles of a Sudoku-Extreme CSV (`source,question,answer,rating`, a header line first)
    and statistics. Every row is checked (81 characters, the alphabet, a valid complete answer
    that agrees with every given); a bad row stops with a UserError naming the file and line
    (`on_error="stop"`) or is skipped and counted (`"skip"`). `rating_from="solver"` rates with
    our solver instead and also refuses puzzles without a unique solution. Then the rating
    filter, then a seeded subsample of `n` rows (in file order)."""
    from lmlab.runtime import progress

    path = Path(path)
    if not path.is_file():
        raise UserError(f"sudoku: CSV file not found: {path} (give the path of a Sudoku-Extreme style CSV, "
                        "or `source: generate`)")
    skipped: list[str] = []
    sources: dict[str, int] = {}
    out = Puzzles()
    batch: list[tuple[int, str, str, float, str]] = []

    def bad(line: int, problem: str) -> None:
        msg = f"{path} line {line}: {problem}"
        if on_error == "stop":
            raise UserError(msg + " (fix the row, or set on_error=skip to skip bad rows)")
        skipped.append(msg)

    def flush() -> None:
        if not batch:
            return
        p = np.frombuffer("".join(b[1] for b in batch).encode(), dtype=np.uint8).reshape(-1, 81) - 48
        s = np.frombuffer("".join(b[2] for b in batch).encode(), dtype=np.uint8).reshape(-1, 81) - 48
        for (line, q, a, r, src), problem in zip(batch, _problems(p, s)):
            if problem is None and rating_from == "solver":
                check = solve(q, limit=2)
                if not check.unique:
                    problem = f"the question has {'no' if not check.count else 'more than one'} solution"
                r = float(check.backtracks)
            if problem is not None:
                bad(line, problem)
                continue
            if (min_rating is not None and not r >= min_rating) or (max_rating is not None and not r <= max_rating):
                continue
            out.append(q, a, r)
            sources[src] = sources.get(src, 0) + 1
        batch.clear()

    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise UserError(f"sudoku: cannot read {path} ({e.strerror}); check the path and permissions") from None
    rows = 0
    with f, progress(None, desc=f"sudoku: read {path.name}", unit="row", disable=not show_progress) as bar:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise UserError(f"{path} line 1: the file is empty; expected the header {','.join(HEADER)}")
            names = [h.strip().lower() for h in header]
            if "question" not in names or "answer" not in names or len(set(names)) != len(names):
                raise UserError(f"{path} line 1: the header is missing or wrong (found {','.join(header)[:120]!r}); "
                                f"the first line must be {','.join(HEADER)}")
            cols = {name: i for i, name in enumerate(names)}
            for fields in reader:
                line = reader.line_num
                if not fields:
                    continue
                rows += 1
                try:
                    src, q, a, r = _row(fields, cols)
                except _RowError as e:
                    bad(line, str(e))
                    continue
                batch.append((line, q, a, r, src))
                if len(batch) >= 4096:
                    bar.update(len(batch))
                    flush()
            bar.update(len(batch))
            flush()
        except (csv.Error, UnicodeDecodeError) as e:
            raise UserError(f"{path} line {reader.line_num}: not readable as CSV ({e}); "
                            "give a UTF-8 CSV file with the header " + ",".join(HEADER)) from None
    if skipped:
        print(f"sudoku: skipped {len(skipped)} bad rows of {path} (first: {skipped[0]})", file=sys.stderr)
    kept = len(out)
    if n is not None and n < len(out):
        rng = np.random.default_rng(_seed("sudoku-subsample", seed, split))
        idx = np.sort(rng.choice(len(out), size=n, replace=False))
        out = out.subset(idx.tolist())
    if not len(out):
        raise UserError(f"sudoku: no puzzle left from {path} ({rows} rows, {len(skipped)} skipped, "
                        f"{kept} within the rating filter); check the file and `min_rating`/`max_rating`")
    stats = {"path": str(path), "rows": rows, "skipped": len(skipped), "skipped_first": skipped[:5],
             "after_rating_filter": kept, "kept": len(out), "sources": sources}
    return out, stats


def download(repo: str, filename: str) -> Path:
    """A file of a Hugging Face dataset repository (cached by huggingface_hub), or a UserError."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise UserError("sudoku: `source: hf` needs huggingface_hub (pip install huggingface_hub), "
                        "or pass a local csv with `source: csv` and `path`") from None
    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset"))
    except Exception as e:  # offline, unknown repo or file, HTTP errors: all the same advice
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"sudoku: the Hugging Face hub could not be reached for {repo}/{filename} ({reason}); "
                        f"download it elsewhere and pass the local csv instead: source=csv path=FILE.csv") from None


# ----------------------------------------------------------------------------- arrays

def to_split(puzzles: Puzzles, augment: int = 0, seed: int = 0, split: str = "train") -> "PuzzleSplit":
    """The official arrays: per original puzzle one group of 1 + `augment` puzzles (the original
    first), one example each, identifier 0; tokens = cell value + 1; ratings per puzzle."""
    from lmlab.data.puzzles.format import PuzzleSplit

    n, per = len(puzzles), 1 + augment
    if n == 0:
        raise UserError(f"sudoku: the {split} split has no puzzles")
    orig_p = np.frombuffer("".join(puzzles.puzzles).encode(), dtype=np.uint8).reshape(n, 81) - 48
    orig_s = np.frombuffer("".join(puzzles.solutions).encode(), dtype=np.uint8).reshape(n, 81) - 48
    inputs = np.empty((n, per, 81), dtype=np.uint8)
    labels = np.empty((n, per, 81), dtype=np.uint8)
    inputs[:, 0], labels[:, 0] = orig_p, orig_s
    for i in range(n) if augment else ():
        rng = np.random.default_rng(_seed("sudoku-augment", seed, split, i))
        inputs[i, 1:], labels[i, 1:] = augment_many(orig_p[i], orig_s[i], augment, rng)
    total = n * per
    return PuzzleSplit(
        inputs=inputs.reshape(total, 81) + 1,
        labels=labels.reshape(total, 81) + 1,
        puzzle_identifiers=np.zeros(total, dtype=np.int32),
        puzzle_indices=np.arange(total + 1, dtype=np.int32),
        group_indices=np.arange(0, total + 1, per, dtype=np.int32),
        ratings=np.repeat(np.asarray(puzzles.ratings, dtype=np.float32), per),
    )


# ----------------------------------------------------------------------------- the stage's part

class Source(Strict):
    source: Literal["generate", "csv", "hf"] = Field("generate", description="generate: seeded generator; csv: a "
                                                     "local Sudoku-Extreme CSV (`path`); hf: download from `repo`")
    path: Optional[str] = Field(None, description="csv: the file; hf: the file in the repo (default train.csv / test.csv)")
    repo: str = Field(HF_REPO, description="hf: the dataset repository")
    n: Optional[int] = Field(None, ge=1, description="generate: how many puzzles (default 1000 train, 200 test); "
                             "csv/hf: a seeded subsample of this many rows (default all)")
    blanks: list[int] = Field(default_factory=lambda: [30, 40], description="generate: [min, max] blank cells "
                              "(a target drawn uniformly per puzzle; at most 64, above ~58 gets slow and rare)")
    min_rating: Optional[float] = Field(None, description="keep only puzzles rated at least this (generate: our "
                                        "solver's backtracks; imports: the file's rating column unless rating=solver)")
    max_rating: Optional[float] = Field(None, description="keep only puzzles rated at most this")
    rating: Literal["file", "solver"] = Field("file", description="csv/hf: the ratings to keep: the file's `rating` "
                                              "column, or our solver's (which also checks uniqueness; slower)")
    max_attempts: int = Field(100, ge=1, description="generate: draws per puzzle before giving up on the constraints")

    @model_validator(mode="after")
    def _check(self) -> "Source":
        if len(self.blanks) != 2 or not 0 <= self.blanks[0] <= self.blanks[1] <= 64:
            raise ValueError(f"blanks must be [min, max] with 0 <= min <= max <= 64 (a unique Sudoku has at least "
                             f"17 givens), got {self.blanks}")
        if self.source == "csv" and not self.path:
            raise ValueError("source csv needs `path` (the CSV file)")
        return self


class Config(Strict):
    train: Source = Field(default_factory=Source, description="where the train puzzles come from")
    test: Source = Field(default_factory=Source, description="where the test puzzles come from")
    augment: int = Field(0, ge=0, description="augmented copies per train puzzle (the paper: 1000); test: none")


DEFAULT_N = {"train": 1000, "test": 200}


def inputs(cfg: Config) -> dict[str, str]:
    """The local files the build reads ({name: path}), for the stage's fingerprint and out check."""
    return {f"sudoku {name} csv": src.path for name, src in (("train", cfg.train), ("test", cfg.test))
            if src.source == "csv" and src.path}


def load(src: Source, split: str, seed: int, on_error: str) -> tuple[Puzzles, dict]:
    """The puzzles of one split and their statistics."""
    if src.source == "generate":
        n = src.n or DEFAULT_N.get(split, 200)
        puz = generate(n, seed, split, (src.blanks[0], src.blanks[1]), src.min_rating, src.max_rating,
                       src.max_attempts)
        return puz, {"source": "generate", "n": n, "blanks_asked": src.blanks}
    path = Path(src.path) if src.source == "csv" else download(src.repo, src.path or f"{split}.csv")
    puz, stats = read_csv(path, on_error, n=src.n, min_rating=src.min_rating, max_rating=src.max_rating,
                          rating_from=src.rating, seed=seed, split=split)
    return puz, {"source": src.source, **({"repo": src.repo} if src.source == "hf" else {}), **stats}


def build(cfg: Config, seed: int, on_error: str) -> dict:
    """The puzzle set of `cfg` (the kind-module contract of lmlab.data.puzzles.stage)."""
    splits, stats, originals = {}, {}, {}
    for name, src in (("train", cfg.train), ("test", cfg.test)):
        puz, s = load(src, name, seed, on_error)
        zeros = [p.count("0") for p in puz.puzzles]
        s.update(puzzles=len(puz), blanks={"min": min(zeros), "mean": round(sum(zeros) / len(zeros), 2),
                                           "max": max(zeros)})
        splits[name] = to_split(puz, cfg.augment if name == "train" else 0, seed, name)
        stats[name] = s
        originals[name] = puz
    overlap = len(set(originals["train"].puzzles) & set(originals["test"].puzzles))
    stats["train_test_overlap"] = overlap
    if overlap:
        print(f"sudoku: warning: {overlap} test puzzles also appear in the train split", file=sys.stderr)
    return {
        "info": {"encoding": "cell value v (0 = blank, 1-9 = digit) -> token v + 1; labels = the full solution",
                 "augment": cfg.augment, "sources": {n: stats[n]["source"] for n in splits}},
        "vocab": list(VOCAB),
        "grid": [9, 9],
        "splits": splits,
        "identifiers": ["<blank>"],
        "test_puzzles": None,
        "stats": stats,
    }
