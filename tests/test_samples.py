"""The samples stage: k labelled samples per problem from a micro SFT model, in resumable chunks; pairs from them."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from conftest import build_micro_pipeline

from lmlab.cli import main
from lmlab.tasks import TASKS
from lmlab.tasks import samples as samples_stage
from lmlab.tasks.problems import answer_rules

GSM8K = {"question": "Tom has 3 apples and buys 2 more. How many apples has he now?", "answer": "3 + 2 = 5\n#### 5"}
# 6 problems in chunks of 2: three chunks, each one `complete` call
ARGS = ["n_samples=2", "max_new_tokens=16", "chunk_size=2", "batch_size=16", "device=cpu"]


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A micro model (192-token context) finetuned for a few steps on tasks output: a real sft run; 6 problems."""
    from lmlab.tasks import stage
    from lmlab.train import sft

    root = tmp_path_factory.mktemp("samples")
    p = build_micro_pipeline(root, seq_len=193, steps=6)
    tasks = stage.run(stage.Config(out=str(root / "tasks"), tasks=[
        {"name": "arithmetic", "difficulty": [1], "n_train": 6, "n_test": 2, "n_dpo": 3, "n_fewshot": 0},
        {"name": "sort", "difficulty": [1], "n_train": 6, "n_test": 2, "n_dpo": 3, "n_fewshot": 0}]))
    s = sft.run(sft.Config(init=str(p["model"]), data=[str(tasks / "sft_train.jsonl")], out=str(root / "sft"),
                           seq_len=160, val_fraction=0.0,
                           train={"steps": 3, "batch_size": 4, "lr": 3e-3, "device": "cpu"},
                           eval={"every": 0, "batches": 0}, log={"every": 1}, checkpoint={"every": 0}))
    problems = root / "problems.jsonl"  # both tasks and a GSM8K record without task or difficulty
    recs = _read(tasks / "train.jsonl")
    picked = [r for r in recs if r["task"] == "arithmetic"][:3] + [r for r in recs if r["task"] == "sort"][:2]
    problems.write_text("".join(json.dumps(r) + "\n" for r in picked + [GSM8K]), encoding="utf-8")
    return {**p, "root": root, "tasks": tasks, "sft": s, "problems": problems}


def _counting(monkeypatch) -> SimpleNamespace:
    from lmlab.infer import engine

    real = engine.complete
    log = SimpleNamespace(seeds=[], fail_at=None, fake=None)

    def counted(model, tokenizer, prompts, sampling, *a, **kw):
        log.seeds.append(sampling.seed)
        if log.fail_at == len(log.seeds):
            raise KeyboardInterrupt
        if log.fake is not None:
            return [log.fake(tokenizer.decode(ids), i) for i, ids in enumerate(prompts)]
        return real(model, tokenizer, prompts, sampling, *a, **kw)

    monkeypatch.setattr(engine, "complete", counted)
    return log


@pytest.fixture
def calls(monkeypatch):
    """Logs the engine's `complete` calls (one per chunk) by seed; `fail_at = n`: Ctrl-C in call n; `fake`: replies."""
    return _counting(monkeypatch)


def _samples(chat, out, *extra):
    return main(["samples", str(chat["sft"]), f"problems={chat['problems']}", f"out={out}", *ARGS, *extra])


@pytest.fixture(scope="module")
def whole(chat):
    """An uninterrupted run (the reference the resumed ones must equal) and the seeds of its `complete` calls."""
    out = chat["root"] / "whole"
    with pytest.MonkeyPatch.context() as mp:
        log = _counting(mp)
        assert _samples(chat, out) == 0
    return {"out": out, "seeds": log.seeds}


