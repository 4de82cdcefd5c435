"""Embedded verifiable tasks: determinism, disjoint splits, checkers, wrong solutions, the tasks stage."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from lmlab import artifacts
from lmlab.errors import UserError
from lmlab.tasks import TASKS, split_of
from lmlab.tasks import stage

from conftest import ROOT


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generators_are_deterministic_per_seed(name):
    t = TASKS[name]
    a = t.problems("train", 50, seed=3, difficulty=[1, 2, 3])
    b = t.problems("train", 50, seed=3, difficulty=[1, 2, 3])
    c = t.problems("train", 50, seed=4, difficulty=[1, 2, 3])
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert [p.question for p in a] != [p.question for p in c]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_disjoint_by_content(name):
    t = TASKS[name]
    train = t.problems("train", 1500, seed=0, difficulty=[1, 2])
    test = t.problems("test", 100, seed=0, difficulty=[1, 2])
    assert all(split_of(name, p.key) == "train" for p in train)
    assert all(split_of(name, p.key) == "test" for p in test)
    assert not {p.key for p in train} & {p.key for p in test}
    assert not {p.question for p in train} & {p.question for p in test}
    assert len({p.key for p in test}) == len(test)  # each test computation scored once


@pytest.mark.parametrize("name", sorted(TASKS))
def test_solutions_pass_and_wrong_solutions_fail_the_checker(name):
    t = TASKS[name]
    rng = random.Random(0)
    for p in t.problems("train", 300, seed=1, difficulty=[1, 2, 3]):
        assert p.solution.splitlines()[-1] == f"#### {p.answer}"
        assert t.check(p.solution, p)
        wrong = t.wrong_solution(p, rng)
        assert wrong != p.solution and not t.check(wrong, p)
        # a plausible slip: same shape, a few lines changed (one result and what follows, or one swap)
        assert len(wrong.splitlines()) == len(p.solution.splitlines())
        if name == "arithmetic":
            assert wrong.splitlines()[0] == p.solution.splitlines()[0]
        else:
            changed = [a != b for a, b in zip(wrong.splitlines(), p.solution.splitlines())]
            assert sum(changed[:-1]) == 2 and changed[-1]
    assert not t.check("no answer here", p)


def test_arithmetic_difficulty_levels():
    from lmlab.tasks import arithmetic

    for level, steps in ((1, {1}), (2, {2}), (3, {3, 4})):
        ps = arithmetic.problems("train", 100, seed=0, difficulty=[level])
        assert {len(p.meta["ops"]) for p in ps} == steps
        assert all(p.difficulty == level for p in ps)
        if level < 3:
            assert all(n < 20 for p in ps for _, n in p.meta["ops"]) and all(p.meta["start"] < 20 for p in ps)
        for p in ps:  # the worked lines recompute the answer
            lines = p.solution.splitlines()[1:-1]
            for line in lines:
                lhs, rhs = line.split(" = ")
                assert eval(lhs) == int(rhs)  # noqa: S307 - our own digits and + - *
            assert int(lines[-1].split(" = ")[1]) == int(p.answer) >= 0
    with pytest.raises(UserError, match="difficulty"):
        arithmetic.problems("train", 1, difficulty=[7])


def test_sort_extraction_and_check():
    from lmlab.tasks import lists

    p = lists.problems("test", 1, seed=0, difficulty=[1])[0]
    nums = sorted(p.meta["numbers"])
    assert lists.check(f"blah\n#### {', '.join(map(str, nums))}", p)
    assert lists.check(f"#### {' '.join(map(str, nums))}.", p)  # separators do not matter, the list does
    assert not lists.check(f"#### {', '.join(map(str, nums[::-1]))}", p)
    assert not lists.check(f"#### {', '.join(map(str, nums[:-1]))}", p)
    assert lists.extract_flexible("The answer:\n3, 1, 2\n") == "3, 1, 2"
    assert lists.extract_strict("nothing") is None


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tasks_stage_writes_files_deterministically_and_rerun_is_noop(tmp_path, capsys):
    tasks = [{"name": "arithmetic", "difficulty": [1, 2], "n_train": 200, "n_test": 40, "n_fewshot": 4},
             {"name": "sort", "n_train": 50, "n_test": 10, "n_dpo": 20}]
    out = stage.run(stage.Config(out=str(tmp_path / "a"), tasks=tasks, seed=0))
    sft, dpo, test, few = (_read(out / f"{n}.jsonl") for n in ("sft_train", "dpo_train", "test", "fewshot"))
    assert len(sft) == 250 and len(dpo) == 50 + 20 and len(test) == 50 and len(few) == 4 + 8
    assert sft[0]["messages"][0]["role"] == "user" and sft[0]["messages"][1]["role"] == "assistant"
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "tasks" and m["stats"]["test_per_task"] == {"arithmetic": 40, "sort": 10}
    # test problems never appear in any training file
    test_q = {r["question"] for r in test}
    assert not test_q & {r["messages"][0]["content"] for r in sft}
    assert not test_q & {r["prompt"] for r in dpo} and not test_q & {r["question"] for r in few}
    for r in dpo:  # chosen passes, rejected fails the task's checker
        from lmlab.eval.generative import answer_rules
        strict, _, ref = answer_rules(r["task"])
        assert strict(r["chosen"]) == ref(r["chosen"]) and strict(r["rejected"]) != strict(r["chosen"])
    for r in test:
        assert r["answer"].splitlines()[-1].startswith("#### ")
    # train.jsonl: the DPO problems in GSM8K format, line for line (what `lmlab pairs` samples on)
    train = _read(out / "train.jsonl")
    assert [(r["question"], r["answer"], r["task"], r["difficulty"]) for r in train] == \
        [(r["prompt"], r["chosen"], r["task"], r["difficulty"]) for r in dpo]
    assert m["stats"]["train_records"] == len(dpo) and "train.jsonl" in m["stats"]["sha256"]
    capsys.readouterr()
    stage.run(stage.Config(out=str(tmp_path / "a"), tasks=tasks, seed=0))
    assert "up to date" in capsys.readouterr().out
    out2 = stage.run(stage.Config(out=str(tmp_path / "b"), tasks=tasks, seed=0))
    for n in ("sft_train", "dpo_train", "test", "fewshot", "train"):
        assert (out / f"{n}.jsonl").read_bytes() == (out2 / f"{n}.jsonl").read_bytes()
    # a directory written before train.jsonl existed is not up to date: re-running adds it
    (out2 / "train.jsonl").unlink()
    stage.run(stage.Config(out=str(tmp_path / "b"), tasks=tasks, seed=0))
    assert "wrote" in capsys.readouterr().out
    assert (out / "train.jsonl").read_bytes() == (out2 / "train.jsonl").read_bytes()


def test_thinking_replies_split_the_steps_from_the_answer(tmp_path):
    tasks = [{"name": "arithmetic", "n_train": 20, "n_test": 4}, {"name": "sort", "n_train": 10, "n_test": 2}]
    plain = stage.run(stage.Config(out=str(tmp_path / "plain"), tasks=tasks))
    think = stage.run(stage.Config(out=str(tmp_path / "think"), tasks=tasks, thinking=True))
    for a, b in zip(_read(plain / "sft_train.jsonl"), _read(think / "sft_train.jsonl")):
        reply = b["messages"][1]
        assert reply["content"].startswith("#### ") and "\n" not in reply["content"]
        assert reply["thinking"] + "\n" + reply["content"] == a["messages"][1]["content"]
    # only the SFT replies change; the fingerprint of thinking=false is the one from before the option
    assert (plain / "test.jsonl").read_bytes() == (think / "test.jsonl").read_bytes()
    fp = json.loads((plain / "manifest.json").read_text())["fingerprint"]
    assert fp == artifacts.stage_fingerprint("tasks", {"tasks": stage.Config(tasks=tasks).model_dump(mode="json")["tasks"],
                                                       "seed": 0, "shuffle": True}, {})


def test_tasks_cli_and_user_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmlab", "tasks", f"out={tmp_path / 't'}",
                        "tasks=[{name: arithmetic, n_train: 20, n_test: 5}]"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t" / "test.jsonl").is_file()
    r = subprocess.run([sys.executable, "-m", "lmlab", "tasks", f"out={tmp_path / 'u'}", "tasks=[{name: chess}]"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown task 'chess'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "u").exists()
    with pytest.raises(UserError, match="could only make"):
        stage.build(stage.Config(tasks=[{"name": "sort", "difficulty": [1], "n_test": 5000, "n_train": 0}]))
