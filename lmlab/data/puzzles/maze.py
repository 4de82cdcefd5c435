"""Mazes in the official Maze-Hard layout: generated here (seeded) or imported from CSV.

A maze is a square grid of characters from CHARSET = "# SGo": '#' wall, ' ' open, 'S' start,
'G' goal. The question has no 'o'; the answer is the question with the cells of the shortest
path from S to G (S and G excluded) turned into 'o'. Token ids are the index in CHARSET plus
one (pad 0): vocab ["<pad>", "#", " ", "S", "G", "o"], vocab_size 6, seq_len size * size
(900 for the official 30x30), one puzzle identifier (0, "<blank>").

Each maze is one puzzle and one group; with `aug` the train split holds its 8 dihedral
transforms as 8 puzzles of one group (the official builder's `aug` flag), the test split never.
A maze's rating is its shortest path length in moves (= the number of 'o' cells + 1).

Every maze, generated or imported, goes through `check_maze`: the stated size, the alphabet,
one S and one G, the answer equal to the question except open cells marked 'o', a path from S
to G, the 'o' cells plus S and G one connected path, and that path a shortest one.

    generate   randomised depth-first spanning tree on the cells of even coordinates, then a
               fraction `loops` of the remaining walls between cells opened (several routes, so
               the task is shortest-path search, not corridor following); the goal is the far
               end of a double BFS sweep, the start a random cell at least `min_path_length`
               moves away (and at least 4/5 of the farthest) whose shortest path is unique.
    csv        `source,question,answer,rating` rows (the HF sapientinc/maze-30x30-hard-1k files
               train.csv and test.csv), from a local directory or `source: hf`.
"""

from __future__ import annotations

import csv
import sys
from collections import deque
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import Field, field_validator

from lmlab.config import Strict
from lmlab.data.puzzles.format import PuzzleSplit
from lmlab.errors import UserError

CHARSET = "# SGo"
VOCAB = ["<pad>", "#", " ", "S", "G", "o"]
HF_REPO = "sapientinc/maze-30x30-hard-1k"
HEADER = ["source", "question", "answer", "rating"]
HARD_SIZE, HARD_MIN_PATH = 30, 110  # Maze-Hard: 30x30, shortest paths of more than 110 moves
FAR = 0.8  # the start is at least this fraction of the farthest distance from the goal
MAX_TRIES = 200  # fresh mazes drawn for one accepted maze before giving up
MAX_REASONS = 5

_CHAR2ID = np.zeros(256, np.uint8)
_CHAR2ID[np.frombuffer(CHARSET.encode(), np.uint8)] = np.arange(1, len(CHARSET) + 1)
_ID2CHAR = np.frombuffer(("\0" + CHARSET).encode(), np.uint8)


class Config(Strict):
    source: str = Field("generate", description="'generate' (seeded mazes made here), 'hf' (download "
                        "train.csv / test.csv of `hf_repo`), or a local directory holding train.csv and test.csv "
                        "in the `source,question,answer,rating` layout")
    hf_repo: str = Field(HF_REPO, description="the Hugging Face dataset repository read by source: hf")
    size: int = Field(HARD_SIZE, ge=3, le=64, description="side of the square grid (Maze-Hard: 30); imported "
                      "mazes must have this size")
    n_train: Optional[int] = Field(None, ge=1, description="mazes in the train split: generated (default 1000) or, "
                                   "when importing, a seeded random subsample (the official subsample_size; "
                                   "default all rows)")
    n_test: Optional[int] = Field(None, ge=1, description="mazes in the test split: generated (default 1000) or the "
                                  "first n rows of test.csv (default all rows)")
    min_path_length: Optional[int] = Field(None, ge=1, description="generate: keep mazes whose shortest path has at "
                                           "least this many moves (default: 110 at size 30, the Maze-Hard level, "
                                           "scaled by area for other sizes)")
    loops: float = Field(0.05, ge=0.0, le=1.0, description="generate: fraction of the walls left between cells by "
                         "the spanning tree that are opened, making loops (0: a perfect maze, one route)")
    aug: bool = Field(False, description="add the 8 dihedral transforms of each train maze (the official `aug`)")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("source is empty; use 'generate', 'hf' or a directory with train.csv and test.csv")
        return v