def test_cli_writes_labelled_samples_and_reruns_are_no_ops(chat, whole, calls, capsys):
    out = whole["out"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "samples.jsonl"]  # no chunks, no run.json
    problems = _read(chat["problems"])
    recs = _read(out / "samples.jsonl")
    assert [(r["problem"], r["k"]) for r in recs] == [(i, k) for i in range(6) for k in range(2)]
    for r in recs:
        assert list(r) == list(samples_stage.RECORD_KEYS)
        p = problems[r["problem"]]
        assert (r["question"], r["solution"], r["difficulty"]) == (p["question"], p["answer"], p.get("difficulty"))
        assert r["task"] == p.get("task", "gsm8k")
    assert recs[-1]["task"] == "gsm8k" and recs[-1]["difficulty"] is None and recs[-1]["reference"] == "5"
    _labels_agree(problems, recs)

    m = json.loads((out / "manifest.json").read_text())
    st = m["stats"]
    assert (m["kind"], m["verb"], m["config"]["template"]) == ("samples", "samples", "chatml")
    assert set(m["inputs"]) == {"model", "problems"}
    assert st["problems"] == 6 and st["samples"] == 12 and st["chunks"] == 3 and st["chunks_reused"] == 0
    assert st["samples_correct"] == sum(r["correct"] for r in recs)
    assert st["sample_accuracy"] == st["samples_correct"] / 12
    per = {i: [r["correct"] for r in recs if r["problem"] == i] for i in range(6)}
    assert st["problems_any_correct"] == sum(any(v) for v in per.values())
    assert st["problems_all_correct"] == sum(all(v) for v in per.values())
    assert set(st["per_task"]) == {"arithmetic", "sort", "gsm8k"}
    assert sum(t["samples"] for t in st["per_task"].values()) == 12 and st["samples_per_s"] > 0
    # one call per chunk, chunk c seeded chunk_seed(seed, c)
    assert whole["seeds"] == [samples_stage.chunk_seed(0, c) for c in range(3)]

    # the same command again: a no-op that samples nothing
    capsys.readouterr()
    before = (out / "samples.jsonl").stat().st_mtime_ns
    assert _samples(chat, out) == 0
    assert "samples: up to date" in capsys.readouterr().out and calls.seeds == []
    assert (out / "samples.jsonl").stat().st_mtime_ns == before
    # a changed n_samples samples again, in place
    changed = chat["root"] / "changed_k"
    shutil.copytree(out, changed)
    assert _samples(chat, changed, "n_samples=3") == 0 and len(calls.seeds) == 3
    assert [(r["problem"], r["k"]) for r in _read(changed / "samples.jsonl")] == [(i, k) for i in range(6)
                                                                                  for k in range(3)]

    # completions the checkers accept too (a micro model rarely writes one): sample 0 is the reference
    # solution, sample 1 the same with a wrong answer; the labels still agree with every checker
    def fake(prompt: str, i: int) -> str:
        p = next(p for p in problems if p["question"] in prompt)
        return p["answer"] if i % 2 == 0 else p["answer"].rsplit("#### ", 1)[0] + "#### 999999"

    calls.fake = fake
    assert _samples(chat, chat["root"] / "fake") == 0
    recs = _read(chat["root"] / "fake" / "samples.jsonl")
    assert [r["correct"] for r in recs] == [True, False] * 6
    _labels_agree(problems, recs)
    st = json.loads((chat["root"] / "fake" / "manifest.json").read_text())["stats"]
    assert (st["sample_accuracy"], st["problems_any_correct"], st["problems_all_correct"]) == (0.5, 6, 0)


def _labels_agree(problems, recs):
    """Every record's answer, reference and label are the evaluation's strict rules and the task's checker."""
    for r in recs:
        p = problems[r["problem"]]
        strict, _, ref = answer_rules(p.get("task"))
        assert r["answer"] == strict(r["completion"]) and r["reference"] == ref(p["answer"])
        assert r["correct"] == (r["answer"] is not None and r["answer"] == r["reference"])
        if r["task"] in TASKS:  # the task's own checker agrees with the label
            check_ref = SimpleNamespace(answer=p["answer"].rsplit("#### ", 1)[1])
            assert TASKS[r["task"]].check(r["completion"], check_ref) == r["correct"]


