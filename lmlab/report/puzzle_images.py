"""Puzzles drawn as images for the report: input, prediction and truth side by side.

    render_puzzles("runs/x/eval_test/predictions.npz", "out/trm_puzzles_eval_test.png", limit=6)

`predictions.npz` is what `lmlab puzzle-eval` keeps (inputs, labels, preds, exact per step,
steps_used, ratings, grid, vocab). The style follows the vocabulary (`puzzle_style`): Sudoku
digits with 3x3 boxes, givens bold and wrong cells red; maze cells coloured (wall, open,
start, goal, path); ARC's ten colours cropped to the grid; otherwise a colormap of token ids.
Wrong cells are outlined in every style but Sudoku's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lmlab.report import plots
from lmlab.report.plots import DPI, plt

MAX_RENDERED = 6

# The ARC Prize palette for colours 0..9.
ARC_COLOURS = ["#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00", "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF",
               "#870C25"]
MAZE_COLOURS = {"#": "#303030", " ": "#ffffff", "S": "#2ca02c", "G": "#d62728", "o": "#1f77b4"}
PAD_COLOUR, EOS_COLOUR = "#f2f2f2", "#c8c8c8"
WRONG_EDGE = "#ff00ff"


def puzzle_style(vocab: list[str], grid) -> str:
    """How to draw a set's cells: "arc", "maze", "sudoku" or "generic", from its vocabulary and grid."""
    v = set(vocab)
    rows, cols = (int(x) for x in grid) if grid is not None and len(grid) == 2 else (0, 0)
    if "<eos>" in v and {str(d) for d in range(10)} <= v:
        return "arc"
    if {"#", " ", "S", "G", "o"} <= v:
        return "maze"
    side = int(round(math.sqrt(rows))) if rows > 0 else 0
    if rows == cols and side >= 2 and side * side == rows and {str(d) for d in range(1, min(rows, 9) + 1)} <= v:
        return "sudoku"
    return "generic"


def _shape(grid, length: int) -> tuple[int, int]:
    if grid is not None and len(grid) == 2 and int(grid[0]) * int(grid[1]) == length and int(grid[0]) > 0:
        return int(grid[0]), int(grid[1])
    side = int(round(math.sqrt(length)))
    return (side, side) if side * side == length else (1, length)