def default_min_path_length(size: int) -> int:
    """Maze-Hard's 110 moves at 30x30, scaled by the grid's area."""
    return max(1, round(HARD_MIN_PATH * size * size / (HARD_SIZE * HARD_SIZE)))


# ---------------------------------------------------------------------------------------------
# Checking


def bfs(open_cells: np.ndarray, start: int, count: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Distances (in moves, -1 = unreachable) from flat index `start` over the True cells of the
    square bool grid `open_cells`, flat; with `count`, also the number of shortest paths to each
    cell, capped at 2 (the BFS layer DP: a cell's count is the sum of its neighbours' one layer closer)."""
    size = open_cells.shape[0]
    w = size + 2  # a wall border: no bounds checks in the loop
    free = np.pad(open_cells, 1).reshape(-1).tolist()
    dist = [-1] * (w * w)
    cnt = [0] * (w * w)
    s = (start // size + 1) * w + start % size + 1
    dist[s], cnt[s] = 0, 1
    queue = deque([s])
    steps = (-w, w, -1, 1)
    while queue:
        u = queue.popleft()
        du = dist[u] + 1
        for v in (u + d for d in steps):
            if not free[v]:
                continue
            if dist[v] < 0:
                dist[v], cnt[v] = du, cnt[u]
                queue.append(v)
            elif count and dist[v] == du and cnt[v] < 2:
                cnt[v] = min(2, cnt[v] + cnt[u])
    inner = np.s_[1:-1, 1:-1]
    d = np.array(dist, np.int32).reshape(w, w)[inner].reshape(-1)
    return d, (np.array(cnt, np.int8).reshape(w, w)[inner].reshape(-1) if count else None)


def check_maze(question: str, answer: str, size: int) -> tuple[int, bool]:
    """(shortest path length in moves, whether that shortest path is unique) of a valid maze;
    a ValueError with the reason for an invalid one."""
    n = size * size
    for name, s in (("question", question), ("answer", answer)):
        if len(s) != n:
            raise ValueError(f"the {name} has {len(s)} characters, a {size}x{size} maze has {n}"
                             + (f" (it looks like a {round(len(s) ** 0.5)}x{round(len(s) ** 0.5)} grid: set size)"
                                if len(s) > 0 and round(len(s) ** 0.5) ** 2 == len(s) else ""))
    for name, s, allowed in (("question", question, "# SG"), ("answer", answer, CHARSET)):
        bad = next((i for i, ch in enumerate(s) if ch not in allowed), None)
        if bad is not None:
            raise ValueError(f"the {name} has {s[bad]!r} at row {bad // size}, column {bad % size}; "
                             f"allowed: {' '.join(repr(ch) for ch in allowed)}")
    for mark in "SG":
        k = question.count(mark)
        if k != 1:
            raise ValueError(f"the question has {k} '{mark}' cells, a maze has exactly one")
    for i, (q, a) in enumerate(zip(question, answer)):
        if q != a and not (q == " " and a == "o"):
            raise ValueError(f"the answer differs from the question at row {i // size}, column {i % size} "
                             f"({q!r} -> {a!r}); only open cells may change, into 'o'")
    grid = np.frombuffer(question.encode(), np.uint8).reshape(size, size)
    s, g = question.index("S"), question.index("G")
    dist, cnt = bfs(grid != ord("#"), s, count=True)
    if dist[g] < 0:
        raise ValueError("there is no path from S to G (the goal cannot be reached)")
    on_path = np.frombuffer(answer.encode(), np.uint8).reshape(size, size)
    on_path = (on_path == ord("o")) | (on_path == ord("S")) | (on_path == ord("G"))
    reach, _ = bfs(on_path, s)
    k = int(on_path.sum())
    if reach[g] < 0 or int((reach >= 0).sum()) != k:
        raise ValueError(f"the 'o' cells do not form one connected path from S to G "
                         f"({int((reach >= 0).sum())} of its {k} cells are connected to S"
                         + (", G is not)" if reach[g] < 0 else ")"))
    if k - 1 != dist[g]:
        raise ValueError(f"the 'o' path has {k - 1} moves but the shortest path from S to G has {int(dist[g])}; "
                         "the answer must mark a shortest path")
    return int(dist[g]), bool(cnt[g] == 1)


# ---------------------------------------------------------------------------------------------
# Generating


def _spanning_tree(rng: np.random.Generator, size: int) -> np.ndarray:
    """A randomised depth-first spanning tree on the cells of even coordinates; True = open."""
    k = (size + 1) // 2
    grid = np.zeros((size, size), bool)
    grid[0::2, 0::2] = True
    visited = np.zeros(k * k, bool)
    steps = ((-1, 0), (1, 0), (0, -1), (0, 1))
    start = int(rng.integers(k * k))
    visited[start] = True
    stack = [start]
    draws = rng.random(4 * k * k).tolist()  # one draw per step: cheaper than a call each
    j = 0
    while stack:
        u = stack[-1]
        r, c = divmod(u, k)
        options = [(r + dr, c + dc) for dr, dc in steps
                   if 0 <= r + dr < k and 0 <= c + dc < k and not visited[(r + dr) * k + c + dc]]
        if not options:
            stack.pop()
            continue
        if j == len(draws):
            draws, j = rng.random(4 * k * k).tolist(), 0
        nr, nc = options[int(draws[j] * len(options))]
        j += 1
        grid[r + nr, c + nc] = True  # the wall between cells (r, c) and (nr, nc), at grid (2r, 2c) and (2nr, 2nc)
        visited[nr * k + nc] = True
        stack.append(nr * k + nc)
    return grid


def _open_loops(rng: np.random.Generator, grid: np.ndarray, loops: float) -> None:
    """Open a fraction `loops` of the closed walls that separate two cells."""
    size = grid.shape[0]
    walls = np.zeros_like(grid)
    walls[0::2, 1::2] = True  # between horizontal neighbours
    walls[1::2, 0::2] = True  # between vertical neighbours
    if size % 2 == 0:  # the last row / column holds no cells: its walls separate nothing
        walls[-1, :] = walls[:, -1] = False
    closed = np.flatnonzero(walls & ~grid)
    n = int(round(loops * closed.size))
    if n:
        grid.reshape(-1)[rng.choice(closed, size=n, replace=False)] = True


def generate_maze(rng: np.random.Generator, size: int, min_path_length: int, loops: float
                  ) -> tuple[str, str, int] | None:
    """One maze (question, answer, shortest path length), or None when this draw has no start far
    enough from the goal with a unique shortest path (draw again)."""
    grid = _spanning_tree(rng, size)
    _open_loops(rng, grid, loops)
    cells = np.flatnonzero(grid)
    d0, _ = bfs(grid, int(rng.choice(cells)))
    far0 = np.flatnonzero(d0 == d0.max())
    goal = int(far0[rng.integers(far0.size)])
    dist, cnt = bfs(grid, goal, count=True)
    need = max(min_path_length, int(np.ceil(FAR * dist.max())))
    candidates = np.flatnonzero((dist >= need) & (cnt == 1))
    if candidates.size == 0:
        return None
    start = int(candidates[rng.integers(candidates.size)])
    chars = np.where(grid, ord(" "), ord("#")).astype(np.uint8).reshape(-1)
    answer = chars.copy()
    u = start  # walk back along strictly decreasing distances: the unique shortest path
    while dist[u] > 1:
        r, c = divmod(u, size)
        u = next(v for v, ok in ((u - size, r > 0), (u + size, r < size - 1), (u - 1, c > 0), (u + 1, c < size - 1))
                 if ok and dist[v] == dist[u] - 1)
        answer[u] = ord("o")
    for a in (chars, answer):
        a[start], a[goal] = ord("S"), ord("G")
    return chars.tobytes().decode(), answer.tobytes().decode(), int(dist[start])


def generate(n: int, size: int, min_path_length: int, loops: float, seed: int, stream: int = 0,
             exclude: set | None = None, desc: str = "mazes") -> list[tuple[str, str, int]]:
    """`n` distinct checked mazes with unique shortest paths of at least `min_path_length` moves,
    a pure function of the arguments (`stream` separates the splits; `exclude`: questions to avoid)."""
    from lmlab.runtime import progress

    rng = np.random.default_rng([seed, stream])
    seen = set(exclude or ())
    out: list[tuple[str, str, int]] = []
    with progress(n, desc=desc, unit="maze") as bar:
        while len(out) < n:
            for _ in range(MAX_TRIES):
                maze = generate_maze(rng, size, min_path_length, loops)
                if maze is not None and maze[0] not in seen:
                    break
            else:
                raise UserError(f"maze generation found no {size}x{size} maze with a unique shortest path of at "
                                f"least {min_path_length} moves in {MAX_TRIES} draws; lower min_path_length "
                                f"(or loops), or raise size")
            length, unique = check_maze(maze[0], maze[1], size)  # a failure here is a bug, not bad input
            assert unique and length == maze[2] >= min_path_length, "maze generator produced an invalid maze"
            seen.add(maze[0])
            out.append(maze)
            bar.update(1)
    return out


# ---------------------------------------------------------------------------------------------
# Importing


def _csv_path(cfg: Config, split: str) -> tuple[Path, str]:
    """(local file, how to name it in messages)."""
    if cfg.source == "hf":
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo_id=cfg.hf_repo, filename=f"{split}.csv", repo_type="dataset")), \
                f"{cfg.hf_repo}/{split}.csv"
        except Exception as e:  # no network, no such repository, no huggingface_hub ...
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot download {split}.csv of the dataset {cfg.hf_repo} from the Hugging Face Hub "
                            f"({msg}); download train.csv and test.csv elsewhere and pass their directory as "
                            f"maze.source=/path/to/dir") from None
    p = Path(cfg.source) / f"{split}.csv"
    if not Path(cfg.source).is_dir():
        raise UserError(f"maze source {cfg.source} is not a directory; use maze.source=generate, maze.source=hf, "
                        f"or a directory holding train.csv and test.csv (`source,question,answer,rating` rows)")
    if not p.is_file():
        raise UserError(f"{p} is missing; the maze source directory must hold train.csv and test.csv "
                        f"(`source,question,answer,rating` rows, as in {HF_REPO})")
    return p, str(p)


def inputs(cfg: Config) -> dict[str, str]:
    """The local files `build` reads (the stage fingerprints them): a source directory's CSVs."""
    if cfg.source in ("generate", "hf"):
        return {}
    return {split: str(Path(cfg.source) / f"{split}.csv") for split in ("train", "test")}


def read_csv(path: Path, where: str, size: int, on_error: str, skipped: list[str],
             limit: int | None = None) -> tuple[list[tuple[str, str, int]], int]:
    """Checked (question, answer, shortest path length) of a CSV file and how many of them have
    more than one shortest path. Bad rows raise a UserError naming the file and line, or with
    on_error == "skip" are dropped and described in `skipped`."""
    out, ambiguous, first = [], 0, len(skipped)

    def bad(line: int, why: str) -> None:
        msg = f"{where}, line {line}: {why}"
        if on_error != "skip":
            raise UserError(f"{msg}; fix or remove the row (or skip bad rows with on_error=skip)")
        skipped.append(msg)

    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header] != HEADER:
                raise UserError(f"{where}, line 1: the header is {header}, expected {','.join(HEADER)} "
                                f"(the layout of {HF_REPO})")
            for row in reader:
                if limit is not None and len(out) >= limit:
                    break
                line = reader.line_num
                if not row:
                    continue
                if len(row) != 4:
                    bad(line, f"{len(row)} fields, expected 4 ({','.join(HEADER)})")
                    continue
                q, a = row[1], row[2]
                try:
                    length, unique = check_maze(q, a, size)
                except ValueError as e:
                    bad(line, str(e))
                    continue
                ambiguous += not unique
                out.append((q, a, length))
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 text ({e}); pass a CSV file") from None
    except OSError as e:
        raise UserError(f"{where} cannot be read ({e}); check the path") from None
    except csv.Error as e:
        raise UserError(f"{where}, line {reader.line_num}: not valid CSV ({e})") from None
    if len(skipped) > first:
        print(f"maze: skipped {len(skipped) - first} bad rows of {where} (first: {skipped[first]})", file=sys.stderr)
    return out, ambiguous