def test_interrupted_run_keeps_its_chunks_and_resumes_to_the_same_bytes(chat, whole, calls, capsys):
    seeds, reference = whole["seeds"], (whole["out"] / "samples.jsonl").read_bytes()
    out = chat["root"] / "resumed"
    calls.fail_at = 2  # Ctrl-C while the second chunk samples
    assert _samples(chat, out) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert "1 of 3 chunks finished" in err[-1] and "run the same command again" in err[-1], err
    assert not (out / "manifest.json").exists() and not (out / "samples.jsonl").exists()
    assert json.loads((out / "run.json").read_text())["kind"] == "samples"
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["chunk_00000.jsonl", "state.json"]
    # the unfinished run is the samples stage's: another stage refuses it
    assert main(["pairs", str(chat["sft"]), f"problems={chat['problems']}", f"out={out}", "device=cpu"]) == 2
    assert "unfinished 'samples' run" in capsys.readouterr().err

    calls.fail_at, calls.seeds[:] = None, []
    assert _samples(chat, out) == 0
    assert "1 of 3 chunks already sampled" in capsys.readouterr().out
    assert calls.seeds == seeds[1:]  # chunk 0 was not sampled again
    assert (out / "samples.jsonl").read_bytes() == reference
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "samples.jsonl"]
    st = json.loads((out / "manifest.json").read_text())["stats"]
    assert st["chunks_reused"] == 1 and st["samples"] == 12

    # the chunks of a run whose config changed are dropped; a damaged chunk is sampled again
    other = chat["root"] / "changed"
    calls.fail_at, calls.seeds[:] = 2, []
    assert _samples(chat, other, "seed=1") == 130
    calls.fail_at, calls.seeds[:] = 3, []
    assert _samples(chat, other) == 130 and calls.seeds == seeds
    assert "starting over" in capsys.readouterr().err
    with open(other / "chunks" / "chunk_00000.jsonl", "a", encoding="utf-8") as f:
        f.write("{}\n")
    calls.fail_at, calls.seeds[:] = None, []
    assert _samples(chat, other) == 0 and calls.seeds == [seeds[0], seeds[2]]
    assert (other / "samples.jsonl").read_bytes() == reference


def test_pairs_sample_through_the_samples_code_and_accept_a_samples_artifact(chat, calls, capsys):
    common = ["n_samples=2", "max_new_tokens=24", "batch_size=16"]
    root = chat["root"]
    assert main(["samples", str(chat["sft"]), f"problems={chat['problems']}", f"out={root / 's64'}", *common,
                 "device=cpu"]) == 0
    assert main(["pairs", str(chat["sft"]), f"problems={chat['problems']}", f"out={root / 'p_model'}", *common,
                 "pairs_per_problem=2", "device=cpu"]) == 0
    n = len(calls.seeds)
    assert main(["pairs", f"samples={root / 's64'}", f"out={root / 'p_samples'}", "pairs_per_problem=2"]) == 0
    assert len(calls.seeds) == n  # nothing sampled
    for name in ("pairs.jsonl", "samples.jsonl"):
        assert (root / "p_model" / name).read_bytes() == (root / "p_samples" / name).read_bytes()
    assert (root / "p_samples" / "samples.jsonl").read_bytes() == (root / "s64" / "samples.jsonl").read_bytes()
    m = json.loads((root / "p_samples" / "manifest.json").read_text())
    assert set(m["inputs"]) == {"samples"} and m["config"]["n_samples"] == 2
    assert m["config"]["model"] == str(chat["sft"])
    assert m["stats"]["pairs"] == len(_read(root / "p_samples" / "pairs.jsonl"))
    capsys.readouterr()
    assert main(["pairs", f"samples={root / 's64'}", f"out={root / 'p_samples'}", "pairs_per_problem=2"]) == 0
    assert "pairs: up to date" in capsys.readouterr().out
    # the samples fix how they were drawn: a sampling option as well is refused
    assert main(["pairs", f"samples={root / 's64'}", f"out={root / 'p_bad'}", "n_samples=3"]) == 2
    assert "drop n_samples" in capsys.readouterr().err and not (root / "p_bad").exists()


