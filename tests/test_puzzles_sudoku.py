"""Sudoku puzzle sets: the solver, the rating, the generator, the augmentations, the CSV
importer and the `lmlab puzzles` stage through the real CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from lmlab.config import build_config
from lmlab.data.puzzles import format as fmt
from lmlab.data.puzzles import stage, sudoku
from lmlab.errors import UserError

from conftest import ROOT, SHARED_DATA

DIABOLICAL = SHARED_DATA / "sudoku-diabolical" / "test.csv"
needs_diabolical = pytest.mark.skipif(not DIABOLICAL.is_file(), reason=f"{DIABOLICAL} is absent (real puzzles)")

# The first row of the diabolical file (sudoku-exchange, rating 7.2), so the tests run without it.
Q = ".83.2..9....8..1...293....8....987...7.....6...674....3....698...2..5....1..3.54."
A = "183524697547869123629317458235698714471253869896741235354176982962485371718932546"
# "The world's hardest Sudoku" (Arto Inkala): needs many guesses.
HARD = "8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4.."


def _rows(limit=None):
    with open(DIABOLICAL, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return rows[:limit] if limit else rows


# ----------------------------------------------------------------------------- solver

def test_solver_solves_known_puzzles():
    r = sudoku.solve(Q)
    assert r.unique and r.solutions == [A]
    hard = sudoku.solve(HARD)
    assert hard.unique and hard.guesses > 0 and hard.backtracks > 0
    sudoku.validate(HARD, hard.solutions[0])
    if DIABOLICAL.is_file():
        for _, q, a, _ in _rows(20):
            assert sudoku.solve(q).solutions == [a]


def test_solver_counts_zero_one_and_two_solutions():
    assert sudoku.solve(A).count == 1 and sudoku.solve(A).guesses == 0  # a full grid
    dup = "55" + Q.replace(".", "0")[2:]  # two 5s in the first row
    assert sudoku.solve(dup).count == 0
    # consistent givens, no solution: row 1 has 1-8 and column 9 already has a 9
    no_place = "123456780" + "000000009" + "0" * 63
    assert sudoku.solve(no_place).count == 0
    assert sudoku.solve("0" * 81).count == 2 and sudoku.solve("0" * 81, limit=1).count == 1
    # a deadly rectangle: digits x, y at the corners of two rows of one band can be swapped
    grid = list(A)
    r1, r2 = 0, 1
    c1, c2 = next((a, b) for a in range(9) for b in range(a + 1, 9)
                  if grid[r1 * 9 + a] == grid[r2 * 9 + b] and grid[r1 * 9 + b] == grid[r2 * 9 + a])
    for r in (r1, r2):
        for c in (c1, c2):
            grid[r * 9 + c] = "0"
    two = sudoku.solve("".join(grid))
    assert two.count == 2 and A in two.solutions
    for s in two.solutions:
        sudoku.validate("".join(grid), s)


def test_rating_is_the_backtracks_of_the_uniqueness_proof():
    assert sudoku.rating(A) == 0
    assert sudoku.rating(HARD) == sudoku.solve(HARD, limit=2).backtracks > 0
    assert sudoku.givens(Q) == 81 - Q.count(".") and sudoku.givens(HARD) == 21


def test_validate_names_the_problem():
    sudoku.validate(Q, A)
    with pytest.raises(sudoku.InvalidSudoku, match="repeats"):
        sudoku.validate(Q, A[1] + A[0] + A[2:])
    with pytest.raises(sudoku.InvalidSudoku, match="contradicts a given"):
        sudoku.validate("9" + Q[1:], A)  # cell 1 is blank in Q and 1 in A
    with pytest.raises(sudoku.InvalidSudoku, match="complete"):
        sudoku.validate(Q, "0" + A[1:])


# ----------------------------------------------------------------------------- generator

def test_generator_unique_in_range_and_deterministic():
    a = sudoku.generate(6, seed=0, split="train", blanks=(40, 48), show_progress=False)
    for p, s, r in zip(a.puzzles, a.solutions, a.ratings):
        sudoku.validate(p, s)
        check = sudoku.solve(p)
        assert check.unique and check.solutions[0] == s and r == check.backtracks
        assert 40 <= p.count("0") <= 48
    b = sudoku.generate(6, seed=0, split="train", blanks=(40, 48), show_progress=False)
    assert a == b
    prefix = sudoku.generate(3, seed=0, split="train", blanks=(40, 48), show_progress=False)
    assert prefix.puzzles == a.puzzles[:3]  # puzzle i depends on (seed, split, i) only
    c = sudoku.generate(6, seed=1, split="train", blanks=(40, 48), show_progress=False)
    t = sudoku.generate(6, seed=0, split="test", blanks=(40, 48), show_progress=False)
    assert not set(c.puzzles) & set(a.puzzles) and not set(t.puzzles) & set(a.puzzles)


def test_generator_reaches_hard_targets_and_fails_clearly():
    hard = sudoku.generate(2, seed=3, blanks=(54, 56), show_progress=False)
    assert all(54 <= p.count("0") <= 56 and sudoku.solve(p).unique for p in hard.puzzles)
    with pytest.raises(UserError, match="max_attempts"):
        sudoku.generate(1, seed=0, blanks=(64, 64), max_attempts=2, show_progress=False)
    with pytest.raises(UserError, match="rating"):
        sudoku.generate(1, seed=0, blanks=(30, 32), min_rating=1, max_attempts=2, show_progress=False)


# ----------------------------------------------------------------------------- augmentation

def test_augmentations_keep_validity_and_are_not_the_identity():
    p, s = sudoku.cells(Q), sudoku.cells(A)
    rng = np.random.default_rng(0)
    index, digit_map = sudoku._transforms(200, rng)
    aug_p, aug_s = sudoku.augment_many(Q, A, 200, np.random.default_rng(0))
    transposed = 0
    for k in range(200):
        assert sorted(index[k]) == list(range(81))  # a permutation of the cells
        assert digit_map[k, 0] == 0 and sorted(digit_map[k, 1:]) == list(range(1, 10))  # a bijection on digits
        assert (aug_p[k] == digit_map[k][np.array(p)[index[k]]]).all()
        assert (aug_s[k] == digit_map[k][np.array(s)[index[k]]]).all()  # the same transform for both
        sudoku.validate(aug_p[k], aug_s[k])
        assert (aug_p[k] == 0).sum() == Q.count(".")
        first_row = index[k][:9]
        assert len({i // 9 for i in first_row}) == 1 or len({i % 9 for i in first_row}) == 1
        transposed += len({i % 9 for i in first_row}) == 1
        assert len({i // 27 for i in index[k][:27]}) == 1 or len({(i % 9) // 3 for i in index[k][:27]}) == 1
    assert 50 < transposed < 150  # a transpose with probability 1/2
    originals = (aug_p == np.array(p)).all(1) & (aug_s == np.array(s)).all(1)
    assert not originals.all() and len({tuple(x) for x in aug_s}) > 150
    one = sudoku.augment(Q, A, np.random.default_rng(5))
    assert one == sudoku.augment(Q, A, np.random.default_rng(5)) and one != (Q.replace(".", "0"), A)
    sudoku.validate(*one)


def test_to_split_layout_and_augmentation():
    puz = sudoku.Puzzles()
    puz.append(Q.replace(".", "0"), A, 7.0)
    puz.append(HARD.replace(".", "0"), sudoku.solve(HARD).solutions[0], 3.0)
    sp = sudoku.to_split(puz, augment=3, seed=0)
    assert sp.inputs.shape == (8, 81) and sp.inputs.dtype == np.uint8
    assert sp.puzzle_indices.tolist() == list(range(9)) and sp.group_indices.tolist() == [0, 4, 8]
    assert sp.puzzle_identifiers.tolist() == [0] * 8 and sp.ratings.tolist() == [7.0] * 4 + [3.0] * 4
    assert sp.inputs[0].tolist() == [int(c) + 1 for c in Q.replace(".", "0")]  # the original first
    assert sp.labels[0].tolist() == [int(c) + 1 for c in A]
    for x, y in zip(sp.inputs, sp.labels):
        sudoku.validate(x - 1, y - 1)
    sp.check(len(sudoku.VOCAB), "test")
    again = sudoku.to_split(puz, augment=3, seed=0)
    assert (again.inputs == sp.inputs).all() and not (sudoku.to_split(puz, 3, seed=1).inputs == sp.inputs).all()


# ----------------------------------------------------------------------------- CSV import

def _write(path, rows, header=True):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(sudoku.HEADER)
        w.writerows(rows)
    return path


def _good_rows():
    rows = [["s", Q, A, "7.2"]]
    rng = np.random.default_rng(1)
    for r in (3, 11):
        p, s = sudoku.augment(Q, A, rng)
        rows.append(["aug", p.replace("0", "."), s, str(r)])
    return rows


def test_csv_import_good_file(tmp_path):
    path = _write(tmp_path / "good.csv", _good_rows())
    puz, stats = sudoku.read_csv(path, show_progress=False)
    assert len(puz) == 3 and puz.ratings == [7.2, 3.0, 11.0] and puz.puzzles[0] == Q.replace(".", "0")
    assert stats["rows"] == 3 and stats["skipped"] == 0 and stats["sources"] == {"s": 1, "aug": 2}
    hard, _ = sudoku.read_csv(path, min_rating=5, show_progress=False)
    assert hard.ratings == [7.2, 11.0]
    sub, _ = sudoku.read_csv(path, n=2, seed=4, show_progress=False)
    assert len(sub) == 2 and sub == sudoku.read_csv(path, n=2, seed=4, show_progress=False)[0]
    mine, _ = sudoku.read_csv(path, rating_from="solver", show_progress=False)
    assert mine.ratings == [float(sudoku.rating(p)) for p in mine.puzzles]


def _bad(case):
    q, a = Q, A
    if case == "length":
        q = q[:80]
    elif case == "character":
        q = "x" + q[1:]
    elif case == "contradiction":
        q = q[0] + "9" + q[2:]  # cell 2 is a given 8 (the answer's digit there)
    elif case == "invalid":
        a = a[1] + a[0] + a[2:]
    return ["bad", q, a, "1"]


@pytest.mark.parametrize("case,message", [("length", "80 characters"), ("character", "'x'"),
                                          ("contradiction", "contradicts a given"), ("invalid", "not a valid Sudoku")])
def test_csv_bad_row_stops_naming_file_and_line_or_is_skipped(tmp_path, case, message):
    rows = _good_rows()
    rows.insert(1, _bad(case))
    path = _write(tmp_path / f"{case}.csv", rows)
    with pytest.raises(UserError) as e:
        sudoku.read_csv(path, show_progress=False)
    assert str(path) in str(e.value) and "line 3" in str(e.value) and message in str(e.value)
    assert "on_error=skip" in str(e.value)
    puz, stats = sudoku.read_csv(path, on_error="skip", show_progress=False)
    assert len(puz) == 3 and stats["skipped"] == 1 and "line 3" in stats["skipped_first"][0]


def test_csv_missing_header_file_and_hub(tmp_path, monkeypatch):
    path = _write(tmp_path / "noheader.csv", _good_rows(), header=False)
    for on_error in ("stop", "skip"):
        with pytest.raises(UserError, match=r"noheader.csv line 1: the header is missing"):
            sudoku.read_csv(path, on_error=on_error, show_progress=False)
    with pytest.raises(UserError, match="not found"):
        sudoku.read_csv(tmp_path / "nope.csv", show_progress=False)

    import huggingface_hub

    def offline(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError, match="could not be reached.*source=csv"):
        sudoku.download(sudoku.HF_REPO, "train.csv")


@needs_diabolical
def test_real_diabolical_csv_imports():
    puz, stats = sudoku.read_csv(DIABOLICAL, show_progress=False)
    rows = _rows()
    assert len(puz) == len(rows) == 1000 and stats["skipped"] == 0
    assert puz.ratings == [float(r[3]) for r in rows] and all(np.isfinite(puz.ratings))
    assert puz.solutions == [r[2] for r in rows]
    assert all(sudoku.solve(p).unique for p in puz.puzzles[:30])


# ----------------------------------------------------------------------------- the stage

def test_config_validation():
    assert stage.Config().kind == "sudoku"
    with pytest.raises(UserError, match="blanks"):
        build_config(stage.Config, {"sudoku": {"train": {"blanks": [50, 70]}}})
    with pytest.raises(UserError, match="path"):
        build_config(stage.Config, {"sudoku": {"train": {"source": "csv"}}})


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lmlab", "puzzles", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_stage_writes_the_format_is_a_noop_and_a_failure_keeps_the_set(tmp_path):
    d = tmp_path / "sudoku"
    args = [f"out={d}", "kind=sudoku", "seed=1", "sudoku.train.n=6", "sudoku.test.n=3",
            "sudoku.train.blanks=[30,36]", "sudoku.test.blanks=[40,44]", "sudoku.augment=2"]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    assert "puzzles: wrote" in r.stdout
    info = fmt.read_info(d)
    assert info["kind"] == "sudoku" and info["grid"] == [9, 9] and info["vocab"] == sudoku.VOCAB
    assert info["vocab_size"] == 11 and info["seq_len"] == 81 and info["num_puzzle_identifiers"] == 1
    assert info["splits"] == {"train": {"examples": 18, "puzzles": 18, "groups": 6},
                              "test": {"examples": 3, "puzzles": 3, "groups": 3}}
    assert json.loads((d / fmt.IDENTIFIERS).read_text()) == ["<blank>"]
    assert not (d / fmt.TEST_PUZZLES).exists()
    train, meta = fmt.read_split(d, "train")
    assert meta["vocab_size"] == 11 and meta["seq_len"] == 81 and meta["num_puzzle_identifiers"] == 1
    assert meta["pad_id"] == meta["ignore_label_id"] == meta["blank_identifier_id"] == 0
    assert train.inputs.shape == (18, 81) and train.inputs.dtype == np.uint8
    assert train.puzzle_indices.tolist() == list(range(19)) and train.group_indices.tolist() == [0, 3, 6, 9, 12, 15, 18]
    assert train.puzzle_identifiers.tolist() == [0] * 18
    assert train.ratings.shape == (18,) and np.isfinite(train.ratings).all()
    assert train.inputs.min() >= 1 and train.labels.min() >= 2 and train.labels.max() <= 10
    for x, y in zip(np.asarray(train.inputs), np.asarray(train.labels)):
        sudoku.validate(x.astype(int) - 1, y.astype(int) - 1)
    test, _ = fmt.read_split(d, "test")
    assert test.num_examples == 3 and all(40 <= int((x == 1).sum()) <= 44 for x in np.asarray(test.inputs))
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["kind"] == "puzzles" and manifest["verb"] == "puzzles"
    assert manifest["stats"]["splits"]["train"]["rating"]["known"] == 6

    again = _cli(*args)
    assert again.returncode == 0 and "up to date" in again.stdout

    bad = _write(tmp_path / "bad.csv", [_good_rows()[0], _bad("length")])
    before = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    fail = _cli(f"out={d}", "sudoku.train.source=csv", f"sudoku.train.path={bad}")
    assert fail.returncode == 2
    assert f"{bad} line 3" in fail.stderr and "Traceback" not in fail.stderr and "error:" in fail.stderr
    assert {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".sudoku.tmp-*"))


def test_stage_imports_csv_with_skips(tmp_path, capsys):
    rows = _good_rows()
    rows.insert(2, _bad("invalid"))
    (tmp_path / "data").mkdir()
    path = _write(tmp_path / "data" / "mixed.csv", rows)
    cfg = build_config(stage.Config, {
        "out": str(tmp_path / "set"), "on_error": "skip",
        "sudoku": {"train": {"source": "csv", "path": str(path)}, "test": {"n": 2, "blanks": [30, 32]}}})
    out = stage.run(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["stats"]["sudoku"]["train"]["skipped"] == 1 and m["stats"]["sudoku"]["train"]["kept"] == 3
    train, _ = fmt.read_split(out, "train")
    assert np.allclose(train.ratings, [7.2, 3, 11])
    capsys.readouterr()
    stage.run(cfg)
    assert "up to date" in capsys.readouterr().out
    _write(path, _good_rows()[:2])  # a changed input file is read again
    stage.run(cfg)
    assert "wrote" in capsys.readouterr().out and fmt.read_split(out, "train")[0].num_puzzles == 2
    # the csv is an input: a directory holding it may not be the out
    with pytest.raises(UserError, match="would replace"):
        stage.run(build_config(stage.Config, {"out": str(tmp_path / "data"),
                                              "sudoku": {"train": {"source": "csv", "path": str(path)}}}))


def test_help_lists_the_options():
    from lmlab.cli import build_stage_parser

    text = build_stage_parser("puzzles", stage).format_help()
    assert "sudoku.train.blanks" in text and "sudoku.augment" in text and "maze" in text