# ---------------------------------------------------------------------------------------------
# Encoding


def encode(mazes: list[str], size: int) -> np.ndarray:
    """(N, size * size) uint8 token ids of maze strings."""
    if not mazes:
        return np.zeros((0, size * size), np.uint8)
    return _CHAR2ID[np.frombuffer("".join(mazes).encode(), np.uint8)].reshape(len(mazes), size * size)


def decode(ids: np.ndarray, size: int) -> str:
    """The maze string of one row of token ids."""
    return _ID2CHAR[np.asarray(ids, np.int64).reshape(-1)].tobytes().decode()[: size * size]


def to_split(mazes: list[tuple[str, str, int]], size: int, aug: bool) -> PuzzleSplit:
    """One puzzle per maze (and per dihedral transform with `aug`), one group per maze."""
    from lmlab.data.puzzles.arc import dihedral

    q = encode([m[0] for m in mazes], size).reshape(-1, size, size)
    a = encode([m[1] for m in mazes], size).reshape(-1, size, size)
    k = 8 if aug else 1
    if aug:  # example i * 8 + t is maze i under transform t, as the official loop orders them
        q = np.stack([dihedral(q, t, axes=(1, 2)) for t in range(8)], 1)
        a = np.stack([dihedral(a, t, axes=(1, 2)) for t in range(8)], 1)
    n = len(mazes)
    return PuzzleSplit(
        inputs=np.ascontiguousarray(q.reshape(n * k, size * size)),
        labels=np.ascontiguousarray(a.reshape(n * k, size * size)),
        puzzle_identifiers=np.zeros(n * k, np.int32),
        puzzle_indices=np.arange(n * k + 1, dtype=np.int32),
        group_indices=np.arange(0, n * k + 1, k, dtype=np.int32),
        ratings=np.repeat(np.array([m[2] for m in mazes], np.float32), k))


