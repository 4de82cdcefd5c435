"""LLM-TRM's GPU recipe (configs/pipelines/llm-trm-smollm3.yaml) runs, as written, on a tiny
random SmolLM3 on CPU.

The recipe's stages and options are the shipped file's; only sizes shrink (steps, problems,
widths, token budgets), the device becomes the CPU, and the paths point at a tiny SmolLM3 Hugging
Face directory (transformers' own class, its official chat template) and tiny GSM8K-format files.
`lmlab import` must recognise the template as `smollm3` and the model's NoPE layer; every later
stage then runs on it through `lmlab pipeline`. A random model never closes its thinking, so
the thinking generations (prompts that end at the assistant header) are closed after two of
the model's own tokens with a GSM8K answer, as tests/test_llm_trm.py does for hidden-pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import build_tiny_smollm3
from hub_templates import SMOLLM3

from lmlab.cli import main

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "pipelines" / "llm-trm-smollm3.yaml"

# per stage (by verb; both latent stages alike): the options that shrink
TINY = {
    "corpus": {"sources": [{"kind": "stdlib", "include_source": False, "max_docs": 40}]},
    "pack": {"seq_len": 256},
    "compressor": {"dims": [8, 16], "tokens": 2000, "val_tokens": 500, "steps": 10, "batch_tokens": 256,
                   "trajectories": {"n": 4, "n_val": 2, "max_new_tokens": 16}},
    "hidden-pairs": {"max_problems": 20, "max_new_tokens": 16, "batch_size": 4, "chunk_size": 6},
    "seqtrm": {"dim": 16, "val_fraction": 0.3, "model": {"n": 2, "T": 2, "n_sup": 3},
               "train": {"steps": 8, "batch_size": 4}, "eval": {"every": 4}, "checkpoint": {"every": 4}},
    "latent": {"k": 2, "max_problems": 12, "max_new_tokens": 8, "train": {"steps": 2, "batch_size": 4},
               "eval": {"every": 2}, "checkpoint": {"every": 2}, "grpo": {"num_generations": 2}},
    "llm-trm-eval": {"thinking_max_new_tokens": 16, "max_new_tokens": 8, "batch_size": 4},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _problems(path: Path, n: int, seed: int) -> Path:
    rows = []
    for i in range(n):
        a, b = (seed + 3 * i) % 9 + 1, (seed + 5 * i) % 7 + 1
        rows.append({"question": f"Ann has {a} pens. She buys {b} more. How many pens does Ann have now?",
                     "answer": f"Ann has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} pens.\n#### {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fours(path: Path, n: int) -> int:
    """How many of the first n problems of a file have the answer 4."""
    return sum(json.loads(x)["answer"].endswith("#### 4") for x in path.read_text().splitlines()[:n])


def _tiny_recipe(tmp: Path, hf: Path, train: Path, test: Path) -> Path:
    cfg = yaml.safe_load(RECIPE.read_text())
    for entry in cfg["stages"]:
        c = _merge(entry["config"], TINY.get(entry["stage"], {}))
        if entry["stage"] == "import":
            c["src"] = str(hf)
        for where in (c, c.get("train", {})):
            if "device" in where:
                where["device"] = "cpu"
        text = json.dumps(c).replace("../shared/data/gsm8k/train.jsonl", str(train))
        entry["config"] = json.loads(text.replace("../shared/data/gsm8k/test.jsonl", str(test)))
    out = tmp / "recipe.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def test_the_smollm3_recipe_runs_end_to_end_on_a_tiny_smollm3(tmp_path, monkeypatch, capsys):
    from lmlab.infer import engine
    from lmlab.models import load_model

    hf = tmp_path / "SmolLM3-tiny"
    build_tiny_smollm3(hf, SMOLLM3, max_position_embeddings=2048)  # its system header is long
    recipe = _tiny_recipe(tmp_path, hf, _problems(tmp_path / "train.jsonl", 24, 0),
                          _problems(tmp_path / "test.jsonl", 6, 1))
    real = engine.complete_ids

    def thinking_that_closes(m, t, prompts, sampling, stops, *a, **kw):
        """the model's own tokens; a thinking generation (its prompt ends at the assistant header,
        no </think> in its last tokens) closed after 2 of them with an answer in words, as SmolLM3
        writes one: no `#### N` (within the 16 tokens asked for)"""
        outs = real(m, t, prompts, sampling, stops, *a, **kw)
        closer = t.special_tokens["</think>"]
        for p, o in zip(prompts, outs):
            if closer not in list(p)[-4:]:
                o.ids = ([t.special_tokens["<think>"]] + o.ids[:2] + [closer] + t.encode("\nSo it is 4"))[:16]
                o.text = t.decode(o.ids)
        return outs

    monkeypatch.setattr(engine, "complete_ids", thinking_that_closes)
    root = tmp_path / "run"
    assert main(["pipeline", str(recipe), f"root={root}"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    model, _, manifest = load_model(root / "smollm3")
    assert model.cfg.nope_layers == [3] and manifest["chat"]["template"] == "smollm3"
    outcome = json.loads((root / "outcome" / "outcome.json").read_text())
    assert outcome["settings"]["match"] == "flexible" and outcome["settings"]["template"] == "smollm3"
    rows = {r["label"]: r for r in outcome["rows"]}
    assert {"thinking in full", "direct (no thinking)", "latent vectors, supervised", "latent vectors, then GRPO",
            "first token only"} <= set(rows)
    # every thinking closed with "So it is 4": flexible matching reads the 4 after </think> (the strict
    # `#### N` would read nothing), right exactly where the answer is 4; hidden-pairs counts alike
    assert rows["thinking in full"]["closed"] == 6 and fours(tmp_path / "test.jsonl", 6) > 0
    assert rows["thinking in full"]["exact_match"] == fours(tmp_path / "test.jsonl", 6) / 6
    pairs = json.loads((root / "pairs" / "manifest.json").read_text())["stats"]
    assert pairs["closed"] == 20 and pairs["correct"] == fours(tmp_path / "train.jsonl", 20) > 0
    report = (root / "report" / "report.md").read_text()
    assert "LLM-TRM: SmolLM3-3B on GSM8K" in report and "thinking in full" in report

    # text packed with another tokenizer would be other words to this model: refused, naming both
    assert main(["tokenizer", f"corpus={root / 'corpus'}", f"out={tmp_path / 'tok'}", "type=bpe",
                 "vocab_size=400"]) == 0
    assert main(["pack", f"corpus={root / 'corpus'}", f"tokenizer={tmp_path / 'tok'}", f"out={tmp_path / 'p2'}",
                 "seq_len=64"]) == 0
    capsys.readouterr()
    assert main(["compressor", str(root / "smollm3"), f"data=[{tmp_path / 'p2'}]", f"out={tmp_path / 'c2'}",
                 "device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "another tokenizer" in err and "Traceback" not in err and not (tmp_path / "c2").exists()
