"""The eval's proofs section (lmlab.eval.proofs) end to end on a micro model, with Lean played by
tests/lean_standin.py (the REPL's JSON protocol, not Lean), and the report's Lean section."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, build_micro_pipeline
from lmlab.errors import UserError
from lmlab.eval import proofs
from lmlab.eval.estimators import stderr
from lmlab.eval.lean import Verdict

STANDIN = Path(__file__).with_name("lean_standin.py")
LONG = "For all natural numbers $n$, a statement long enough to fill the context. " * 40


def lean_cfg(project: Path, **kw) -> dict:
    return {"project": str(project), "command": [sys.executable, str(STANDIN)], "workers": 2, "timeout_s": 1.0,
            "header_timeout_s": 30.0, "memory_mb": 0, **kw}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A micro model with a 320-token context and a Herald sample whose last theorem cannot fit in it."""
    from lmlab.data import herald

    root = tmp_path_factory.mktemp("proofs")
    built = build_micro_pipeline(root, seq_len=321, steps=2)
    rows = herald.sample_rows(12, seed=0)
    long_row = {**herald.sample_rows(1, seed=5)[0], "id": 999_999_999, "informal_theorem": LONG}
    path = root / "herald.jsonl"
    herald.write_jsonl_atomic(rows + [long_row], path)
    return {"root": root, "model": built["model"], "herald": path}


def _spec(setup, **kw) -> dict:
    spec = {"path": str(setup["herald"]), "name": "herald", "split": "all", "n_samples": 2, "k": [1, 2],
            "temperature": 0.8, "max_new_tokens": 16, "lean": lean_cfg(setup["root"])}
    spec.update(kw)
    return spec


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, cwd=ROOT)


# ----------------------------------------------------------------------------- metrics by hand

def _sample(ok, failure=None, tokens=10, finished=True):
    return {"proof": "by simp", "ok": ok, "failure": failure, "tokens": tokens, "finished": finished,
            "inference_s": 0.5, "verify_s": 0.25, "reason": "", "error": None}


def test_aggregate_against_hand_computed_values():
    # four samples per theorem with 0, 1, 2 and 4 valid, and a theorem too long to prompt
    fails = ["lean_error", "sorry", "timeout", "crash", "other", "lean_error", "lean_error", "sorry", "lean_error"]
    samples = [[_sample(False, fails.pop()) for _ in range(4)],
               [_sample(True)] + [_sample(False, fails.pop()) for _ in range(3)],
               [_sample(True, finished=False), _sample(True)] + [_sample(False, fails.pop(), finished=False),
                                                                  _sample(False, fails.pop())],
               [_sample(True) for _ in range(4)],
               [{**_sample(False, "too_long", tokens=0), "inference_s": 0.0, "verify_s": 0.0} for _ in range(4)]]
    problems = [{"i": i, "too_long": i == 4, "samples": s} for i, s in enumerate(samples)]
    res = proofs.aggregate(problems, [1, 2, 4], n_samples=4)
    assert res["pass@1"] == pytest.approx((0 + 1 / 4 + 2 / 4 + 1 + 0) / 5)
    # pass@2 = 1 - C(4 - c, 2) / C(4, 2)
    per2 = [0, 1 - 3 / 6, 1 - 1 / 6, 1, 0]
    assert res["pass@2"] == pytest.approx(sum(per2) / 5)
    assert res["pass@2_stderr"] == pytest.approx(stderr(per2))
    assert res["pass@4"] == pytest.approx(3 / 5)
    assert res["pass@4_stderr"] == pytest.approx(math.sqrt(0.3 / 5))  # sample variance of [0,1,1,1,0] is 0.3
    assert res["theorems"] == 5 and res["samples"] == 20 and res["valid"] == 7
    assert res["failed"] == {"lean_error": 4, "sorry": 2, "timeout": 1, "crash": 1, "too_long": 4, "other": 1}
    assert res["valid"] + sum(res["failed"].values()) == res["samples"]
    assert res["too_long_theorems"] == 1 and res["samples_cut"] == 2
    # the too-long theorem ran nothing: 16 proofs of 10 tokens, 0.5 s and 0.25 s each
    assert res["inference_s_per_proof"] == pytest.approx(0.5)
    assert res["inference_ms_per_token"] == pytest.approx(1000 * 0.5 / 10)
    assert res["tokens_per_proof"] == pytest.approx(10)
    assert res["verify_s_per_proof"] == pytest.approx(0.25)


