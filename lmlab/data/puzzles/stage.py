r"""Make or import a puzzle set (Sudoku, mazes, ARC) for TRM, in the official TRM/HRM layout.

    lmlab puzzles out=runs/x/sudoku                                   # generated Sudoku, no download
    lmlab puzzles out=runs/x/sudoku sudoku.train.blanks=[50,58] sudoku.augment=100
    lmlab puzzles out=runs/x/extreme sudoku.train.source=csv sudoku.train.path=data/train.csv \
        sudoku.test.source=csv sudoku.test.path=data/test.csv sudoku.train.n=1000 sudoku.augment=1000
    lmlab puzzles out=runs/x/maze kind=maze        maze.* options (lmlab/data/puzzles/maze.py)
    lmlab puzzles out=runs/x/arc kind=arc          arc.* options (lmlab/data/puzzles/arc.py)

Writes `out/` as lmlab/data/puzzles/format.py describes: puzzles.json, identifiers.json,
test_puzzles.json (when the kind has one), train/ and test/ with the official arrays and
dataset.json, and manifest.json (kind "puzzles"). The same config and inputs give the same
set, and re-running is a no-op; a failed run never replaces a good set. See docs/puzzles.md.

"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.data.puzzles import arc as arc_kind
from lmlab.data.puzzles import format as fmt
from lmlab.data.puzzles import maze as maze_kind
from lmlab.data.puzzles import sudoku as sudoku_kind

# The kind modules (lmlab.data.puzzles.sudoku, .maze, .arc) share one interface (for developers;
# kept out of the module docstring, which `lmlab puzzles --help` prints):
# `Config` (a Strict model: the `sudoku` / `maze` / `arc` section), optionally
# `inputs(section) -> {name: path}` (the local files the build reads: fingerprinted, and never
# an `out`), and `build(section, seed, on_error) -> dict` with the keys
#     info         extra puzzles.json fields (dict)
#     vocab        token strings, index = id (index 0 the padding "<pad>")
#     grid         [rows, cols]; seq_len = rows * cols
#     splits       {"train": PuzzleSplit, "test": PuzzleSplit}
#     identifiers  puzzle identifier names, index 0 "<blank>"
#     test_puzzles dict written as test_puzzles.json, or None
#     stats        the kind's statistics (dict) for the manifest

POSITIONAL = ("out", "output directory of the puzzle set (kind 'puzzles')")
KIND = "puzzles"
BUILT_KEYS = ("info", "vocab", "grid", "splits", "identifiers", "test_puzzles", "stats")
RESERVED = ("kind", "grid", "vocab", "vocab_size", "seq_len", "num_puzzle_identifiers", "splits")


class Config(Strict):
    out: str = Field("runs/puzzles", description="output directory (kind 'puzzles')")
    kind: Literal["sudoku", "maze", "arc"] = Field("sudoku", description="which puzzles: sudoku | maze | arc")
    seed: int = Field(0, description="seed of every draw (generation, subsampling, augmentation)")
    on_error: Literal["stop", "skip"] = Field("stop", description="a bad record in an imported file: stop with "
                                              "its file and line, or skip it and count it in the manifest")
    sudoku: sudoku_kind.Config = Field(default_factory=sudoku_kind.Config, description="kind=sudoku: train/test sources "
                                  "and augmentation (docs/puzzles.md)")
    maze: maze_kind.Config = Field(default_factory=maze_kind.Config, description="kind=maze: generated or imported "
                                   "mazes (docs/puzzles.md, Mazes)")
    arc: arc_kind.Config = Field(default_factory=arc_kind.Config, description="kind=arc: ARC-AGI tasks to import "
                                 "and augment (docs/puzzles.md, ARC)")


KINDS = {"sudoku": sudoku_kind, "maze": maze_kind, "arc": arc_kind}


def section(cfg: Config):
    """(kind module, its config section)."""
    return KINDS[cfg.kind], getattr(cfg, cfg.kind)


def _file_fingerprint(path: str) -> str:
    """The content's sha256 (the set follows its input files' bytes, wherever they are)."""
    p = Path(path)
    return artifacts.sha256_file(p) if p.is_file() else "missing"


def rating_summary(split: fmt.PuzzleSplit) -> dict:
    """Ratings of a split's original puzzles (the first of each group): quantiles and a histogram."""
    if split.ratings is None:
        return {"known": 0}
    r = np.asarray(split.ratings, dtype=np.float64)[np.asarray(split.group_indices[:-1])]
    known = r[~np.isnan(r)]
    if not known.size:
        return {"known": 0}
    q = np.quantile(known, [0.1, 0.5, 0.9])
    values = np.unique(known)
    if values.size <= 12 and np.all(values == np.round(values)):
        hist = {"values": values.tolist(), "counts": [int((known == v).sum()) for v in values]}
    else:
        counts, edges = np.histogram(known, bins=10)
        hist = {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()}
    return {"known": int(known.size), "min": float(known.min()), "p10": float(q[0]), "median": float(q[1]),
            "p90": float(q[2]), "max": float(known.max()), "mean": round(float(known.mean()), 4), "histogram": hist}


