"""End to end: the real CLI through the `smoke` pipeline, as a user runs it (`./speedrun.sh smoke`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    # Reuse the interpreter running the tests as the speedrun's venv, so nothing is installed.
    env = {**os.environ, "LMLAB_VENV": sys.prefix, "LMLAB_NO_PROGRESS": "1"}
    r = subprocess.run(["bash", str(ROOT / "speedrun.sh"), "smoke", f"root={root}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root, r, env


def test_smoke_pipeline_writes_every_artifact(smoke):
    root, r, _ = smoke
    for name, kind in [("corpus", "corpus"), ("tokenizer", "tokenizer"), ("packed", "packed"), ("model", "model"),
                       ("griffin", "model"), ("tasks", "tasks"), ("eval", "eval"), ("sft", "model"), ("eval_sft", "eval"),
                       ("dpo", "model"), ("eval_dpo", "eval"), ("samples", "samples"), ("verifier", "verifier"),
                       ("reward", "reward"), ("grpo", "model"), ("eval_grpo", "eval"), ("puzzles", "puzzles"),
                       ("trm", "trm"), ("eval_trm", "puzzle_eval"), ("report", "report"), ("hf", "hf_export"),
                       ("tasks_think", "tasks"), ("sft_think", "model"), ("compressor", "compressor"),
                       ("hidden_pairs", "hidden_pairs"), ("seqtrm", "seqtrm"), ("latent_sft", "latent_reasoner"),
                       ("latent_grpo", "latent_reasoner"), ("llm_trm_outcome", "llm_trm_outcome")]:
        manifest = json.loads((root / name / "manifest.json").read_text())
        assert manifest["kind"] == kind
        assert manifest["lmlab_version"] and manifest["git_commit"]
    # Every stage after the tokenizer records the tokenizer's fingerprint it was built with.
    sha = json.loads((root / "tokenizer" / "manifest.json").read_text())["tokenizer_sha256"]
    assert json.loads((root / "griffin" / "model.json").read_text())["family"] == "griffin"
    for name in ("packed", "model", "griffin", "sft", "dpo", "grpo", "verifier", "reward"):
        assert json.loads((root / name / "manifest.json").read_text())["tokenizer_sha256"] == sha
    assert r.stdout.strip().splitlines()[-1] == f"report: {root / 'report' / 'report.md'}"


def test_smoke_model_beats_unigram_and_report_reads_well(smoke):
    root, _, _ = smoke
    ev = json.loads((root / "eval" / "manifest.json").read_text())["stats"]
    assert ev["val_bpb"] < ev["unigram_bpb"], ev
    report = (root / "report" / "report.md").read_text()
    for section in ("## Time per stage", "## Data", "## Model", "## Training curves", "## Evaluation",
                    "## Sample generations", "unigram"):
        assert section in report
    assert "## The ladder: Base → SFT → DPO → GRPO → GRPO + verifier best-of-4" in report
    ladder = (root / "report" / "ladder.csv").read_text().splitlines()
    assert ladder[0].startswith("stage,model,eval,exact_match_strict") and [r.split(",")[0] for r in ladder[1:]] == [
        "Base", "SFT", "DPO", "GRPO", "GRPO + verifier best-of-4"]
    for section in ("## GRPO", "## Verifier", "## Reward model", "reranking 4 samples", "rerank_grpo.png",
                    "## TRM: tiny recursive models on puzzles", "### Puzzle sets", "trm_curves.png",
                    "## Pretraining compared", "| `griffin` | griffin | micro |", "## Hidden-state compressor",
                    "held-out thinking trajectories", "## Hidden-state pairs", "## SequenceTRM",
                    "## Latent reasoners (LLM-TRM phase 3)", "## LLM-TRM outcome", "| latent, GRPO |",
                    "| first token only |", "llm_trm_outcome.png"):
        assert section in report, section
    assert "Δ EM vs row above" in report and "exact_match_strict_stderr" in ladder[0]
    rows = json.loads((root / "report" / "ladder.json").read_text())
    # the paired difference is over the same problems, so it equals the difference of the means
    for prev, row in zip(rows, rows[1:]):
        d = row["delta_exact_match"]
        assert d["n"] > 1 and d["diff"] == pytest.approx(row["exact_match_strict"] - prev["exact_match_strict"])
    assert rows[0]["delta_exact_match"] is None
    for png in ("loss.png", "val_bpb.png", "stage_times.png", "ladder.png", "grpo_curves.png", "rerank_grpo.png",
                "verifier_reliability.png", "trm_curves.png", "trm_puzzles_eval_trm.png", "pretrain_compared.png"):
        assert (root / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_rerun_is_a_noop(smoke):
    root, _, env = smoke
    before = (root / "model" / "model.safetensors").stat().st_mtime_ns
    r = subprocess.run([sys.executable, "-m", "lmlab", "pipeline", "configs/pipelines/smoke.yaml", f"root={root}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("nothing to do") >= 6, r.stdout
    assert (root / "model" / "model.safetensors").stat().st_mtime_ns == before


def test_exported_chat_model_generates_with_transformers(smoke):
    """The exported GRPO model: transformers formats the chat prompt and decodes as we do."""
    root, _, _ = smoke
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmlab.data.chat import prompt_ids
    from lmlab.infer.engine import generate_ids
    from lmlab.models import load_model

    hf = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    tok = AutoTokenizer.from_pretrained(root / "hf")
    model, our_tok, _ = load_model(root / "grpo")
    messages = [{"role": "user", "content": "Ben has 4 cards. He finds 3 more. How many cards does Ben have now?"}]
    ids = prompt_ids("chatml", messages, our_tok)
    theirs = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs) == ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = [step[0] for step in generate_ids(model, [ids], max_new_tokens=12)]
    assert out[0, len(ids):].tolist() == ours


def test_speedrun_rejects_unknown_preset():
    r = subprocess.run(["bash", str(ROOT / "speedrun.sh"), "nonesuch"], cwd=ROOT,
                       env={**os.environ, "LMLAB_VENV": sys.prefix}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown preset 'nonesuch'" in r.stderr
