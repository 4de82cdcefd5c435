"""The report stage on a real micro pipeline: sections, plots, discovery, missing pieces, no-op re-run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import build_micro_pipeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """corpus -> tokenizer -> pack -> pretrain (12 micro steps) -> eval, under one pipeline root."""
    from lmlab.eval import evaluate

    r = tmp_path_factory.mktemp("run")
    built = build_micro_pipeline(r, max_docs=30, seq_len=33)
    m, p = built["model"], built["packed"]
    evaluate.run(evaluate.Config(model=str(m), packed=[str(p)], max_batches=2, prompts=["Return the"],
                                 max_new_tokens=4, device="cpu"))
    return r


def _assert_png(path):
    import matplotlib.image

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_report_from_pipeline_root(root, capsys):
    from lmlab import artifacts
    from lmlab.report import report

    path = report.run(report.Config(root=str(root)))
    assert path == root / "report" / "report.md"
    assert str(path) in capsys.readouterr().out
    text = path.read_text()
    for heading in ("# lmlab report", "## Run", "## Time per stage", "### Corpus", "### Tokenizer", "### Packed data",
                    "## Model", "## Training curves", "## Evaluation", "## Sample generations", "## Resolved configs"):
        assert heading in text, heading
    assert "## Missing" not in text
    summary = text.split("\n")[2]
    assert "val bits per byte" in summary and "unigram" in summary and "tokens" in summary
    assert "git commit" in text and "unigram bits/byte" in text and "FLOPs per token" in text
    assert text.count("<details>") == 5  # corpus, tokenizer, packed, model, eval
    assert "Return the⟨" in text
    for name in ("stage_times.png", "loss.png", "val_bpb.png"):
        assert f"({name})" in text
        _assert_png(path.parent / name)
    assert artifacts.read_manifest(path.parent)["kind"] == "report"

    # Nothing changed -> no-op; the report is not rewritten.
    mtime = path.stat().st_mtime_ns
    capsys.readouterr()
    assert report.run(report.Config(root=str(root))) == path
    assert "up to date" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == mtime


def test_report_follows_inputs_from_eval_dir(root, tmp_path):
    from lmlab.report import report

    path = report.run(report.Config(inputs=[str(root / "eval")], out=str(tmp_path / "rep")))
    text = path.read_text()
    # eval -> model -> packed -> tokenizer -> corpus, all found through manifests' inputs
    assert "## Missing" not in text and text.count("<details>") == 5


def test_report_says_what_is_missing(root, tmp_path):
    from lmlab.report import report

    partial = tmp_path / "partial"
    for name in ("corpus", "tokenizer", "packed", "model"):
        shutil.copytree(root / name, partial / name)
    path = report.run(report.Config(root=str(partial), follow_inputs=False))
    text = path.read_text()
    assert "## Missing" in text and "lmlab eval" in text
    assert "No eval artifact found" in text
    _assert_png(path.parent / "loss.png")


def test_report_cli_user_error(tmp_path):
    env = {**os.environ, "LMLAB_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-m", "lmlab", "report", str(tmp_path / "nope")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_number_formatting():
    from lmlab.report.report import fmt_count, fmt_duration

    assert fmt_count(2_100_000) == "2.1M" and fmt_count(512) == "512" and fmt_count(123_456_789) == "123M"
    assert fmt_duration(540) == "9m 00s" and fmt_duration(12.34) == "12.3s" and fmt_duration(7300) == "2h 01m"


def test_paired_difference_pairs_the_same_problems(tmp_path):
    from lmlab.report.report import paired_difference

    def write(name, outcomes):
        d = tmp_path / name
        d.mkdir()
        with open(d / "problems.jsonl", "w") as f:
            for i, ok in enumerate(outcomes):
                f.write(json.dumps({"name": "t", "question": f"q{i}", "reference": str(i), "correct": ok}) + "\n")
        return {"eval": str(d)}

    a = write("a", [True, False, False, True])
    b = write("b", [True, True, False, False])
    d = paired_difference(a, b)
    # per-problem differences 0, +1, 0, -1: mean 0, sample std sqrt(2/3), stderr sqrt(2/3)/2
    assert d["diff"] == 0.0 and d["n"] == 4 and d["gained"] == 1 and d["lost"] == 1
    assert d["stderr"] == pytest.approx((2 / 3) ** 0.5 / 2)
    assert paired_difference(a, {"eval": str(tmp_path / "missing")}) is None


def test_model_stage_reads_the_manifest_verb():
    from lmlab.report.report import model_stage

    # the verb decides, not config keys (a future stage's `beta` must not read as DPO)
    assert model_stage({"kind": "model", "verb": "dpo", "config": {}}) == "DPO"
    assert model_stage({"kind": "model", "verb": "sft", "config": {"beta": 0.1}}) == "SFT"
    assert model_stage({"kind": "model", "verb": "grpo", "config": {"beta": 0.04, "init": "x"}}) == "GRPO"
    assert model_stage({"kind": "model", "verb": "pretrain", "config": {}}) == "Base"
    # manifests from before the verb was recorded: the config tells, as it did
    assert model_stage({"kind": "model", "config": {"beta": 0.1, "init": "x"}}) == "DPO"
    assert model_stage({"kind": "model", "config": {"init": "x"}}) == "SFT"
    assert model_stage({"kind": "model", "config": {}}) == "Base"
