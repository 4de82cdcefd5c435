"""Maze and ARC puzzle kinds: generation, import, checks, augmentation, crop and voting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED_DATA
from lmlab.data.puzzles import arc, maze
from lmlab.errors import UserError

ARC_DIR = SHARED_DATA / "arc-agi-1"
FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")


def same_splits(a: dict, b: dict) -> bool:
    return all(np.array_equal(getattr(a["splits"][s], f), getattr(b["splits"][s], f))
               for s in ("train", "test") for f in FIELDS)


# ---------------------------------------------------------------------------------------------
# Mazes


def test_generated_mazes_are_valid_unique_and_deterministic():
    cfg = maze.Config(size=11, n_train=12, n_test=6, min_path_length=24)
    a = maze.build(cfg, seed=3, on_error="stop")
    assert a["vocab"] == ["<pad>", "#", " ", "S", "G", "o"] and a["grid"] == [11, 11]
    assert a["identifiers"] == ["<blank>"] and a["test_puzzles"] is None
    questions = {}
    for split, n in (("train", 12), ("test", 6)):
        s = a["splits"][split]
        s.check(6, split)
        assert s.inputs.shape == (n, 121) and s.inputs.dtype == np.uint8
        assert list(s.puzzle_indices) == list(range(n + 1)) and list(s.group_indices) == list(range(n + 1))
        assert not s.puzzle_identifiers.any()
        questions[split] = set()
        for q_ids, a_ids, rating in zip(s.inputs, s.labels, s.ratings):
            q, ans = maze.decode(q_ids, 11), maze.decode(a_ids, 11)
            assert "o" not in q
            length, unique = maze.check_maze(q, ans, 11)
            assert unique and length >= 24 and rating == length == ans.count("o") + 1
            questions[split].add(q)
        assert len(questions[split]) == n  # distinct mazes
    assert not questions["train"] & questions["test"]
    assert same_splits(a, maze.build(cfg, seed=3, on_error="stop"))
    assert not same_splits(a, maze.build(cfg, seed=4, on_error="stop"))


def test_generator_has_loops_and_hard_default():
    # a hard 30x30 maze: path of at least 110 moves by default, and walls opened beyond a spanning tree
    out = maze.build(maze.Config(n_train=3, n_test=2), seed=0, on_error="stop")
    assert out["info"]["min_path_length"] == 110 and out["splits"]["train"].inputs.shape == (3, 900)
    assert (out["splits"]["train"].ratings >= 110).all() and (out["splits"]["test"].ratings >= 110).all()
    grid = maze.decode(out["splits"]["train"].inputs[0], 30)
    free = np.array([ch != "#" for ch in grid]).reshape(30, 30)
    edges = int((free[1:] & free[:-1]).sum() + (free[:, 1:] & free[:, :-1]).sum())
    assert edges > free.sum() - 1  # a tree has exactly cells - 1 edges: more means loops
    with pytest.raises(UserError, match="min_path_length"):
        maze.build(maze.Config(size=5, n_train=1, n_test=1, min_path_length=40), seed=0, on_error="stop")


def test_dihedral_augmentation_keeps_mazes_valid():
    out = maze.build(maze.Config(size=9, n_train=3, n_test=2, min_path_length=12, aug=True), seed=1, on_error="stop")
    s = out["splits"]["train"]
    assert s.inputs.shape == (24, 81) and list(s.group_indices) == [0, 8, 16, 24]
    assert list(s.puzzle_indices) == list(range(25)) and out["splits"]["test"].num_examples == 2
    for g in range(3):
        base_q = s.inputs[8 * g].reshape(9, 9)
        lengths = set()
        for t in range(8):
            i = 8 * g + t
            assert np.array_equal(s.inputs[i].reshape(9, 9), arc.dihedral(base_q, t))
            length, unique = maze.check_maze(maze.decode(s.inputs[i], 9), maze.decode(s.labels[i], 9), 9)
            assert unique and s.ratings[i] == length
            lengths.add(length)
        assert len(lengths) == 1


# A 5x5 maze ('.' open) whose unique shortest path is the top row then the right column (8 moves);
# the other route, down the left and round the middle, has 12.
Q = ["S....",
     ".###.",
     ".#...",
     ".#.#.",
     "...#G"]
SHORT = [(0, 1), (0, 2), (0, 3), (0, 4), (1, 4), (2, 4), (3, 4)]
LONG = [(1, 0), (2, 0), (3, 0), (4, 0), (4, 1), (4, 2), (3, 2), (2, 2), (2, 3), (2, 4), (3, 4)]


def text(rows: list[str], marks=(), repl: dict | None = None) -> str:
    g = [list(r) for r in rows]
    for r, c in marks:
        g[r][c] = "o"
    for (r, c), ch in (repl or {}).items():
        g[r][c] = ch
    return "".join("".join(r) for r in g).replace(".", " ")


def write_csv(path, rows: list[tuple[str, str]]) -> None:
    lines = ["source,question,answer,rating"] + [f"t,{q},{a},0" for q, a in rows]
    path.write_text("\n".join(lines) + "\n")


GOOD = (text(Q), text(Q, SHORT))
BAD = {
    "no path": ((text(Q, repl={(0, 1): "#", (1, 0): "#"}), text(Q, repl={(0, 1): "#", (1, 0): "#"})),
                "no path from S to G"),
    "longer path": ((text(Q), text(Q, LONG)), "has 12 moves but the shortest path from S to G has 8"),
    "disconnected": ((text(Q), text(Q, SHORT[:2] + SHORT[4:])), "do not form one connected path"),
    "two starts": ((text(Q, repl={(4, 0): "S"}), text(Q, SHORT, repl={(4, 0): "S"})), "2 'S' cells"),
    "bad character": ((text(Q, repl={(2, 2): "x"}), text(Q, SHORT, repl={(2, 2): "x"})), "'x' at row 2, column 2"),
    "o in question": ((text(Q, SHORT[:1]), text(Q, SHORT)), "'o' at row 0, column 1"),
    "changed wall": ((text(Q), text(Q, SHORT, repl={(1, 1): " "})), "differs from the question at row 1"),
    "wrong size": ((text(Q) + "    ", text(Q, SHORT) + "    "), "29 characters, a 5x5 maze has 25"),
}


def test_maze_checker_accepts_the_shortest_path():
    assert maze.check_maze(*GOOD, 5) == (8, True)
    # an open 3x3 has several shortest paths between opposite corners: valid, but not unique
    q = "S       G"
    assert maze.check_maze(q, "Soo  o  G", 3) == (4, False)


@pytest.mark.parametrize("case", sorted(BAD))
def test_maze_checker_rejects_with_file_and_line(tmp_path, case):
    row, reason = BAD[case]
    write_csv(tmp_path / "train.csv", [GOOD, row])
    write_csv(tmp_path / "test.csv", [GOOD])
    with pytest.raises(UserError) as e:
        maze.build(maze.Config(source=str(tmp_path), size=5), seed=0, on_error="stop")
    msg = str(e.value)
    assert f"{tmp_path / 'train.csv'}, line 3:" in msg and reason in msg and "on_error" in msg


def test_maze_csv_import_and_skip(tmp_path):
    write_csv(tmp_path / "train.csv", [GOOD] + [BAD[k][0] for k in sorted(BAD)] + [GOOD])
    write_csv(tmp_path / "test.csv", [GOOD])
    out = maze.build(maze.Config(source=str(tmp_path), size=5, aug=True), seed=0, on_error="skip")
    st = out["stats"]
    assert st["skipped"] == len(BAD) and len(st["skipped_first"]) == 5 and "line 3" in st["skipped_first"][0]
    assert st["train_mazes"] == 2 and out["splits"]["train"].num_examples == 16
    s = out["splits"]["test"]
    assert maze.decode(s.inputs[0], 5) == GOOD[0] and maze.decode(s.labels[0], 5) == GOOD[1]
    assert list(s.inputs[0][:6]) == [3, 2, 2, 2, 2, 2] and list(s.labels[0][:6]) == [3, 5, 5, 5, 5, 2]
    assert s.ratings[0] == 8
    (tmp_path / "test.csv").write_text("src,q,a\n")
    with pytest.raises(UserError, match="line 1: the header"):
        maze.build(maze.Config(source=str(tmp_path), size=5), seed=0, on_error="skip")
    with pytest.raises(UserError, match="train.csv and test.csv"):
        maze.build(maze.Config(source=str(tmp_path / "nowhere"), size=5), seed=0, on_error="stop")


def test_generated_mazes_round_trip_through_csv(tmp_path):
    gen = maze.build(maze.Config(size=11, n_train=4, n_test=3, min_path_length=20), seed=2, on_error="stop")
    for split in ("train", "test"):
        s = gen["splits"][split]
        write_csv(tmp_path / f"{split}.csv",
                  [(maze.decode(q, 11), maze.decode(a, 11)) for q, a in zip(s.inputs, s.labels)])
    imported = maze.build(maze.Config(source=str(tmp_path), size=11), seed=0, on_error="stop")
    assert same_splits(gen, imported) and imported["stats"]["ambiguous"] == 0
    assert all(np.array_equal(gen["splits"][s].ratings, imported["splits"][s].ratings) for s in ("train", "test"))
    assert imported["stats"]["train_test_overlap"] == 0
    assert maze.inputs(maze.Config(source=str(tmp_path))) == {"train": str(tmp_path / "train.csv"),
                                                             "test": str(tmp_path / "test.csv")}
    assert maze.inputs(maze.Config()) == {}
    sub = maze.build(maze.Config(source=str(tmp_path), size=11, n_train=2), seed=0, on_error="stop")
    assert sub["splits"]["train"].num_examples == 2  # the official subsample_size, seeded


def test_maze_hf_unreachable_says_to_pass_a_local_csv(monkeypatch):
    import huggingface_hub

    def offline(**kw):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError, match="sapientinc/maze-30x30-hard-1k.*Network is unreachable.*maze.source=/path"):
        maze.build(maze.Config(source="hf"), seed=0, on_error="stop")


# ---------------------------------------------------------------------------------------------
# ARC


def write_task(path, train, test) -> dict:
    task = {"train": [{"input": i, "output": o} for i, o in train],
            "test": [{"input": i, "output": o} for i, o in test]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(task))
    return task


@pytest.fixture
def arc_dir(tmp_path):
    write_task(tmp_path / "training" / "t1.json", [([[1, 2], [3, 4]], [[4, 3], [2, 1]])],
               [([[5, 6, 7]], [[7, 6, 5]])])
    e1 = write_task(tmp_path / "evaluation" / "e1.json",
                    [([[1, 0], [0, 0]], [[0, 0], [0, 1]]), ([[2, 2, 0]], [[0, 2, 2]])],
                    [([[3, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 3]])])
    return tmp_path, e1


def test_arc_import_writes_the_documented_arrays(arc_dir):
    root, e1 = arc_dir
    out = arc.build(arc.Config(path=str(root), num_aug=0), seed=0, on_error="stop")
    assert out["vocab"] == ["<pad>", "<eos>"] + [str(c) for c in range(10)] and out["grid"] == [30, 30]
    assert out["identifiers"] == ["<blank>", "t1", "e1"] and out["test_puzzles"] == {"e1": e1}
    tr, te = out["splits"]["train"], out["splits"]["test"]
    tr.check(12, "train")
    te.check(12, "test")
    # train: t1's demonstration and test pair, then e1's two demonstrations; test: e1's test pair
    assert list(tr.puzzle_indices) == [0, 2, 4] and list(tr.group_indices) == [0, 1, 2]
    assert list(tr.puzzle_identifiers) == [1, 2] and list(te.puzzle_identifiers) == [2]
    assert list(te.puzzle_indices) == [0, 1] and list(te.group_indices) == [0, 1]
    canvas = te.inputs[0].reshape(30, 30)
    expected = np.zeros((30, 30), np.uint8)
    expected[:2, :3] = [[5, 2, 2], [2, 2, 2]]
    expected[2, :3] = 1  # the eos row under the grid
    expected[:2, 3] = 1  # the eos column right of it
    assert np.array_equal(canvas, expected)
    assert np.array_equal(arc.crop(te.labels[0]), [[0, 0, 0], [0, 0, 3]])
    # train examples: the same grids, all but one per puzzle at a random offset
    originals = [([[1, 2], [3, 4]], [[4, 3], [2, 1]]), ([[5, 6, 7]], [[7, 6, 5]]),
                 ([[1, 0], [0, 0]], [[0, 0], [0, 1]]), ([[2, 2, 0]], [[0, 2, 2]])]
    untranslated = [0, 0]
    for row, (i, o) in enumerate(originals):
        for ids, grid in ((tr.inputs[row], i), (tr.labels[row], o)):
            c = ids.reshape(30, 30)
            rows, cols = np.nonzero(c >= 2)
            r0, c0 = rows.min(), cols.min()
            assert np.array_equal(c[r0:r0 + len(grid), c0:c0 + len(grid[0])] - 2, grid)
            assert (c >= 2).sum() == np.array(grid).size and (c == 1).any()
        untranslated[row // 2] += np.array_equal(arc.crop(tr.inputs[row]), i)
    assert min(untranslated) >= 1
    assert out["stats"]["tasks"] == {"training": 1, "evaluation": 1} and out["stats"]["skipped"] == 0
    assert arc.inputs(arc.Config(path=str(root))) == {"training/t1.json": str(root / "training" / "t1.json"),
                                                      "evaluation/e1.json": str(root / "evaluation" / "e1.json")}


def test_arc_augmentation_groups_names_and_determinism(arc_dir):
    root, e1 = arc_dir
    cfg = arc.Config(path=str(root), num_aug=3)
    out = arc.build(cfg, seed=5, on_error="stop")
    ids = out["identifiers"]
    assert len(ids) == 1 + 2 * 4 and ids[1] == "t1" and ids[5] == "e1"
    assert all(arc.inverse_aug(n)[0] == ("t1" if i < 5 else "e1") for i, n in enumerate(ids[1:], 1))
    assert all(n.split("|||")[1][0] == "t" and n.split("|||")[2][0] == "0" for n in ids[2:5])
    tr, te = out["splits"]["train"], out["splits"]["test"]
    assert list(tr.group_indices) == [0, 4, 8] and list(te.group_indices) == [0, 4]
    assert list(te.puzzle_identifiers) == [5, 6, 7, 8]
    for row in range(4):  # every variant of the test pair maps back to e1's test pair
        name = ids[te.puzzle_identifiers[row]]
        _, inverse = arc.inverse_aug(name)
        assert np.array_equal(inverse(arc.crop(te.inputs[row])), e1["test"][0]["input"])
        assert np.array_equal(inverse(arc.crop(te.labels[row])), e1["test"][0]["output"])
    assert same_splits(out, arc.build(cfg, seed=5, on_error="stop"))
    assert not same_splits(out, arc.build(cfg, seed=6, on_error="stop"))


def test_arc_duplicate_augmentations_are_rejected(tmp_path):
    # a single-colour 1x1 task is the same under every transform and colour map: no variant is new
    write_task(tmp_path / "evaluation" / "z.json", [([[0]], [[0]])], [([[0]], [[0]])])
    out = arc.build(arc.Config(path=str(tmp_path), subsets=["evaluation"], num_aug=4), seed=0, on_error="stop")
    assert out["identifiers"] == ["<blank>", "z"] and out["stats"]["augmentation_short"] == 1


def test_arc_bad_grids_name_the_task(tmp_path):
    write_task(tmp_path / "evaluation" / "ok.json", [([[1]], [[2]])], [([[1]], [[2]])])
    write_task(tmp_path / "evaluation" / "ragged.json", [([[1, 2], [3]], [[1]])], [([[1]], [[1]])])
    cfg = arc.Config(path=str(tmp_path), subsets=["evaluation"], num_aug=0)
    with pytest.raises(UserError) as e:
        arc.build(cfg, seed=0, on_error="stop")
    msg = str(e.value)
    assert "ragged.json" in msg and "train[0].input is ragged: row 1 has 1 cells, row 0 has 2" in msg
    big = [[1] * 31 for _ in range(31)]
    (tmp_path / "evaluation" / "ragged.json").unlink()
    write_task(tmp_path / "evaluation" / "big.json", [([[1]], [[1]])], [([[1]], big)])
    with pytest.raises(UserError, match=r"big\.json: task big: test\[0\]\.output is 31x31, larger than ARC's 30x30"):
        arc.build(cfg, seed=0, on_error="stop")
    out = arc.build(cfg, seed=0, on_error="skip")
    assert out["stats"]["skipped"] == 1 and "big" in out["stats"]["skipped_first"][0]
    assert list(out["test_puzzles"]) == ["ok"]
    with pytest.raises(UserError, match="neither"):
        arc.build(arc.Config(path=str(tmp_path), num_aug=0), seed=0, on_error="stop")  # no training/


def test_arc_kaggle_layout(tmp_path):
    chal = {"k1": {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[3]]}]}}
    (tmp_path / "x_evaluation_challenges.json").write_text(json.dumps(chal))
    (tmp_path / "x_evaluation_solutions.json").write_text(json.dumps({"k1": [[[4]]]}))
    cfg = arc.Config(path=str(tmp_path / "x"), subsets=["evaluation"], num_aug=1)
    out = arc.build(cfg, seed=0, on_error="stop")
    assert out["test_puzzles"]["k1"]["test"][0]["output"] == [[4]] and out["info"]["layout"] == "kaggle"
    assert np.array_equal(arc.crop(out["splits"]["test"].labels[0]), [[4]])
    (tmp_path / "x_evaluation_solutions.json").unlink()  # no solutions: the official dummy output
    out = arc.build(cfg, seed=0, on_error="stop")
    assert out["stats"]["dummy_test_outputs"] == 1 and out["stats"]["dummy_outputs_subsets"] == ["evaluation"]
    assert out["test_puzzles"]["k1"]["test"][0]["output"] == [[0]]


@pytest.mark.skipif(not (ARC_DIR / "evaluation").is_dir(), reason=f"{ARC_DIR} not present (../shared/data)")
def test_arc_real_evaluation_subset():
    cfg = arc.Config(path=str(ARC_DIR), subsets=["evaluation"], max_tasks=4, num_aug=2)
    out = arc.build(cfg, seed=0, on_error="stop")
    names = sorted(p.stem for p in (ARC_DIR / "evaluation").glob("*.json"))[:4]
    assert list(out["test_puzzles"]) == names
    tasks = {n: json.loads((ARC_DIR / "evaluation" / f"{n}.json").read_text()) for n in names}
    assert out["test_puzzles"] == tasks
    te, tr = out["splits"]["test"], out["splits"]["train"]
    te.check(12, "test")
    tr.check(12, "train")
    assert te.num_examples == 3 * sum(len(t["test"]) for t in tasks.values())
    assert tr.num_examples == 3 * sum(len(t["train"]) for t in tasks.values())
    assert te.num_groups == tr.num_groups == 4 and len(out["identifiers"]) == 1 + 12
    for row in range(te.num_examples):
        p = int(np.searchsorted(te.puzzle_indices, row, side="right") - 1)
        task, inverse = arc.inverse_aug(out["identifiers"][te.puzzle_identifiers[p]])
        inputs = [pair["input"] for pair in tasks[task]["test"]]
        assert any(np.array_equal(inverse(arc.crop(te.inputs[row])), i) for i in inputs)


def official_crop(ids: np.ndarray) -> np.ndarray:
    """The official row-by-row scan, written plainly, to compare `crop` with."""
    g = ids.reshape(30, 30)
    best, size, width = 0, (0, 0), 30
    for r in range(1, 31):
        for c in range(1, width + 1):
            if not 2 <= g[r - 1, c - 1] <= 11:
                width = c - 1
                break
        if r * width > best:
            best, size = r * width, (r, width)
    return (g[:size[0], :size[1]] - 2).astype(np.uint8)


def test_crop_matches_the_official_scan_and_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(1, 31, size=2)
        canvas = np.zeros((30, 30), np.int64)
        canvas[:h, :w] = rng.integers(2, 12, size=(h, w))
        noise = rng.random((30, 30)) < rng.choice([0.0, 0.02, 0.2])  # a model's stray pads / eos anywhere
        canvas[noise] = rng.integers(0, 2, size=noise.sum())
        assert np.array_equal(arc.crop(canvas.reshape(-1)), official_crop(canvas.reshape(-1)))
    assert arc.crop(np.zeros(900, np.int64)).shape == (0, 0)
    for shape in ((7, 13), (30, 30), (1, 1), (30, 4)):
        grid = rng.integers(0, 10, size=shape).astype(np.uint8)
        for _ in range(6):
            name, fn = arc.draw_aug(rng, "task")
            enc, _ = arc.encode_pair(fn(grid), fn(grid))
            task, inverse = arc.inverse_aug(name)
            assert task == "task" and np.array_equal(inverse(arc.crop(enc)), grid)
        for t in range(8):
            assert np.array_equal(arc.inverse_dihedral(arc.dihedral(grid, t), t), grid)
    assert arc.grid_hash(np.array([[1, 2]])) != arc.grid_hash(np.array([[1], [2]]))


def test_vote_majority_pass_at_k_and_q_tie_break():
    def task(tests):
        return {"train": [{"input": [[0]], "output": [[0]]}],
                "test": [{"input": i, "output": o} for i, o in tests]}

    a_in0, a_out0 = [[1, 2], [3, 0]], [[2, 1], [0, 3]]
    a_in1, a_out1 = [[4]], [[5, 5]]
    b_in, b_out = [[7, 0, 7]], [[7], [7]]
    puzzles = {"A": task([(a_in0, a_out0), (a_in1, a_out1)]), "B": task([(b_in, b_out)]),
               "C": task([([[1]], [[2]])])}
    wrong = [[9, 9], [9, 9]]
    rng = np.random.default_rng(1)
    preds = []

    def predict(t, inp, out, q, augmented=True):
        name, fn = arc.draw_aug(rng, t) if augmented else (t, lambda g: g)
        enc_in, _ = arc.encode_pair(fn(np.array(inp, np.uint8)), fn(np.array(inp, np.uint8)))
        _, enc_out = arc.encode_pair(fn(np.array(out, np.uint8)), fn(np.array(out, np.uint8)))
        preds.append((name, enc_in, enc_out, q))

    # A, pair 0: the majority (3 of 5, under different augmentations) is right
    for q in (0.2, 0.3, 0.1):
        predict("A", a_in0, a_out0, q)
    for q in (0.9, 0.9):
        predict("A", a_in0, wrong, q)
    # A, pair 1: the wrong grid has more votes: wrong at pass@1, right at pass@2
    for q in (0.5, 0.6):
        predict("A", a_in1, wrong, q)
    predict("A", a_in1, a_out1, 0.99, augmented=False)
    # B: one vote each; the first voted is wrong, the right one has the higher q and wins
    predict("B", b_in, wrong, 0.3)
    predict("B", b_in, b_out, 0.7)
    # C: no predictions at all: wrong
    result = arc.vote(preds, puzzles, pass_ks=(1, 2))
    assert result["pass@1"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert result["pass@2"] == pytest.approx((1 + 1 + 0) / 3)
    assert result["num_tasks"] == 3 and result["tasks_without_predictions"] == ["C"]
    sub = result["submission"]
    assert sub["A"][0] == {"attempt_1": a_out0, "attempt_2": wrong}
    assert sub["A"][1] == {"attempt_1": wrong, "attempt_2": a_out1}
    assert sub["B"] == [{"attempt_1": b_out, "attempt_2": wrong}]
    assert sub["C"] == [{"attempt_1": [[0]], "attempt_2": [[0]]}]
    # with equal q the tie keeps the first-voted grid (a stable sort, as the official)
    tie = arc.vote([(n, i, o, 0.5) for n, i, o, _ in preds[-2:]], {"B": puzzles["B"]})
    assert tie["pass@1"] == 0.0 and tie["pass@2"] == 1.0