def build(cfg: Config, seed: int, on_error: str) -> dict:
    """The maze puzzle set of `cfg` (see the module docstring)."""
    size = cfg.size
    skipped: list[str] = []
    stats: dict = {}
    if cfg.source == "generate":
        min_len = cfg.min_path_length if cfg.min_path_length is not None else default_min_path_length(size)
        if min_len > size * size // 2:
            raise UserError(f"min_path_length {min_len} cannot fit a {size}x{size} maze (at most about "
                            f"{size * size // 2} moves); lower it or raise size")
        n_train, n_test = cfg.n_train or 1000, cfg.n_test or 1000
        train = generate(n_train, size, min_len, cfg.loops, seed, stream=0, desc="maze train")
        test = generate(n_test, size, min_len, cfg.loops, seed, stream=1, exclude={m[0] for m in train},
                        desc="maze test")
        info_src = {"source": "generate", "min_path_length": min_len, "loops": cfg.loops}
        stats["ambiguous"] = 0
    else:
        data, ambiguous = {}, 0
        for split in ("train", "test"):
            path, where = _csv_path(cfg, split)
            rows, amb = read_csv(path, where, size, on_error, skipped, limit=cfg.n_test if split == "test" else None)
            if not rows:
                raise UserError(f"{where} holds no valid maze; check the file (and size: {size})")
            data[split], ambiguous = rows, ambiguous + amb
        train, test = data["train"], data["test"]
        if cfg.n_train is not None and cfg.n_train < len(train):  # the official subsample_size
            keep = np.sort(np.random.default_rng(seed).choice(len(train), size=cfg.n_train, replace=False))
            train = [train[i] for i in keep]
        info_src = {"source": cfg.source if cfg.source == "hf" else str(Path(cfg.source).resolve())}
        if cfg.source == "hf":
            info_src["hf_repo"] = cfg.hf_repo
        stats["ambiguous"] = ambiguous  # imported mazes whose shortest path is not unique (kept)
    splits = {"train": to_split(train, size, cfg.aug), "test": to_split(test, size, False)}
    train_questions = {m[0] for m in train}
    stats["train_test_overlap"] = sum(m[0] in train_questions for m in test)
    lengths = np.array([m[2] for m in train + test])
    stats.update({
        "train_mazes": len(train), "test_mazes": len(test),
        "train_examples": splits["train"].num_examples, "test_examples": splits["test"].num_examples,
        "path_length": {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 2),
                        "max": int(lengths.max())},
        "skipped": len(skipped), "skipped_first": skipped[:MAX_REASONS],
    })
    return {
        "info": {"charset": CHARSET, "size": size, "aug": cfg.aug, "rating": "shortest path length in moves",
                 **info_src},
        "vocab": list(VOCAB),
        "grid": [size, size],
        "splits": splits,
        "identifiers": ["<blank>"],
        "test_puzzles": None,
        "stats": stats,
    }