def test_user_errors_exit_2_and_write_nothing(chat, calls, capsys):
    root = chat["root"]
    good = _read(chat["problems"])[0]

    def fails(argv, name, *expect):
        out = root / name
        assert main(["samples", *ARGS, *argv, f"out={out}"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and all(x in err for x in expect), err
        assert not out.exists() and not list(root.glob(f".{name}.tmp-*"))

    problems = f"problems={chat['problems']}"
    fails([problems], "e0", "no model given")
    fails([str(chat["model"]), problems], "e1", "no chat template", "lmlab sft", "template=chatml")
    fails([str(root / "nope"), problems], "e2", "model not found")
    fails([str(chat["sft"])], "e3", "no problems given")
    fails([str(chat["sft"]), f"problems={root / 'missing.jsonl'}"], "e4", "problems file not found")
    bad = root / "bad.jsonl"
    for text, expect in ((json.dumps(good) + '\n{"question": "2 + 2?", "answer": \n', [f"{bad}:2", "not valid JSON"]),
                         (json.dumps({"question": "2 + 2?", "answer": "It is 4."}) + "\n", [f"{bad}:1", "'#### N'"]),
                         (json.dumps({**GSM8K, "difficulty": "hard"}) + "\n", ["difficulty 'hard'", "integer"])):
        bad.write_text(text, encoding="utf-8")
        fails([str(chat["sft"]), f"problems={bad}"], "e5", *expect)
    fails([str(chat["sft"]), problems, "max_new_tokens=192"], "e6", "max_new_tokens=192", "lower it")
    # an out holding another artifact is refused and left intact
    before = (chat["tasks"] / "train.jsonl").read_bytes()
    assert main(["samples", str(chat["sft"]), problems, f"out={chat['tasks']}", *ARGS]) == 2
    assert "'tasks' artifact" in capsys.readouterr().err
    assert (chat["tasks"] / "train.jsonl").read_bytes() == before
    assert calls.seeds == []


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["samples", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("problems", "out", "template", "n_samples", "temperature", "top_p", "top_k", "max_new_tokens",
                "max_problems", "batch_size", "chunk_size", "seed", "device"):
        assert f"  {opt}  [" in text


def test_label_and_stats_on_hand_made_completions():
    problems = [{"question": "q1", "answer": "2 + 3 = 5\n#### 5", "task": "arithmetic", "difficulty": 1},
                {"question": "q2", "answer": "Sorted.\n#### 1, 2, 3", "task": "sort", "difficulty": 2},
                {"question": "q3", "answer": "x\n#### 1,000"}]
    outs = [["#### 5", "#### 4"], ["#### 1 2 3.", "#### 1, 2, 3"], ["#### 1000", "  "]]
    recs = samples_stage.label(problems, outs, start=10)
    assert [(r["problem"], r["k"], r["correct"]) for r in recs] == [
        (10, 0, True), (10, 1, False), (11, 0, True), (11, 1, True), (12, 0, True), (12, 1, False)]
    assert recs[2]["answer"] == recs[2]["reference"] and recs[5]["answer"] is None and recs[4]["task"] == "gsm8k"
    st = samples_stage.sample_stats(recs)
    assert (st["problems"], st["samples"], st["samples_correct"]) == (3, 6, 4)
    assert (st["problems_any_correct"], st["problems_all_correct"], st["samples_unparseable"], st["samples_empty"]) == \
        (3, 1, 1, 1)
    assert st["per_task"]["sort"] == {"problems": 1, "samples": 2, "samples_correct": 2, "problems_any_correct": 1,
                                      "problems_all_correct": 1, "sample_accuracy": 1.0}
    assert samples_stage.parse_records(samples_stage.records_bytes(recs)) == recs
    seeds = {samples_stage.chunk_seed(s, c) for s in range(3) for c in range(50)}
    assert len(seeds) == 150 and max(seeds) < 2 ** 48
