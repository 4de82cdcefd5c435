"""The pairs stage: on-policy DPO pairs from a micro SFT model's samples, scored by the task checkers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import build_micro_pipeline

from lmlab.cli import main
from lmlab.tasks import TASKS
from lmlab.tasks import pairs as pairs_stage
from lmlab.tasks.pairs import build_pairs, select_pairs


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A micro model (192-token context) finetuned for a few steps on tasks output: a real sft run."""
    from lmlab.tasks import stage
    from lmlab.train import sft

    root = tmp_path_factory.mktemp("pairs")
    p = build_micro_pipeline(root, seq_len=193, steps=6)
    tasks = stage.run(stage.Config(out=str(root / "tasks"), tasks=[
        {"name": "arithmetic", "difficulty": [1], "n_train": 8, "n_test": 2, "n_dpo": 4, "n_fewshot": 0},
        {"name": "sort", "difficulty": [1], "n_train": 8, "n_test": 2, "n_dpo": 4, "n_fewshot": 0}]))
    s = sft.run(sft.Config(init=str(p["model"]), data=[str(tasks / "sft_train.jsonl")], out=str(root / "sft"),
                           seq_len=160, val_fraction=0.0, train={"steps": 3, "batch_size": 4, "lr": 3e-3, "device": "cpu"},
                           eval={"every": 0, "batches": 0}, log={"every": 1}, checkpoint={"every": 0}))
    return {**p, "root": root, "tasks": tasks, "sft": s, "problems": tasks / "train.jsonl"}


ARGS = ["n_samples=3", "max_new_tokens=32", "pairs_per_problem=2", "batch_size=16", "device=cpu"]


def _checker(task: str, answer: str):
    """The task's own checker against a GSM8K-format reference answer."""
    ref = SimpleNamespace(answer=answer.rsplit("#### ", 1)[1])
    return lambda text: TASKS[task].check(text, ref)


def test_cli_pairs_are_checked_counted_and_train_dpo(chat, capsys):
    out = chat["root"] / "out"
    assert main(["pairs", str(chat["sft"]), f"problems={chat['problems']}", f"out={out}", *ARGS]) == 0
    assert "pairs: wrote" in capsys.readouterr().out
    problems = {r["question"]: r for r in _read(chat["problems"])}
    recs = _read(out / "pairs.jsonl")
    m = json.loads((out / "manifest.json").read_text())
    st = m["stats"]
    assert m["kind"] == "pairs" and m["config"]["template"] == "chatml"
    assert set(m["inputs"]) == {"model", "problems"}

    assert recs, "reference_fallback gives a pair for every problem with a wrong sample"
    for r in recs:
        prob = problems[r["prompt"]]
        check = _checker(r["task"], prob["answer"])
        assert check(r["chosen"]) and not check(r["rejected"])
        assert r["chosen"].strip() != r["rejected"].strip() and r["rejected"].strip()
        assert r["difficulty"] == prob["difficulty"] and r["chosen_from"] in ("sample", "reference")
        if r["chosen_from"] == "reference":
            assert r["chosen"] == prob["answer"]

    # the counts add up
    n = len(problems)
    assert st["problems"] == n and st["samples"] == 3 * n
    assert st["pairs"] == len(recs) == sum(st["chosen_from"].values())
    assert st["chosen_from"] == {k: sum(r["chosen_from"] == k for r in recs) for k in ("sample", "reference")}
    assert st["problems"] == st["problems_with_pairs"] + sum(st["problems_without_pair"].values())
    assert st["problems_with_pairs"] == len({r["prompt"] for r in recs})
    assert all(sum(r["prompt"] == q for r in recs) <= 2 for q in problems)
    assert st["problems_all_correct"] == st["problems_without_pair"]["all_correct"]
    per = st["per_task"]
    assert set(per) == {"arithmetic", "sort"}
    for key in ("problems", "samples", "samples_correct", "pairs"):
        assert sum(t[key] for t in per.values()) == st[key]
    samples = _read(out / "samples.jsonl")
    assert len(samples) == st["samples"] and sum(s["correct"] for s in samples) == st["samples_correct"]
    assert st["sample_accuracy"] == st["samples_correct"] / st["samples"]
    assert st["rejected_unparseable"] == sum(TASKS[r["task"]].extract_strict(r["rejected"]) is None for r in recs)

    # lmlab's DPO reader takes the file, and a 2-step DPO run on it works
    from lmlab.data.formats import read_preferences

    prefs = read_preferences(str(out / "pairs.jsonl"))
    assert len(prefs) == len(recs) and prefs[0]["prompt"] == [{"role": "user", "content": recs[0]["prompt"]}]
    dpo_out = chat["root"] / "dpo"
    assert main(["dpo", f"init={chat['sft']}", f"data={out / 'pairs.jsonl'}", f"out={dpo_out}", "val_fraction=0",
                 "train.steps=2", "train.batch_size=2", "train.device=cpu", "eval.every=0", "checkpoint.every=0",
                 "log.every=1"]) == 0
    assert json.loads((dpo_out / "manifest.json").read_text())["kind"] == "model"

    # re-running is a no-op; the same seed elsewhere gives byte-identical files
    capsys.readouterr()
    assert main(["pairs", str(chat["sft"]), f"problems={chat['problems']}", f"out={out}", *ARGS]) == 0
    assert "up to date" in capsys.readouterr().out
    cfg = pairs_stage.Config(model=str(chat["sft"]), problems=str(chat["problems"]), out=str(chat["root"] / "out2"),
                             n_samples=3, max_new_tokens=32, pairs_per_problem=2, batch_size=16, device="cpu")
    out2 = pairs_stage.run(cfg)
    for name in ("pairs.jsonl", "samples.jsonl"):
        assert (out / name).read_bytes() == (out2 / name).read_bytes()


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pairs", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("problems", "n_samples", "temperature", "top_p", "max_new_tokens", "max_problems",
                "pairs_per_problem", "reference_fallback", "batch_size", "seed", "device", "template"):
        assert f"  {opt}  [" in text