@pytest.mark.parametrize("verdict,kind", [
    (Verdict(True, reason="ok"), None),
    (Verdict(False, reason="Lean error at line 2, column 8: unknown identifier 'x'"), "lean_error"),
    (Verdict(False, reason="the proof uses sorry (1 sorry)"), "sorry"),
    (Verdict(False, error="timeout: Lean gave no answer within 1 s", reason="timeout: ..."), "timeout"),
    (Verdict(False, error="crash: the REPL exited with code 1 without answering", reason="crash: ..."), "crash"),
    (Verdict(False, error="malformed output: ...", reason="malformed output: ..."), "other"),
    (Verdict(False, error="REPL error: Unknown environment.", reason="REPL error: ..."), "other"),
])
def test_failure_kinds(verdict, kind):
    assert proofs.failure_of(verdict) == kind


# ----------------------------------------------------------------------------- settings

def test_spec_errors_and_fingerprint(setup, tmp_path):
    with pytest.raises(UserError, match="n_samples"):
        proofs.check_spec(proofs.ProofSpec(**_spec(setup, k=[1, 4])))
    with pytest.raises(UserError, match="temperature"):
        proofs.check_spec(proofs.ProofSpec(**_spec(setup, temperature=0.0)))
    with pytest.raises(UserError, match="was not found"):
        proofs.check_spec(proofs.ProofSpec(**_spec(setup, lean=lean_cfg(setup["root"], command=["no-such-repl"]))))
    with pytest.raises(UserError, match="not found"):
        proofs.read_theorems(proofs.ProofSpec(**_spec(setup, path=str(tmp_path / "missing.jsonl"))))
    examples, data = proofs.read_theorems(proofs.ProofSpec(**_spec(setup, split="all", n=3)))
    assert len(examples) == 3 and data["rows"] == 13 and data["in_split"] == 11
    # what changes a verdict changes the fingerprint; workers and the API key do not
    (tmp_path / "lean-toolchain").write_text("leanprover/lean4:v4.11.0\n")
    base = proofs.spec_fingerprint(proofs.ProofSpec(**_spec(setup, lean=lean_cfg(tmp_path))))
    assert base["lean"]["project_files"].keys() == {"lean-toolchain"}
    assert proofs.spec_fingerprint(proofs.ProofSpec(**_spec(setup, lean=lean_cfg(tmp_path, workers=7)))) == base
    assert proofs.spec_fingerprint(proofs.ProofSpec(**_spec(setup, lean=lean_cfg(tmp_path, timeout_s=9)))) != base
    (tmp_path / "lean-toolchain").write_text("leanprover/lean4:v4.12.0\n")
    assert proofs.spec_fingerprint(proofs.ProofSpec(**_spec(setup, lean=lean_cfg(tmp_path)))) != base
    from lmlab.eval import evaluate

    cfg = evaluate.Config(model="m", proofs=[{"path": "p", "lean": {"backend": "http", "api_key": "secret"}}])
    assert evaluate._manifest_config(cfg)["proofs"][0]["lean"]["api_key"] == "***"


# ----------------------------------------------------------------------------- end to end

def test_eval_proofs_through_cli_rerun_and_report(setup, tmp_path):
    out = tmp_path / "eval"
    spec = json.dumps([_spec(setup)])  # JSON is YAML: the override is read as written
    args = ["eval", str(setup["model"]), f"out={out}", "packed_default=false", "max_new_tokens=0", "device=cpu",
            f"proofs={spec}"]
    r = _run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "pass@1" in r.stdout and "s/proof" in r.stdout
    res = json.loads((out / "eval.json").read_text())["proofs"][0]
    assert res["theorems"] == 11 and res["samples"] == 22  # 10 kept sample rows + the long one
    assert res["valid"] + sum(res["failed"].values()) == res["samples"]
    assert res["failed"]["too_long"] == 2 and res["too_long_theorems"] == 1
    assert 0 <= res["pass@1"] <= res["pass@2"] <= 1 and res["pass@1_stderr"] is not None
    assert res["inference_s_per_proof"] > 0 and res["inference_ms_per_token"] > 0 and res["verify_s_per_proof"] >= 0
    assert res["settings"]["lean"]["command"] == [sys.executable, str(STANDIN)]

    problems = [p for p in _jsonl(out / "problems.jsonl") if p["kind"] == "proofs"]
    assert [p["i"] for p in problems] == list(range(11)) and all(len(p["samples"]) == 2 for p in problems)
    assert sum(p["samples_correct"] for p in problems) == res["valid"]
    long = [p for p in problems if p["too_long"]]
    assert len(long) == 1 and long[0]["id"] == "999999999"
    assert all(s["failure"] == "too_long" and s["reason"].startswith(proofs.TOO_LONG) for s in long[0]["samples"])
    for p in problems:
        assert {"id", "theorem_name", "theorem", "completion", "correct"} <= set(p)
        for s in p["samples"]:
            assert {"proof", "ok", "reason", "error", "inference_s", "verify_s", "tokens"} <= set(s)
    samples = [s for s in _jsonl(out / "samples.jsonl") if s["kind"] == "proofs"]
    assert 1 <= len(samples) <= 5 and all({"proof", "ok", "reason", "theorem"} <= set(s) for s in samples)

    m = json.loads((out / "manifest.json").read_text())
    assert m["inputs"]["proofs_0"]["fingerprint"] and "herald_proof_pass@2" in m["stats"]
    r = _run_cli(*args)
    assert r.returncode == 0 and "up to date" in r.stdout

    from lmlab.report import report

    md = report.run(report.Config(inputs=[str(out)], out=str(tmp_path / "report"))).read_text()
    section = md[md.index("## Lean proofs"):]
    assert "### `herald`" in section and "| model | theorems | samples | valid | pass@1 | pass@2 |" in section
    assert "verification s/proof" in section and "prompt too long 2" in section
    assert "```lean\ntheorem " in section


