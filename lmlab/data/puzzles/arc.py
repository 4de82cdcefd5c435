"""ARC-AGI tasks in the official TRM layout, and the helpers that vote on a model's answers.

Sources (`path`): a directory with one folder per subset of per-task files
`<path>/<subset>/<task_id>.json` (fchollet/ARC-AGI's data/training, data/evaluation), or the
Kaggle combined layout `<path>_<subset>_challenges.json` (+ `<path>_<subset>_solutions.json`;
without it the test outputs are filled with the dummy [[0]], as the official builder does).

Splits, as the official dataset/build_arc_dataset.py: every pair of a training subset (its
demonstration and its test pairs) goes to train; for the evaluation subset (`test_subset`), the
demonstration pairs go to train and the test pairs to test. test_puzzles.json holds the
evaluation tasks as ARC JSON (with their test outputs), for voting.

Grids must be 2-D, rectangular, at most 30x30, with values 0..9. Each grid is written top-left
in a 30x30 canvas with ids pad 0, eos 1, colour c -> c + 2 (vocab ["<pad>", "<eos>", "0".."9"]),
an eos row under it and an eos column right of it where the canvas has room. Train examples are
translated (a random top-left offset, the same for the input and output of a pair), except one
example per puzzle; test examples never are.

Augmentation: each task gets up to `num_aug` variants, each a dihedral transform (ids 0..7 as
`dihedral`) of a permutation of colours 1..9 (0 stays), the same for every grid of the task;
a variant whose grids hash (`puzzle_hash`) like the original or an earlier variant is drawn
again, at most 5 * num_aug draws. Each (task, variant) is a puzzle identifier named
`task|||t<k>|||<colour map digits>` (the original is just `task`), ids from 1 (0 = "<blank>");
a group is a task and its variants. `inverse_aug(name)` undoes a name's augmentation.

Voting (`vote`, the official evaluators/arc.py result()): every prediction on a test example
is cropped (`crop`), mapped back through its identifier's inverse augmentation and counted for
(task, hash of the un-augmented input); the candidates are ranked by (votes, mean halting
probability), descending; pass@k per test pair is whether the label is among the top k, averaged
per task and then over tasks.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
from pydantic import Field, model_validator

from lmlab.config import Strict
from lmlab.data.puzzles.format import PuzzleSplit
from lmlab.errors import UserError

MAX_GRID = 30  # ARC's largest grid, the side of the canvas
RETRIES = 5  # augmentation draws per wanted variant
SEP = "|||"  # between a task's name and its augmentation in an identifier's name
VOCAB = ["<pad>", "<eos>"] + [str(c) for c in range(10)]
PAD, EOS, COLOUR0 = 0, 1, 2
DUMMY_OUTPUT = [[0]]  # a test output the source does not give (the official fill)
MAX_REASONS = 5

# The official dataset/common.py ids: 0 identity, 1/2/3 rot90 k=1/2/3, 4 fliplr, 5 flipud,
# 6 transpose, 7 anti-transpose (fliplr of rot90); DIHEDRAL_INVERSE[t] undoes t.
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


def dihedral(arr: np.ndarray, tid: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Dihedral transform `tid` (0..7, the official ids) of the grid in `axes` of `arr`."""
    a0, a1 = axes
    if tid == 0:
        return arr
    if tid in (1, 2, 3):
        return np.rot90(arr, tid, axes)
    if tid == 4:
        return np.flip(arr, a1)
    if tid == 5:
        return np.flip(arr, a0)
    if tid == 6:
        return np.swapaxes(arr, a0, a1)
    if tid == 7:
        return np.flip(np.rot90(arr, 1, axes), a1)
    raise ValueError(f"dihedral transform id {tid} is not in 0..7")