def test_user_errors_exit_2_and_leave_no_output(chat, capsys):
    root = chat["root"]
    good = _read(chat["problems"])[0]

    def fails(model, problems, name, *expect):
        out = root / name
        assert main(["pairs", str(model), f"problems={problems}", f"out={out}", *ARGS]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and all(x in err for x in expect), err
        assert not out.exists() and not list(root.glob(f".{name}.tmp-*"))

    # a model without a chat template: names the fix
    fails(chat["model"], chat["problems"], "nochat", "no chat template", "lmlab sft", "template=chatml")
    # a malformed line, a record that is not GSM8K, an answer without '#### N': named by file:line
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + '{"question": "What is 2 + 2?", "answer": \n')
    fails(chat["sft"], bad, "bad1", f"{bad}:2", "not valid JSON")
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    fails(chat["sft"], bad, "bad2", f"{bad}:2", "'question' and 'answer'")
    bad.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "It is 4."}) + "\n")
    fails(chat["sft"], bad, "bad3", f"{bad}:1", "'#### N'")
    fails(chat["sft"], root / "missing.jsonl", "bad4", "problems file not found")
    # an out dir holding another artifact is refused and left intact
    before = (chat["tasks"] / "train.jsonl").read_bytes()
    assert main(["pairs", str(chat["sft"]), f"problems={chat['problems']}", f"out={chat['tasks']}", *ARGS]) == 2
    assert "'tasks' artifact" in capsys.readouterr().err
    assert (chat["tasks"] / "train.jsonl").read_bytes() == before


# ----------------------------------------------------------------------------- selection rules

REF = "Tom starts with 2 apples.\n2 + 3 = 5\n#### 5"