def test_each_failure_costs_only_its_proof(setup, tmp_path, monkeypatch, capsys):
    """Proof texts fixed by the test: a valid one, sorry, an error, a REPL crash and a hang (timeout)."""
    from lmlab.eval import evaluate
    from lmlab.infer import engine

    texts = iter([" by\n  simp", " by\n  sorry", " by\n  exact ERROR", " by\n  simp -- STANDIN_CRASH",
                  " by\n  simp -- STANDIN_HANG"])

    def fake_complete_ids(model, tokenizer, prompts, sampling, stops=None, batch_size=32, device=None, bar=None):
        return [engine.Completion([5, 6, tokenizer.eos_id], next(texts), True) for _ in prompts]

    monkeypatch.setattr(engine, "complete_ids", fake_complete_ids)
    spec = _spec(setup, n=5, n_samples=1, k=[1], temperature=0.0, batch_size=1, lean=lean_cfg(setup["root"], workers=1))
    cfg = evaluate.Config(model=str(setup["model"]), out=str(tmp_path / "eval"), packed_default=False,
                          max_new_tokens=0, device="cpu", proofs=[spec])
    evaluate.run(cfg)
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())["proofs"][0]
    assert res["samples"] == 5 and res["valid"] == 1 and res["pass@1"] == pytest.approx(0.2)
    assert res["failed"] == {"lean_error": 1, "sorry": 1, "timeout": 1, "crash": 1, "too_long": 0, "other": 0}
    assert res["settings"]["greedy"] is True
    by_proof = {s["proof"]: s for p in _jsonl(tmp_path / "eval" / "problems.jsonl") for s in p["samples"]}
    assert by_proof[" by\n  simp"]["ok"] and by_proof[" by\n  simp"]["reason"] == "ok"
    assert by_proof[" by\n  simp -- STANDIN_CRASH"]["error"].startswith("crash")
    assert by_proof[" by\n  simp -- STANDIN_HANG"]["error"].startswith("timeout")
    assert by_proof[" by\n  exact ERROR"]["failure"] == "lean_error"
    # re-running with nothing changed is a no-op; a Lean setting that changes verdicts is not
    capsys.readouterr()
    evaluate.run(cfg)
    assert "up to date" in capsys.readouterr().out
    evaluate.run(cfg.model_copy(update={"proofs": [proofs.ProofSpec(**{**spec, "lean": lean_cfg(
        setup["root"], workers=2)})]}))
    assert "up to date" in capsys.readouterr().out
    texts = iter([" by\n  simp"] * 5)
    evaluate.run(cfg.model_copy(update={"proofs": [proofs.ProofSpec(**{**spec, "lean": lean_cfg(
        setup["root"], workers=1, timeout_s=2.0)})]}))
    assert "up to date" not in capsys.readouterr().out
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["proofs"][0]["valid"] == 5


def test_griffin_proofs_batched_like_one_by_one(setup):
    """A griffin micro model (the family users finetune): proofs map back to their theorems whatever the batch."""
    from lmlab.data.tokenizer import Tokenizer
    from lmlab.models.family import build_model

    tok = Tokenizer.load(setup["model"] / "tokenizer")
    model = build_model({"family": "griffin", "preset": "micro", "vocab_size": int(tok.vocab_size)})
    examples, _ = proofs.read_theorems(proofs.ProofSpec(**_spec(setup, n=4)))
    spec = proofs.ProofSpec(**_spec(setup, n_samples=1, k=[1], temperature=0.0, max_new_tokens=6))
    one = proofs.generate_proofs(model, tok, examples, spec.model_copy(update={"batch_size": 1}), device="cpu")
    four = proofs.generate_proofs(model, tok, examples, spec.model_copy(update={"batch_size": 4}), device="cpu")
    assert [p["theorem"] for p in one] == [e.theorem for e in examples]
    assert [p["samples"][0]["proof"] for p in one] == [p["samples"][0]["proof"] for p in four]
    assert all(p["prompt_tokens"] > 100 and not p["too_long"] and 1 <= p["samples"][0]["tokens"] <= 6 for p in one)