def inverse_dihedral(arr: np.ndarray, tid: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    return dihedral(arr, DIHEDRAL_INVERSE[tid], axes)


class Config(Strict):
    path: Optional[str] = Field(None, description="ARC tasks: a directory with a folder of <task_id>.json files per "
                                "subset (<path>/<subset>/, as ARC-AGI's data/), or the Kaggle prefix of "
                                "<path>_<subset>_challenges.json (+ _solutions.json)")
    subsets: list[str] = Field(default_factory=lambda: ["training", "evaluation"],
                               description="subsets to read, in order; all their pairs go to train except the "
                               "test pairs of test_subset")
    test_subset: str = Field("evaluation", description="the subset whose test pairs form the test split (its "
                             "demonstration pairs still go to train); the official test_set_name")
    num_aug: int = Field(8, ge=0, description="augmented variants per task (dihedral x colour permutation); the "
                         "official default is 1000, a GPU-sized set")
    max_tasks: Optional[int] = Field(None, ge=1, description="read only the first n tasks of each subset, in name "
                                     "order (a CPU-sized set); default all")

    @model_validator(mode="after")
    def _subsets(self) -> "Config":
        if not self.subsets:
            raise ValueError("subsets is empty; name at least the test subset, e.g. [training, evaluation]")
        if len(set(self.subsets)) != len(self.subsets):
            raise ValueError(f"subsets {self.subsets} names a subset twice")
        if self.test_subset not in self.subsets:
            raise ValueError(f"test_subset {self.test_subset!r} is not one of subsets {self.subsets}; add it "
                             "(its test pairs form the test split)")
        return self


# ---------------------------------------------------------------------------------------------
# Grids, hashes, augmentation


def to_grid(g, what: str) -> np.ndarray:
    """An ARC grid (a list of rows of colours 0..9) as a uint8 array, or a ValueError naming `what`."""
    if not isinstance(g, list) or not g or not all(isinstance(row, list) for row in g):
        raise ValueError(f"{what} is not a non-empty list of rows")
    widths = [len(row) for row in g]
    for i, w in enumerate(widths):
        if w != widths[0]:
            raise ValueError(f"{what} is ragged: row {i} has {w} cells, row 0 has {widths[0]}")
    if widths[0] == 0:
        raise ValueError(f"{what} has empty rows")
    if len(g) > MAX_GRID or widths[0] > MAX_GRID:
        raise ValueError(f"{what} is {len(g)}x{widths[0]}, larger than ARC's {MAX_GRID}x{MAX_GRID}")
    for i, row in enumerate(g):
        for j, x in enumerate(row):
            if type(x) is not int or not 0 <= x <= 9:
                raise ValueError(f"{what} has {x!r} at row {i}, column {j}; colours are the integers 0..9")
    return np.array(g, dtype=np.uint8)


def grid_hash(grid: np.ndarray) -> str:
    """The official grid_hash: sha256 of the shape (one byte per side) and the uint8 cells."""
    g = np.asarray(grid)
    if g.ndim != 2:
        raise ValueError(f"grid_hash needs a 2-D grid, got shape {g.shape}")
    return hashlib.sha256(bytes(g.shape) + g.astype(np.uint8).tobytes()).hexdigest()


def puzzle_hash(puzzle: dict[str, list[tuple[np.ndarray, np.ndarray]]]) -> str:
    """The official puzzle_hash: the sorted (input, output) grid hashes of every pair of every split."""
    pairs = sorted(f"{grid_hash(i)}|{grid_hash(o)}" for examples in puzzle.values() for i, o in examples)
    return hashlib.sha256("|".join(pairs).encode()).hexdigest()


def aug_name(name: str, tid: int, mapping: np.ndarray) -> str:
    return f"{name}{SEP}t{tid}{SEP}{''.join(str(int(x)) for x in mapping)}"


def draw_aug(rng: np.random.Generator, name: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """A random augmentation (the official `aug`): its identifier name and the grid map."""
    tid = int(rng.integers(0, 8))
    mapping = np.concatenate([[0], rng.permutation(np.arange(1, 10))]).astype(np.uint8)
    return aug_name(name, tid, mapping), lambda grid: dihedral(mapping[grid], tid)


def inverse_aug(name: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """(task name, the map from an augmented grid back to the original) of an identifier name."""
    if SEP not in name:
        return name, lambda grid: np.asarray(grid)
    parts = name.split(SEP)
    tid = int(parts[-2][1:])
    inverse = np.argsort(np.array([int(ch) for ch in parts[-1]])).astype(np.uint8)
    return parts[0], lambda grid: inverse[inverse_dihedral(np.asarray(grid), tid)]


def augment(name: str, puzzle: dict, num_aug: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """[(identifier name, {dest: [(input, output)]})]: the original, then up to num_aug distinct variants."""
    group = [(name, puzzle)]
    if num_aug <= 0:
        return group
    hashes = {puzzle_hash(puzzle)}
    for _ in range(RETRIES * num_aug):
        new_name, fn = draw_aug(rng, name)
        variant = {dest: [(fn(i), fn(o)) for i, o in examples] for dest, examples in puzzle.items()}
        h = puzzle_hash(variant)
        if h not in hashes:
            hashes.add(h)
            group.append((new_name, variant))
        if len(group) >= num_aug + 1:
            break
    return group


def encode_pair(inp: np.ndarray, out: np.ndarray, pad_r: int = 0, pad_c: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The official np_grid_to_seq_translational_augment for a given offset: both grids as 900 ids
    (colour + 2) at (pad_r, pad_c) in a 30x30 canvas of pad, an eos row under and an eos column
    right of each where the canvas has room."""
    result = []
    for grid in (inp, out):
        rows, cols = grid.shape
        canvas = np.zeros((MAX_GRID, MAX_GRID), np.uint8)
        canvas[pad_r:pad_r + rows, pad_c:pad_c + cols] = grid + COLOUR0
        end_r, end_c = pad_r + rows, pad_c + cols
        if end_r < MAX_GRID:
            canvas[end_r, pad_c:end_c] = EOS
        if end_c < MAX_GRID:
            canvas[pad_r:end_r, end_c] = EOS
        result.append(canvas.reshape(-1))
    return result[0], result[1]


def crop(grid_ids: np.ndarray) -> np.ndarray:
    """The official _crop: of a 900-id canvas, the largest top-left rectangle of colour ids (2..11)
    that a row-by-row scan finds, as colours 0..9 (uint8); (0, 0) when the corner is not a colour."""
    g = np.asarray(grid_ids).reshape(MAX_GRID, MAX_GRID)
    ok = (g >= COLOUR0) & (g <= COLOUR0 + 9)
    first_bad = np.where(ok.all(axis=1), MAX_GRID, np.argmin(ok, axis=1))
    widths = np.minimum.accumulate(first_bad)  # the scan keeps the narrowest width so far
    areas = widths * np.arange(1, MAX_GRID + 1)
    r = int(np.argmax(areas))  # the first largest, as the scan's strict >
    if areas[r] == 0:
        return np.zeros((0, 0), np.uint8)
    return (g[:r + 1, :widths[r]] - COLOUR0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Reading tasks


def _bad(on_error: str, skipped: list[str], msg: str) -> None:
    if on_error != "skip":
        raise UserError(f"{msg}; fix the task (or skip bad tasks with on_error=skip)")
    skipped.append(msg)


def inputs(cfg: Config) -> dict[str, str]:
    """The local files `build` reads (the stage fingerprints them): every task file of the
    per-task layout, or each subset's challenges and solutions files of the Kaggle layout."""
    if not cfg.path:
        return {}
    files = {}
    for subset in cfg.subsets:
        if _layout(cfg.path, subset) == "tasks":
            for f in sorted((Path(cfg.path) / subset).glob("*.json"))[:cfg.max_tasks]:
                files[f"{subset}/{f.name}"] = str(f)
        else:
            for part in ("challenges", "solutions"):
                files[f"{subset}_{part}"] = f"{cfg.path}_{subset}_{part}.json"
    return files


def _layout(path: str, subset: str) -> str:
    root = Path(path)
    if (root / subset).is_dir():
        return "tasks"
    if Path(f"{path}_{subset}_challenges.json").is_file():
        return "kaggle"
    raise UserError(f"ARC subset {subset!r} not found: neither {root / subset}/ (a folder of <task_id>.json files) "
                    f"nor {path}_{subset}_challenges.json (the Kaggle layout) exists; check path and subsets")


def _read_json(p: Path, what: str):
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} cannot be read as JSON ({e})") from None


def read_subset(path: str, subset: str, max_tasks: int | None, on_error: str, skipped: list[str],
                stats: dict) -> list[tuple[str, dict, str]]:
    """[(task id, task JSON with test outputs, where it came from)] of one subset, in name order."""
    layout = _layout(path, subset)
    out = []
    if layout == "tasks":
        files = sorted((Path(path) / subset).glob("*.json"))
        if not files:
            raise UserError(f"{Path(path) / subset}/ holds no <task_id>.json files; check path and subsets")
        for f in files[:max_tasks]:
            try:
                out.append((f.stem, _read_json(f, str(f)), str(f)))
            except ValueError as e:
                _bad(on_error, skipped, str(e))
        return out
    chal = Path(f"{path}_{subset}_challenges.json")
    sols_path = Path(f"{path}_{subset}_solutions.json")
    try:
        tasks = _read_json(chal, str(chal))
        sols = _read_json(sols_path, str(sols_path)) if sols_path.is_file() else None
    except ValueError as e:
        raise UserError(f"{e}; pass the Kaggle challenges/solutions JSON files") from None
    if not isinstance(tasks, dict) or (sols is not None and not isinstance(sols, dict)):
        raise UserError(f"{chal} (and {sols_path}) must map task ids to tasks (the Kaggle layout)")
    if sols is None:
        stats.setdefault("dummy_outputs_subsets", []).append(subset)
    for name in sorted(tasks)[:max_tasks]:
        task, where = tasks[name], f"{chal} task {name}"
        if sols is not None and isinstance(task, dict) and isinstance(task.get("test"), list):
            answers = sols.get(name)
            if not isinstance(answers, list) or len(answers) != len(task["test"]):
                _bad(on_error, skipped, f"{sols_path}: task {name} has "
                     + (f"{len(answers)} solutions for {len(task['test'])} test inputs" if isinstance(answers, list)
                        else "no solutions"))
                continue
            task = {**task, "test": [{**pair, "output": a} for pair, a in zip(task["test"], answers)]}
        out.append((name, task, where))
    return out


def parse_task(task, dummy: list[int]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """{"train": pairs, "test": pairs} as uint8 grids, or a ValueError naming the grid. A test pair
    without an output gets the dummy output [[0]] (counted in dummy[0])."""
    if not isinstance(task, dict):
        raise ValueError("is not a JSON object with 'train' and 'test' lists")
    pairs = {}
    for kind in ("train", "test"):
        examples = task.get(kind)
        if not isinstance(examples, list) or not examples:
            raise ValueError(f"has no '{kind}' pairs (a task needs a non-empty '{kind}' list)")
        pairs[kind] = []
        for i, ex in enumerate(examples):
            if not isinstance(ex, dict) or "input" not in ex:
                raise ValueError(f"{kind}[{i}] is not an object with 'input' and 'output'")
            if "output" not in ex:
                if kind == "train":
                    raise ValueError(f"{kind}[{i}] has no 'output'")
                dummy[0] += 1
            out = ex.get("output", DUMMY_OUTPUT)
            pairs[kind].append((to_grid(ex["input"], f"{kind}[{i}].input"), to_grid(out, f"{kind}[{i}].output")))
    return pairs


# ---------------------------------------------------------------------------------------------
# Building the set


def _encode_split(groups: list[list[tuple[str, list]]], ids: dict[str, int], translate: bool,
                  rng: np.random.Generator) -> PuzzleSplit:
    n = sum(len(ex) for group in groups for _, ex in group)
    inputs = np.zeros((n, MAX_GRID * MAX_GRID), np.uint8)
    labels = np.zeros_like(inputs)
    identifiers, puzzle_indices, group_indices = [], [0], [0]
    row = 0
    for group in groups:
        for name, examples in group:
            keep = int(rng.integers(len(examples))) if translate else -1  # one example stays un-translated
            for j, (inp, out) in enumerate(examples):
                pad_r = pad_c = 0
                if translate and j != keep:
                    pad_r = int(rng.integers(0, MAX_GRID - max(inp.shape[0], out.shape[0]) + 1))
                    pad_c = int(rng.integers(0, MAX_GRID - max(inp.shape[1], out.shape[1]) + 1))
                inputs[row], labels[row] = encode_pair(inp, out, pad_r, pad_c)
                row += 1
            puzzle_indices.append(row)
            identifiers.append(ids[name])
        group_indices.append(len(identifiers))
    return PuzzleSplit(inputs=inputs, labels=labels,
                       puzzle_identifiers=np.array(identifiers, np.int32),
                       puzzle_indices=np.array(puzzle_indices, np.int32),
                       group_indices=np.array(group_indices, np.int32), ratings=None)


def build(cfg: Config, seed: int, on_error: str) -> dict:
    """The ARC puzzle set of `cfg` (see the module docstring); a pure function of (cfg, seed)."""
    if not cfg.path:
        raise UserError("arc needs `path`: a directory with training/ and evaluation/ folders of ARC-AGI task "
                        "files (git clone https://github.com/fchollet/ARC-AGI, then arc.path=ARC-AGI/data) or a "
                        "Kaggle prefix such as arc.path=kaggle/combined/arc-agi")
    aug_rng = np.random.default_rng([seed, 0])
    shift_rng = np.random.default_rng([seed, 1])
    skipped: list[str] = []
    stats: dict = {"tasks": {}}
    dummy = [0]
    groups: dict[str, list] = {"train": [], "test": []}
    test_puzzles: dict[str, dict] = {}
    seen: dict[str, str] = {}
    short: list[str] = []
    layouts = set()
    for subset in cfg.subsets:
        layouts.add(_layout(cfg.path, subset))
        records = read_subset(cfg.path, subset, cfg.max_tasks, on_error, skipped, stats)
        is_test = subset == cfg.test_subset
        kept = 0
        for name, task, where in _iter(records, subset):
            if name in seen:
                _bad(on_error, skipped, f"{where}: task {name} is also in subset {seen[name]!r}; read it from one "
                     "subset only")
                continue
            try:
                pairs = parse_task(task, dummy)
            except ValueError as e:
                _bad(on_error, skipped, f"{where}: task {name} {e}" if str(e).startswith(("is ", "has "))
                     else f"{where}: task {name}: {e}")
                continue
            seen[name] = subset
            puzzle = {"train": pairs["train"], "test": pairs["test"]} if is_test \
                else {"train": pairs["train"] + pairs["test"]}
            group = augment(name, puzzle, cfg.num_aug, aug_rng)
            if len(group) < cfg.num_aug + 1:
                short.append(f"{name}: {len(group) - 1} variants")
            for dest in puzzle:
                groups[dest].append([(pname, variant[dest]) for pname, variant in group])
            if is_test:  # with the dummy output where the source has none, as the official
                test_puzzles[name] = {**task, "test": [{**pair, "output": pair.get("output", DUMMY_OUTPUT)}
                                                       for pair in task["test"]]}
            kept += 1
        stats["tasks"][subset] = kept
    if skipped:
        print(f"arc: skipped {len(skipped)} bad tasks (first: {skipped[0]})", file=sys.stderr)
    if not groups["test"]:
        raise UserError(f"the test subset {cfg.test_subset!r} gave no valid task, so the test split would be empty; "
                        "check path, test_subset and the skipped tasks")
    ids: dict[str, int] = {}
    for split in ("train", "test"):  # 0 is "<blank>"; every test puzzle's name is also a train puzzle's
        for group in groups[split]:
            for name, _ in group:
                ids.setdefault(name, len(ids) + 1)
    splits = {split: _encode_split(groups[split], ids, split == "train", shift_rng) for split in ("train", "test")}
    stats.update({
        "train_examples": splits["train"].num_examples, "test_examples": splits["test"].num_examples,
        "train_puzzles": splits["train"].num_puzzles, "test_puzzles": splits["test"].num_puzzles,
        "groups": {s: splits[s].num_groups for s in splits}, "identifiers": len(ids) + 1,
        "augmentation_short": len(short), "augmentation_short_tasks": short[:MAX_REASONS],
        "dummy_test_outputs": dummy[0],
        "skipped": len(skipped), "skipped_first": skipped[:MAX_REASONS],
    })
    return {
        "info": {"layout": "+".join(sorted(layouts)), "path": str(Path(cfg.path).resolve()), "subsets": cfg.subsets,
                 "test_subset": cfg.test_subset, "num_aug": cfg.num_aug, "max_tasks": cfg.max_tasks,
                 "translate_train": True},
        "vocab": list(VOCAB),
        "grid": [MAX_GRID, MAX_GRID],
        "splits": splits,
        "identifiers": ["<blank>"] + list(ids),
        "test_puzzles": test_puzzles,
        "stats": stats,
    }


def _iter(records: list, subset: str):
    from lmlab.runtime import progress

    with progress(len(records), desc=f"arc {subset}", unit="task") as bar:
        for r in records:
            yield r
            bar.update(1)


# ---------------------------------------------------------------------------------------------
# Voting


def vote(predictions: Iterable[tuple[str, np.ndarray, np.ndarray, float]], test_puzzles: dict,
         pass_ks: tuple[int, ...] = (1, 2), submission_k: int = 2) -> dict:
    """The official ARC evaluator's result() on one process.

    `predictions`: (identifier name, input ids (900), predicted ids (900), halting probability)
    for every evaluated test example; `test_puzzles`: {task: ARC JSON with test outputs}.
    Returns {"pass@k": mean over tasks of the fraction of its test pairs whose label is among
    the k most voted grids, ..., "submission": {task: [{"attempt_1": grid, "attempt_2": grid}]
    per test pair}, "num_tasks", "tasks_without_predictions": [tasks with a test pair nobody
    predicted (counted wrong; its attempts are [[0]])]}.
    """
    grids: dict[str, np.ndarray] = {}
    votes: dict[str, dict[str, list[tuple[str, float]]]] = {}
    for name, inp, pred, q in predictions:
        task, inverse = inverse_aug(name)
        input_hash = grid_hash(inverse(crop(inp)))
        grid = inverse(crop(pred))
        h = grid_hash(grid)
        grids[h] = grid
        votes.setdefault(task, {}).setdefault(input_hash, []).append((h, float(q)))
    correct = [0.0] * len(pass_ks)
    submission: dict[str, list[dict]] = {}
    missing: list[str] = []
    for task, puzzle in test_puzzles.items():
        submission[task] = []
        hits = [0] * len(pass_ks)
        for pair in puzzle["test"]:
            input_hash = grid_hash(np.array(pair["input"], np.uint8))
            label_hash = grid_hash(np.array(pair.get("output", DUMMY_OUTPUT), np.uint8))
            tally: dict[str, list] = {}
            for h, q in votes.get(task, {}).get(input_hash, ()):
                t = tally.setdefault(h, [0, 0.0])
                t[0] += 1
                t[1] += q
            if not tally:
                if task not in missing:
                    missing.append(task)
                submission[task].append({f"attempt_{i + 1}": [[0]] for i in range(submission_k)})
                continue
            # most votes first, then the highest mean q; equal keys keep first-vote order (stable sort)
            ranked = sorted(((h, (n, s / n)) for h, (n, s) in tally.items()), key=lambda kv: kv[1], reverse=True)
            for i, k in enumerate(pass_ks):
                hits[i] += any(h == label_hash for h, _ in ranked[:k])
            attempts = [grids[h] for h, _ in ranked[:submission_k]]
            attempts += [attempts[0]] * (submission_k - len(attempts))
            submission[task].append({f"attempt_{i + 1}": g.tolist() for i, g in enumerate(attempts)})
        for i in range(len(pass_ks)):
            correct[i] += hits[i] / len(puzzle["test"])
    n = len(test_puzzles)
    result = {f"pass@{k}": correct[i] / n if n else 0.0 for i, k in enumerate(pass_ks)}
    return {**result, "submission": submission, "num_tasks": n, "tasks_without_predictions": missing}
