"""The report's TRM section (lmlab/report/trm.py): a real `lmlab trm` run on the toy puzzle set,
`lmlab puzzle-eval`, then `lmlab report` through the CLI; the missing pieces named; and the puzzle
renderer on hand-made Sudoku, maze and ARC predictions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_trm_train import ENV, trm_args, write_toy_set

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _image(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """root/set (toy puzzles) -> root/trm (10 steps, evals at 5 and 10) -> root/eval_set."""
    from lmlab.config import build_config, parse_override, set_dotted
    from lmlab.eval import puzzles as eval_stage
    from lmlab.train import trm as trm_stage

    r = tmp_path_factory.mktemp("trmrep")
    data = write_toy_set(r / "set", n_train=128, n_test=24)
    # in process (the CLI runs in tests/test_trm_train.py): the same options as there
    cfg: dict = {}
    for arg in trm_args(data, r / "trm", 10, "eval.every=5", "checkpoint.every=0")[4:]:
        set_dotted(cfg, *parse_override(arg))
    trm_stage.run(build_config(trm_stage.Config, cfg))
    eval_stage.run(build_config(eval_stage.Config, {"model": str(r / "trm"), "data": str(data), "batch_size": 8,
                                                    "keep_predictions": 6}))
    assert (r / "eval_set" / "predictions.npz").is_file()
    return r


def test_report_has_the_trm_section_tables_and_plots(root):
    r = _run([sys.executable, "-m", "lmlab", "report", f"root={root}"])
    path = root / "report" / "report.md"
    assert str(path) in r.stdout
    text = path.read_text()
    # a puzzle-only pipeline: no language-model sections, nothing reported missing
    assert "exact accuracy" in text.split("\n")[2] and "TRM" in text.split("\n")[2]
    for absent in ("## Missing", "### Corpus", "## Sample generations", "No model artifact"):
        assert absent not in text, absent
    for heading in ("## Time per stage", "### Puzzle sets", "## TRM: tiny recursive models on puzzles",
                    "### Learning curves", "### Puzzle evaluations", "#### eval_set", "## Resolved configs"):
        assert heading in text, heading
    # time per stage and discovery include the three kinds
    assert "| trm |" in text and "| puzzle-eval (eval_set) |" in text
    assert text.count("<details>") == 3
    # the puzzle set line: kind, grid, examples / puzzles / groups per split
    assert "| toy | 3×4 | 7 | 128 / 128 / 128 | 24 / 24 / 24 |" in text
    # the runs table: variant, parameters, T / n / N_sup, steps, puzzles trained
    run_row = next(line for line in text.splitlines() if line.startswith("| `trm` |"))
    cells = [c.strip() for c in run_row.strip("|").split("|")]
    assert cells[1] == "attention" and cells[3] == "2/2/4" and cells[4] == "10" and cells[5].startswith("320")
    assert "T / n / N_sup" in text and "final val exact accuracy" in text
    # the eval row, linked to its run
    metrics = json.loads((root / "eval_set" / "metrics.json").read_text())
    eval_row = next(line for line in text.splitlines() if line.startswith("| `eval_set` |"))
    cells = [c.strip() for c in eval_row.strip("|").split("|")]
    assert cells[1] == "set (toy)" and cells[2] == "test" and cells[3] == "`trm`" and cells[4] == "24"
    assert cells[5].startswith(f"**{metrics['exact_accuracy']:.3f}** ± ")
    assert cells[6] == f"{metrics['token_accuracy']:.3f}" and "ARC pass@1" not in text  # no ARC set
    assert "Last evaluation in training (step 10" in text
    for name in ("stage_times.png", "trm_curves.png", "trm_exact_by_step.png", "trm_steps_used_eval_set.png",
                 "trm_rating_eval_set.png", "trm_puzzles_eval_set.png"):
        assert f"({name})" in text, name
        _image(path.parent / name)
    assert "6 puzzles (" in text
    stats = json.loads((path.parent / "manifest.json").read_text())["stats"]
    assert "trm_puzzles_eval_set.png" in stats["plots"]


def test_missing_pieces_are_named(root, tmp_path):
    from lmlab.report import report, trm

    part = tmp_path / "part"
    shutil.copytree(root / "trm", part / "trm", ignore=shutil.ignore_patterns("checkpoints"))
    (part / "trm" / "metrics.jsonl").unlink()
    lone = part / "trm_alone"
    shutil.copytree(part / "trm", lone)
    shutil.copytree(root / "eval_set", part / "eval_set")
    (part / "eval_set" / "predictions.npz").unlink()
    found = report.discover(str(part), [], follow=False)
    # the eval's manifest names the original run; point it at the copy
    m = json.loads((part / "eval_set" / "manifest.json").read_text())
    m["inputs"]["model"]["path"] = str(part / "trm")
    found["puzzle_eval"] = [(part / "eval_set", m)]
    out = tmp_path / "out"
    out.mkdir()
    text = "\n".join(trm.trm_section(found, out, report.read_metrics))
    assert "metrics.jsonl missing" in text
    assert f"No predictions.npz in `{part / 'eval_set'}`" in text
    assert f"No puzzle evaluation of `{lone}` found" in text and "lmlab puzzle-eval" in text
    assert not (out / "trm_puzzles_eval_set.png").exists() and (out / "trm_exact_by_step.png").is_file()
    # an eval without metrics.json still gets its row
    (part / "eval_set" / "metrics.json").unlink()
    text = "\n".join(trm.trm_section(found, out, report.read_metrics))
    assert "has no readable metrics.json" in text and "| `eval_set` |" in text
    # a language-model pipeline: no TRM section at all
    assert trm.trm_section({"model": found["trm"]}, out, report.read_metrics) == []
    assert trm.puzzle_sets_section({}) == []


# ----------------------------------------------------------------------------- the renderer

SUDOKU_VOCAB = ["<pad>"] + [str(d) for d in range(10)]


def _solved_sudoku(shift: int) -> np.ndarray:
    r, c = np.meshgrid(np.arange(9), np.arange(9), indexing="ij")
    return ((r * 3 + r // 3 + c + shift) % 9 + 1).reshape(-1)


def _red_pixels(img: np.ndarray) -> int:
    rgb = img[..., :3]
    return int(((rgb[..., 0] > 0.75) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)).sum())


def test_render_sudoku(tmp_path):
    from lmlab.report.puzzle_images import puzzle_style, render_puzzles

    rng = np.random.default_rng(0)
    solutions = np.stack([_solved_sudoku(s) for s in range(3)])
    labels = solutions + 1  # digit d is token d + 1 ("0" = blank is token 1)
    blank = rng.random(labels.shape) < 0.5
    inputs = np.where(blank, 1, labels)
    preds = labels.copy()
    preds[1, [3, 40]] = preds[1, [4, 41]]  # two wrong cells in the second puzzle
    exact = np.ones((3, 4), bool)
    exact[1] = False
    path = tmp_path / "sudoku.npz"
    np.savez_compressed(path, inputs=inputs.astype(np.uint8), labels=labels.astype(np.uint8),
                        preds=preds.astype(np.int16), exact=exact, steps_used=np.array([2, 4, 3]),
                        ratings=np.array([10.0, 20.0, np.nan], np.float32), grid=np.array([9, 9]),
                        vocab=np.asarray(SUDOKU_VOCAB))
    assert puzzle_style(SUDOKU_VOCAB, [9, 9]) == "sudoku"
    shown = render_puzzles(path, tmp_path / "sudoku.png")
    assert [s["index"] for s in shown] == [0, 1, 2] and {s["style"] for s in shown} == {"sudoku"}
    assert [s["exact"] for s in shown] == [True, False, True] and shown[1]["wrong"] == 2
    img = _image(tmp_path / "sudoku.png")
    assert _red_pixels(img) > 20  # the wrong digits
    # all solved: no red at all
    np.savez_compressed(path, inputs=inputs, labels=labels, preds=labels, exact=np.ones((3, 4), bool),
                        steps_used=np.array([1, 1, 1]), ratings=np.zeros(3), grid=np.array([9, 9]),
                        vocab=np.asarray(SUDOKU_VOCAB))
    render_puzzles(path, tmp_path / "solved.png")
    assert _red_pixels(_image(tmp_path / "solved.png")) == 0


def test_render_maze_arc_and_generic(tmp_path):
    from lmlab.report.puzzle_images import puzzle_style, render_puzzles

    vocab = ["<pad>", "#", " ", "S", "G", "o"]
    maze = np.array(["#######",
                     "#S  ###",
                     "### # #",
                     "#   # #",
                     "# ### #",
                     "#    G#",
                     "#######"])
    ids = {ch: i for i, ch in enumerate(vocab)}
    question = np.array([[ids[ch] for ch in row] for row in maze]).reshape(-1)
    answer = question.copy()
    for r, c in [(1, 2), (1, 3), (2, 3), (3, 3), (3, 2), (3, 1), (4, 1), (5, 1), (5, 2), (5, 3), (5, 4)]:
        answer[r * 7 + c] = ids["o"]
    pred = answer.copy()
    pred[5 * 7 + 4] = ids[" "]
    n = 8  # more than the 6 shown: 3 solved and 3 not
    inputs, labels = np.tile(question, (n, 1)), np.tile(answer, (n, 1))
    preds = np.stack([answer if i % 2 else pred for i in range(n)])
    exact = np.zeros((n, 2), bool)
    exact[1::2] = True
    path = tmp_path / "maze.npz"
    np.savez_compressed(path, inputs=inputs, labels=labels, preds=preds, exact=exact, steps_used=np.full(n, 2),
                        ratings=np.full(n, 12.0), grid=np.array([7, 7]), vocab=np.asarray(vocab))
    assert puzzle_style(vocab, [7, 7]) == "maze"
    shown = render_puzzles(path, tmp_path / "maze.png")
    assert len(shown) == 6 and sum(s["exact"] for s in shown) == 3 and {s["wrong"] for s in shown} == {0, 1}
    rgb = _image(tmp_path / "maze.png")[..., :3]
    green = (rgb[..., 1] > 0.55) & (rgb[..., 0] < 0.3) & (rgb[..., 2] < 0.3)  # S
    blue = (rgb[..., 2] > 0.6) & (rgb[..., 0] < 0.25) & (rgb[..., 1] > 0.35) & (rgb[..., 1] < 0.6)  # the path
    assert green.sum() > 50 and blue.sum() > 50

    # ARC: a 3x2 grid in a 30x30 canvas, eos border, pad elsewhere; cropped to the colours
    arc_vocab = ["<pad>", "<eos>"] + [str(c) for c in range(10)]
    canvas = np.zeros((30, 30), np.uint8)
    canvas[:3, :2] = np.array([[0, 1], [2, 3], [4, 5]]) + 2
    canvas[3, :2] = canvas[:3, 2] = 1
    flat = canvas.reshape(1, -1)
    shown = render_puzzles({"inputs": flat, "labels": flat, "preds": flat, "grid": np.array([30, 30]),
                            "vocab": np.asarray(arc_vocab)}, tmp_path / "arc.png")
    assert puzzle_style(arc_vocab, [30, 30]) == "arc" and shown[0]["exact"] and shown[0]["wrong"] == 0
    _image(tmp_path / "arc.png")

    # unknown vocabulary: a colormap of ids
    assert puzzle_style(list("p123456"), [3, 4]) == "generic"
    x = np.arange(12).reshape(1, 12) % 7
    assert render_puzzles({"inputs": x, "labels": x, "preds": x, "vocab": np.asarray(list("p123456")),
                           "grid": np.array([3, 4])}, tmp_path / "generic.png")[0]["style"] == "generic"
    _image(tmp_path / "generic.png")