def _pick(exact: np.ndarray, limit: int) -> list[int]:
    """Up to `limit` puzzles, half solved and half not where both exist, in their order."""
    solved, wrong = [i for i, e in enumerate(exact) if e], [i for i, e in enumerate(exact) if not e]
    a = min(len(solved), max(limit // 2, limit - len(wrong)))
    return sorted(solved[:a] + wrong[:limit - a])


def render_puzzles(source, path: str | Path, limit: int = MAX_RENDERED) -> list[dict]:
    """Draw up to `limit` puzzles of a predictions.npz (a path or a dict of its arrays) as rows of
    input | prediction | truth into `path`. Returns what was drawn: [{index, style, exact, wrong,
    steps_used, rating}] (empty, and no file, when there are no puzzles)."""
    if isinstance(source, (str, Path)):
        with np.load(source, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    else:
        data = dict(source)
    inputs, labels, preds = (np.asarray(data[k]).astype(np.int64) for k in ("inputs", "labels", "preds"))
    if inputs.ndim != 2 or labels.shape != inputs.shape or preds.shape != inputs.shape:
        raise ValueError(f"inputs {inputs.shape}, labels {labels.shape} and preds {preds.shape} must be one (n, L)")
    n, length = inputs.shape
    vocab = [str(t) for t in np.asarray(data.get("vocab", [])).tolist()]
    grid = np.asarray(data.get("grid", [0, 0])).tolist()
    style = puzzle_style(vocab, grid)
    rows, cols = _shape(grid, length)
    wrong_cells = (labels != 0) & (preds != labels)
    if "exact" in data and np.asarray(data["exact"]).ndim == 2 and len(data["exact"]) == n:
        exact = np.asarray(data["exact"])[:, -1].astype(bool)
    else:
        exact = ~wrong_cells.any(1)
    steps = np.asarray(data["steps_used"]) if "steps_used" in data else np.full(n, -1)
    ratings = np.asarray(data["ratings"], dtype=np.float64) if "ratings" in data else np.full(n, np.nan)
    chosen = _pick(exact, limit)
    if not chosen:
        return []

    from matplotlib.colors import ListedColormap

    fig, axes = plt.subplots(len(chosen), 3, figsize=(8.4, 2.9 * len(chosen) * max(min(rows / cols, 1.5), 0.4)),
                             dpi=DPI, squeeze=False)
    shown = []
    for r, i in enumerate(chosen):
        x, y, p = (a[i].reshape(rows, cols) for a in (inputs, labels, preds))
        wrong = wrong_cells[i].reshape(rows, cols)
        rating = ratings[i] if i < len(ratings) else float("nan")
        s_used = int(steps[i]) if i < len(steps) else -1
        titles = [f"#{i} input", f"prediction: {'exact' if exact[i] else f'{int(wrong.sum())} cell{_s(int(wrong.sum()))} wrong'}"
                  + (f", halts at step {s_used}" if s_used > 0 else ""),
                  "truth" + (f" (rating {rating:g})" if math.isfinite(rating) else "")]
        for c, (ax, grid_ids, title) in enumerate(zip(axes[r], (x, p, y), titles)):
            ax.set_title(title, fontsize=8)
            if style == "sudoku":
                _draw_sudoku(ax, grid_ids, x, vocab, wrong if c == 1 else None)
            elif style == "arc":
                _draw_arc(ax, grid_ids, x if c == 0 else y, wrong if c == 1 else None, ListedColormap)
            else:
                _draw_cells(ax, grid_ids, vocab, style, wrong if c == 1 else None, ListedColormap)
        shown.append({"index": int(i), "style": style, "exact": bool(exact[i]), "wrong": int(wrong.sum()),
                      "steps_used": s_used, "rating": float(rating)})
    plots._save(fig, path)
    return shown


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _token(vocab: list[str], i: int) -> str:
    return vocab[i] if 0 <= i < len(vocab) else "?"


def _wrong_edges(ax, wrong, colour: str = WRONG_EDGE) -> None:
    from matplotlib.patches import Rectangle

    if wrong is None:
        return
    for rr, cc in zip(*np.nonzero(wrong)):
        ax.add_patch(Rectangle((cc - 0.5, rr - 0.5), 1, 1, fill=False, edgecolor=colour,
                               lw=1.4))


def _draw_sudoku(ax, ids: np.ndarray, given_ids: np.ndarray, vocab: list[str], wrong) -> None:
    """Digits in cells, bold givens, thick lines around the boxes; wrong predicted cells red."""
    from matplotlib.patches import Rectangle

    n = ids.shape[0]
    box = int(round(math.sqrt(n)))
    digits = {str(d) for d in range(1, 10)}
    ax.set_xlim(0, n)
    ax.set_ylim(n, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for rr in range(n):
        for cc in range(n):
            given = _token(vocab, int(given_ids[rr, cc])) in digits
            t = _token(vocab, int(ids[rr, cc]))
            bad = wrong is not None and bool(wrong[rr, cc])
            if bad:
                ax.add_patch(Rectangle((cc, rr), 1, 1, color="#ffd6d6", lw=0))
            if t in digits:
                ax.text(cc + 0.5, rr + 0.52, t, ha="center", va="center", fontsize=max(4, 100 // n),
                        fontweight="bold" if given else "normal",
                        color="#d62728" if bad else ("black" if given else "#1f4e99"))
    for k in range(n + 1):
        lw = 1.6 if k % box == 0 else 0.4
        ax.axhline(k, color="black", lw=lw)
        ax.axvline(k, color="black", lw=lw)


def _draw_cells(ax, ids: np.ndarray, vocab: list[str], style: str, wrong, ListedColormap) -> None:
    """Maze cells by colour, or (generic) a colormap of token ids with the token in small grids."""
    rows, cols = ids.shape
    if style == "maze":
        colours = [MAZE_COLOURS.get(t, PAD_COLOUR) for t in vocab] or [PAD_COLOUR]
        ax.imshow(np.clip(ids, 0, len(colours) - 1), cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1,
                  interpolation="nearest")
    else:
        k = max(len(vocab), int(ids.max()) + 1, 2)
        ax.imshow(ids, cmap=plt.get_cmap("tab20", k), vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
        if rows * cols <= 144:
            for rr in range(rows):
                for cc in range(cols):
                    ax.text(cc, rr, _token(vocab, int(ids[rr, cc])), ha="center", va="center", fontsize=7)
    _wrong_edges(ax, wrong)
    ax.set_xticks([])
    ax.set_yticks([])


def _arc_box(ids: np.ndarray) -> tuple[slice, slice] | None:
    """The bounding box of the colour cells (ids 2..11) of a 30x30 canvas."""
    rr, cc = np.nonzero((ids >= 2) & (ids <= 11))
    if not len(rr):
        return None
    return slice(int(rr.min()), int(rr.max()) + 1), slice(int(cc.min()), int(cc.max()) + 1)


def _draw_arc(ax, ids: np.ndarray, frame: np.ndarray, wrong, ListedColormap) -> None:
    """ARC colours, cropped to the colour region of `frame` (the input for the input, the truth for
    the prediction and the truth) so the prediction lines up with the truth."""
    box = _arc_box(frame) or _arc_box(ids) or (slice(0, ids.shape[0]), slice(0, ids.shape[1]))
    crop = ids[box]
    colours = [PAD_COLOUR, EOS_COLOUR] + ARC_COLOURS
    ax.imshow(np.clip(crop, 0, len(colours) - 1), cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1,
              interpolation="nearest")
    if wrong is not None:
        _wrong_edges(ax, wrong[box], colour="white")
    ax.set_xticks([])
    ax.set_yticks([])