def _check_built(built: dict, kind: str) -> None:
    """The kind module kept the contract (a failure here is a bug in lmlab, not a user error)."""
    missing = [k for k in BUILT_KEYS if k not in built]
    if missing:
        raise RuntimeError(f"lmlab.data.puzzles.{kind}.build returned no {missing}")
    clash = [k for k in built["info"] if k in RESERVED]
    if clash:
        raise RuntimeError(f"lmlab.data.puzzles.{kind}.build: info must not set {clash}")
    rows, cols = built["grid"]
    if set(built["splits"]) != {"train", "test"}:
        raise RuntimeError(f"lmlab.data.puzzles.{kind}.build: splits are {sorted(built['splits'])}, not train and test")
    for name, split in built["splits"].items():
        if split.inputs.ndim != 2 or split.inputs.shape[1] != rows * cols:
            raise RuntimeError(f"lmlab.data.puzzles.{kind}.build: {name} inputs {split.inputs.shape} do not hold "
                               f"{rows}x{cols} grids")
    if not built["identifiers"] or built["identifiers"][0] != "<blank>":
        raise RuntimeError(f"lmlab.data.puzzles.{kind}.build: identifier 0 must be '<blank>'")


def run(cfg: Config) -> Path:
    out = Path(cfg.out)
    module, sec = section(cfg)
    ins = dict(module.inputs(sec)) if hasattr(module, "inputs") else {}
    artifacts.check_out(out, KIND, "puzzles", inputs=ins)
    config = cfg.model_dump(mode="json")
    # Only what makes this kind's set: changing the other kinds' sections keeps it up to date.
    relevant = {"kind": cfg.kind, "seed": cfg.seed, "on_error": cfg.on_error, cfg.kind: sec.model_dump(mode="json")}
    fp = artifacts.stage_fingerprint(KIND, relevant, {name: _file_fingerprint(p) for name, p in sorted(ins.items())})
    if artifacts.is_up_to_date(out, fp) and (out / fmt.INFO).is_file():
        print(f"puzzles: up to date ({out}), nothing to do")
        return out
    timer = artifacts.Timer()
    with timer("build"):
        built = module.build(sec, cfg.seed, cfg.on_error)
    _check_built(built, cfg.kind)
    vocab, identifiers, splits = list(built["vocab"]), list(built["identifiers"]), built["splits"]
    rows, cols = (int(v) for v in built["grid"])
    counts = {name: {"examples": s.num_examples, "puzzles": s.num_puzzles, "groups": s.num_groups}
              for name, s in splits.items()}
    info = {**built["info"], "kind": cfg.kind, "grid": [rows, cols], "vocab": vocab, "vocab_size": len(vocab),
            "seq_len": rows * cols, "num_puzzle_identifiers": len(identifiers), "splits": counts}
    stats = {"kind": cfg.kind, "splits": {name: {**counts[name], "rating": rating_summary(s)}
                                          for name, s in splits.items()},
             cfg.kind: built["stats"]}
    try:
        with artifacts.atomic_dir(out) as tmp:
            with timer("write"):
                for name, split in splits.items():
                    fmt.write_split(tmp, name, split, len(vocab), len(identifiers))
                artifacts.write_json_atomic(tmp / fmt.INFO, info)
                artifacts.write_json_atomic(tmp / fmt.IDENTIFIERS, identifiers)
                if built["test_puzzles"] is not None:
                    (tmp / fmt.TEST_PUZZLES).write_text(json.dumps(built["test_puzzles"]))
            artifacts.write_manifest(tmp, KIND, config, fp, {name: {"path": str(p), "fingerprint": _file_fingerprint(p)}
                                                             for name, p in ins.items()},
                                     verb="puzzles", timings=timer.total(), stats=stats)
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    parts = []
    for name, c in counts.items():
        r = stats["splits"][name]["rating"]
        rated = f", rating median {r['median']:g} max {r['max']:g}" if r.get("known") else ""
        parts.append(f"{name} {c['groups']} puzzles" + (f" ({c['puzzles']} with augmentations)"
                                                         if c["puzzles"] != c["groups"] else "") + rated)
    print(f"puzzles: wrote {out} ({cfg.kind} {rows}x{cols}: " + "; ".join(parts)
          + f") in {timer.total()['total_s']:.1f}s")
    return out