def test_select_pairs_rules():
    A, A2 = "2 + 3 = 5\n#### 5", "Two and three: 5\n#### 5"
    B, C = "2 + 3 = 4\n#### 4", "2 + 3 = 7\n#### 7"
    D = "2 + 3 = 5 and then more and more"  # no answer: cut off / rambling
    samples = [D, A, B, "  ", " " + A + "\n", C, B + " "]
    correct = [False, True, False, False, True, False, False]
    parsed = [False, True, True, False, True, True, True]
    # parseable wrong answers before unparseable ones; duplicates (after stripping) once; empty never
    assert select_pairs(samples, correct, parsed, REF, 1) == [(A, B, "sample")]
    assert select_pairs(samples, correct, parsed, REF, 5) == [(A, B, "sample"), (A, C, "sample"), (A, D, "sample")]
    # distinct correct samples are cycled as chosen
    assert select_pairs([A, B, A2, C, D], [True, False, True, False, False], [True] * 4 + [False], REF, 3) == \
        [(A, B, "sample"), (A2, C, "sample"), (A, D, "sample")]
    # no correct sample: the reference, or no pair
    assert select_pairs([B, D], [False, False], [True, False], REF + "\n", 2) == [(REF, B, "reference"),
                                                                               (REF, D, "reference")]
    assert select_pairs([B, D], [False, False], [True, False], REF, 2, reference_fallback=False) == []
    # all correct, or only empty wrong samples: no pair
    assert select_pairs([A, A2], [True, True], [True, True], REF) == []
    assert select_pairs([A, "", "\n"], [True, False, False], [True, False, False], REF) == []
    # chosen never equals rejected, even when the checker disagrees with the reference text
    assert select_pairs([REF], [False], [True], REF) == []
    with pytest.raises(ValueError):
        select_pairs([A], [True, False], [True], REF)


def test_build_pairs_counts_on_hand_made_samples():
    problems = [
        {"question": "q1", "answer": REF, "task": "arithmetic", "difficulty": 1},
        {"question": "q2", "answer": "Sorted.\n#### 1, 2, 3", "task": "sort", "difficulty": 1},
        {"question": "q3", "answer": "x\n#### 1,000"},  # GSM8K: no task
        {"question": "q4", "answer": REF, "task": "arithmetic", "difficulty": 2},
    ]
    samples = [
        ["#### 5", "#### 4", "rambling"],            # a correct sample and two wrong: 1 pair (sample)
        ["#### 1, 2, 3", "#### 1 2 3.", "#### 1, 2, 3"],  # all correct (the list, whatever the separators)
        ["#### 1000", "#### 1,000.", "nothing"]   ,    # GSM8K normalisation: two correct
        ["", "#### 6", "no answer"],                # none correct: the reference
    ]
    cfg = pairs_stage.Config(model="m", problems="p", pairs_per_problem=2)
    recs, sample_recs, st = build_pairs(problems, samples, cfg)
    assert [(r["prompt"], r["chosen_from"]) for r in recs] == [("q1", "sample"), ("q1", "sample"), ("q3", "sample"),
                                                              ("q4", "reference"), ("q4", "reference")]
    assert [r["rejected"] for r in recs] == ["#### 4", "rambling", "nothing", "#### 6", "no answer"]
    assert recs[2]["task"] == "gsm8k" and recs[2]["difficulty"] is None and recs[3]["chosen"] == REF
    assert st["problems"] == 4 and st["samples"] == 12 and st["samples_correct"] == 1 + 3 + 2
    assert st["sample_accuracy"] == 0.5 and st["samples_empty"] == 1 and st["samples_unparseable"] == 4
    assert st["pairs"] == 5 and st["chosen_from"] == {"sample": 3, "reference": 2}
    assert st["problems_all_correct"] == 1 and st["problems_with_pairs"] == 3 and st["problems_any_correct"] == 3
    assert st["problems_without_pair"] == {"all_correct": 1, "no_chosen": 0, "no_rejected": 0}
    assert st["rejected_unparseable"] == 3
    assert st["per_task"]["arithmetic"] == {"problems": 2, "samples": 6, "samples_correct": 1, "pairs": 4,
                                            "problems_any_correct": 1, "problems_all_correct": 0,
                                            "sample_accuracy": 1 / 6}
    assert st["per_task"]["sort"]["problems_all_correct"] == 1 and st["per_task"]["gsm8k"]["pairs"] == 1
    assert [s["correct"] for s in sample_recs[:3]] == [True, False, False] and sample_recs[0]["reference"] == "5"
    # without the fallback, q4 has no chosen reply
    _, _, st = build_pairs(problems, samples, cfg.model_copy(update={"reference_fallback": False}))
    assert st["problems_without_pair"] == {"all_correct": 1, "no_chosen": 1, "no_rejected": 0}
    assert st["chosen_from"] == {"sample": 3, "reference": 0}
