"""Generative evaluation: lm-eval GSM8K extraction, pass@k, maj@k, score_generative, the eval stage's `generative`."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from math import comb

import pytest

from lmlab.eval import generative as g

from conftest import ROOT, SHARED_DATA, build_micro_pipeline

GSM8K = SHARED_DATA / "gsm8k"


# ------------------------------------------------------------------ extraction

@pytest.mark.parametrize("text,strict,flexible", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18", "18"),
    ("#### 1,000\n", "1000", "1000"),                     # commas dropped
    ("The answer is $1,234.50.", None, "1234.50"),          # flexible: `$`, commas, trailing period
    ("#### -5", "-5", "-5"),                                # negative numbers
    ("It is 7. Then 12.", None, "12"),                     # last number, trailing period stripped
    ("#### 3.\nlater 99", "3", "99"),                      # strict takes the first ####; flexible the last number
    ("#### 4\n#### 5", "4", "5"),
    ("no digits here", None, None),
    ("####5", None, "5"),                                   # strict needs the space
    ("x 7", None, "7"),                                     # single digit: second alternative of the regex
])
def test_strict_and_flexible_extraction(text, strict, flexible):
    assert g.normalize_answer(g.extract_strict(text)) == strict
    assert g.normalize_answer(g.extract_flexible(text)) == flexible


def test_reference_normalisation_matches_lm_eval():
    ref = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18\n#### 18"
    assert g.normalize_answer(ref) == "18"
    assert g.normalize_answer("So he made $70,000\n#### 70,000") == "70000"
    # raw filter output keeps what the regex matched; normalisation does the rest
    assert g.extract_flexible("costs $5.") == "$5."
    assert g.extract_strict("#### 1,500.") == "1,500."


def test_real_gsm8k_references_all_normalise_to_numbers():
    if not (GSM8K / "test.jsonl").is_file():
        pytest.skip(f"GSM8K not found at {GSM8K} (shared data is absent in this checkout)")
    probs = g.read_problems(GSM8K / "test.jsonl")
    assert len(probs) == 1319
    for p in probs:
        ref = g.normalize_answer(p["answer"])
        assert ref.lstrip("-").replace(".", "", 1).isdigit(), ref
        # the gold solution is itself an exact match under both extractions
        assert g.normalize_answer(g.extract_strict(p["answer"])) == ref
        assert g.normalize_answer(g.extract_flexible(p["answer"])) == ref


# ------------------------------------------------------------------ estimators

def _brute_pass_at_k(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert g.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)
            assert g.pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    assert g.pass_at_k(200, 3, 100) == pytest.approx(1 - comb(197, 100) / comb(200, 100))
    with pytest.raises(ValueError):
        g.pass_at_k(2, 1, 3)


def test_majority_vote_ties_go_to_the_earliest():
    assert g.majority_vote(["3", "4", "4", "3"]) == "3"
    assert g.majority_vote(["4", "3", "3", "4"]) == "4"
    assert g.majority_vote(["1", "2", "2"]) == "2"
    assert g.majority_vote([None, None, "7"]) == "7"     # no answer never wins
    assert g.majority_vote([None, None]) is None
    assert g.majority_vote([]) is None


def test_aggregate_on_hand_made_records():
    recs = [
        {"strict_ok": True, "flexible_ok": True, "reference": "5",
         "samples_strict": ["5", "6", "6", "5"], "samples_flexible": ["5", "6", "6", "5"]},
        {"strict_ok": False, "flexible_ok": True, "reference": "2",
         "samples_strict": [None, "3", "2", "3"], "samples_flexible": ["1", "2", "2", "3"]},
    ]
    res = g._aggregate(recs, [1, 4], 4)
    assert res["exact_match_strict"] == 0.5 and res["exact_match_flexible"] == 1.0
    assert res["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert res["pass@1_flexible"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    assert res["pass@4"] == 1.0
    # record 1: "5" ties "6" and wins (earliest); record 2: "3" beats "2" strict, "2" wins flexible
    assert res["maj@4"] == 0.5 and res["maj@4_flexible"] == 1.0
    assert res["maj@1"] == 0.5                           # first sample only: "5" right, None wrong
    # standard errors over problems: sample std / sqrt(n); EM strict is [1, 0] -> 0.5 / 1
    assert res["exact_match_strict_stderr"] == pytest.approx(0.5)
    assert res["exact_match_flexible_stderr"] == 0.0
    assert res["pass@1_stderr"] == pytest.approx(abs(0.5 - 0.25) / 2)   # two values 0.5, 0.25
    assert g.stderr([1.0]) is None and g.stderr([0.0, 1.0, 1.0, 0.0]) == pytest.approx((1 / 3 / 4) ** 0.5)


# ------------------------------------------------------------- on a real model

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    p = build_micro_pipeline(root, steps=4)
    from lmlab.tasks import stage
    p["tasks"] = stage.run(stage.Config(out=str(root / "tasks"), seed=0, tasks=[
        {"name": "arithmetic", "n_train": 20, "n_test": 6, "n_fewshot": 3},
        {"name": "sort", "n_train": 10, "n_test": 4, "n_fewshot": 3}]))
    return p


def test_score_generative_on_micro_model(pipeline):
    from lmlab.models import load_model

    model, tok, _ = load_model(pipeline["model"])
    probs = g.read_problems(pipeline["tasks"] / "test.jsonl")
    few = g.read_problems(pipeline["tasks"] / "fewshot.jsonl")
    kw = dict(fewshot=few, n_shot=2, n_samples=3, k=[1, 3], max_new_tokens=10, seed=1)
    a = g.score_generative(model, tok, probs, batch_size=4, **kw)
    b = g.score_generative(model, tok, probs, batch_size=1, **kw)
    # greedy decoding is the same in any batch; samples are not (batch b draws with seed + b)
    greedy = [k for k in a if k.startswith("exact_match") and not k.endswith("stderr")]
    assert greedy and {k: a[k] for k in greedy} == {k: b[k] for k in greedy}
    assert [r["completion"] for r in a["records"]] == [r["completion"] for r in b["records"]]
    assert set(a["per_task"]) == {"arithmetic", "sort"} and a["per_task"]["sort"]["n"] == 4
    for key in ("exact_match_strict", "exact_match_flexible", "pass@1", "pass@3", "maj@3", "pass@3_flexible"):
        assert 0.0 <= a[key] <= 1.0
    assert a["settings"]["n_samples"] == 3 and a["settings"]["temperature"] == 0.8
    assert a["settings"]["stop"] == ["Question:", "\n\n"]
    r = a["records"][0]
    assert r["prompt"].endswith(f"Question: {probs[0]['question']}\nAnswer:")
    assert "\n\n" not in r["completion"] and "Question:" not in r["completion"]
    assert r["reference"] == g.normalize_answer(probs[0]["answer"])
    # a 64-token context cannot hold two examples: they are dropped, never overflowing the cache
    assert a["settings"]["mean_shots_used"] < 2


def test_score_generative_with_a_chat_template(pipeline, tmp_path):
    from lmlab.data.chat import prompt_ids
    from lmlab.models import load_model

    run = tmp_path / "chatmodel"
    shutil.copytree(pipeline["model"], run)
    (run / "chat.json").write_text(json.dumps({"template": "chatml"}))
    model, tok, _ = load_model(run)
    probs = g.read_problems(pipeline["tasks"] / "test.jsonl", n=3)
    res = g.score_generative(model, tok, probs, template="chatml", n_samples=0, max_new_tokens=6)
    assert res["settings"]["prompting"] == "chat:chatml" and "pass@1" not in res
    ids, text, shots = g.build_prompt(tok, probs[0], "chatml", [], 0, 1000)
    assert ids == prompt_ids("chatml", [{"role": "user", "content": probs[0]["question"]}], tok) and shots == 0
    assert "<|im_end|>" not in res["records"][0]["completion"]


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, cwd=ROOT)


def test_eval_stage_generative_through_cli(pipeline, tmp_path):
    out = tmp_path / "eval"
    spec = (f"generative=[{{path: {pipeline['tasks'] / 'test.jsonl'}, n: 5, n_samples: 2, k: [1, 2], "
            f"max_new_tokens: 8, fewshot: {pipeline['tasks'] / 'fewshot.jsonl'}, n_shot: 1}}]")
    args = ["eval", str(pipeline["model"]), f"out={out}", "packed_default=false", "max_new_tokens=0", spec,
            "device=cpu"]
    r = _run_cli(*args)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "eval.json").read_text())
    assert res["packed"] == [] and len(res["generative"]) == 1
    gen = res["generative"][0]
    assert gen["name"] == "tasks_test" and gen["n"] == 5 and "pass@2" in gen and "maj@2" in gen
    m = json.loads((out / "manifest.json").read_text())
    assert m["stats"]["exact_match"] == gen["exact_match"] and "tasks_test_pass@2" in m["stats"]
    assert any(k.startswith("generative_") for k in m["inputs"]) and any(k.startswith("fewshot_") for k in m["inputs"])
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "correct"} <= set(samples[0])
    # every problem's outcome, in file order, adding up to the reported exact match
    problems = [json.loads(x) for x in (out / "problems.jsonl").read_text().splitlines()]
    assert [p["i"] for p in problems] == list(range(5)) and all(p["name"] == "tasks_test" for p in problems)
    assert sum(p["correct"] for p in problems) / 5 == gen["exact_match"]
    assert all(0 <= p["samples_correct"] <= 2 for p in problems) and "exact_match_stderr" in gen
    r = _run_cli(*args)
    assert r.returncode == 0 and "up to date" in r.stdout
    # a bad k is a user error, and the good artifact stays
    r = _run_cli(*args[:-2], spec.replace("k: [1, 2]", "k: [1, 5]"), "device=cpu")
    assert r.returncode == 2 and "n_samples" in r.stderr and "Traceback" not in r.stderr
    assert (out / "eval.json").is_file()


def test_real_gsm8k_scores(pipeline):
    if not (GSM8K / "test.jsonl").is_file():
        pytest.skip(f"GSM8K not found at {GSM8K} (shared data is absent in this checkout)")
    from lmlab.models import load_model

    model, tok, _ = load_model(pipeline["model"])
    probs = g.read_problems(GSM8K / "test.jsonl", n=3)
    few = g.read_problems(GSM8K / "train.jsonl", n=8)
    res = g.score_generative(model, tok, probs, fewshot=few, n_shot=5, n_samples=0, max_new_tokens=4)
    assert res["n"] == 3 and set(res["per_task"]) == {"gsm8k"}
    assert [r["reference"] for r in res["records"]] == ["18", "3", "70000"]
