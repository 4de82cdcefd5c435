"""lmlab models under lm-evaluation-harness: our `lmlab` LM against lm-eval's own `hf` backend.

Three lm-eval tasks are defined here as local YAML over local jsonl (the hub is unreachable):
multiple choice (acc, acc_norm, with one few-shot example, contexts ending in a space), a rolling-window perplexity task
over paragraphs longer than the micro model's 64-token context, and generate_until with
exact_match. The same tasks run on a micro run dir through `LmlabLM` and on its `lmlab export`
through lm-eval's HF backend; every metric and every per-request log-likelihood and
generation must agree. Then the `lm_eval` eval section end to end, the report's table and
lm-eval's command line with the model registered.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed "
                                                "(pip install 'lmlab[lm_eval]'; scripts/setup_env.sh installs it)")

from conftest import build_micro_pipeline  # noqa: E402

from lmlab.cli import main  # noqa: E402

TASKS = ["lmlab_mc", "lmlab_ppl", "lmlab_gen"]

MC = [
    {"question": "What does len() return", "choices": ["the number of items", "a string", "nothing at all"], "answer": 0},
    {"question": "Which keyword defines a function", "choices": ["class", "def", "import", "return"], "answer": 1},
    {"question": "What is None", "choices": ["a singleton object", "zero"], "answer": 0},
    {"question": "How do you open a file", "choices": ["with open(path)", "file.read", "os.close"], "answer": 0},
    {"question": "What does the os module provide", "choices": ["operating system interfaces", "math"], "answer": 0},
    {"question": "Return the", "choices": ["value", "list of items ", " spaced"], "answer": 2},
]  # the context ends in a space ("Answer: ", no target delimiter): lm-eval moves it to the continuation
PPL = [
    {"text": "The os module provides a portable way of using operating system dependent functionality. If you "
             "just want to read or write a file see open(), if you want to manipulate paths, see the os.path "
             "module, and if you want to read all the lines in all the files on the command line see fileinput."},
    {"text": "def example(x):\n    \"\"\"Return the square of x.\"\"\"\n    return x * x\n"},
    {"text": "This function returns a list of the names in the directory given by path. The list is in arbitrary "
             "order, and does not include the special entries."},
    {"text": "import sys"},
]
GEN = [{"prompt": p, "target": t} for p, t in [("The os module provides", " a"), ("def ", "__init__"),
                                                 ("Return the", " value"), ("This function", " returns"),
                                                 ("import ", "os"), ("Question: what is 2 + 2?\nAnswer:", " 4")]]

COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
metadata:
  version: 1.0
"""
MC_YAML = """task: lmlab_mc
output_type: multiple_choice
fewshot_split: test
num_fewshot: 1
doc_to_text: "Question: {{question}}\\nAnswer: "
target_delimiter: ""
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""
PPL_YAML = """task: lmlab_ppl
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
"""
GEN_YAML = """task: lmlab_gen
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n", " the", "ss"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
"""


def write_tasks(tasks_dir: Path, cache: Path) -> None:
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for name, rows, yaml in (("mc", MC, MC_YAML), ("ppl", PPL, PPL_YAML), ("gen", GEN, GEN_YAML)):
        data = tasks_dir / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks_dir / f"{name}.yaml").write_text(yaml + COMMON.format(data=data, cache=cache))


def offline_hub(mp: pytest.MonkeyPatch) -> None:
    """Switch the hub off for datasets/transformers through `mp` (lm-eval's local tasks need no hub)."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        mp.setenv(var, "1")
    # the libraries read these once, at import: an earlier test may have imported them already
    for mod, attr in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                      (huggingface_hub.constants, "HF_HUB_OFFLINE")):
        mp.setattr(mod, attr, True, raising=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A micro run dir, its HF export, the task files; the hub switched off for datasets/transformers."""
    mp = pytest.MonkeyPatch()
    offline_hub(mp)
    root = tmp_path_factory.mktemp("lm_harness")
    pipe = build_micro_pipeline(root)
    hf_dir = root / "hf"
    assert main(["export", str(pipe["model"]), f"out={hf_dir}"]) == 0
    tasks_dir = root / "tasks"
    write_tasks(tasks_dir, root / "hf_datasets")  # the datasets cache outside the fingerprinted include_path
    yield {"root": root, "model": pipe["model"], "hf": hf_dir, "tasks": tasks_dir}
    mp.undo()


def task_manager(env):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(env["tasks"]), include_defaults=False)


def evaluate(env, model: str, model_args: str, batch_size: int = 16) -> dict:
    import lmlab.eval.lm_harness  # noqa: F401  (registers "lmlab")
    from lm_eval import simple_evaluate

    return simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=task_manager(env),
                           batch_size=batch_size, device="cpu", log_samples=True)


@pytest.fixture(scope="module")
def ours(env):
    return evaluate(env, "lmlab", f"path={env['model']}")


def responses(res: dict, task: str) -> list:
    """Each document's responses in doc order: floats (log-likelihoods), bools (greedy) and strings."""
    def flat(x):
        if isinstance(x, (list, tuple)):
            return [y for v in x for y in flat(v)]
        return [x]
    return [flat(s["resps"]) for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("add_bos", [False, True])
def test_numbers_equal_lm_evals_hf_backend_on_the_export(env, ours, add_bos):
    mine = ours if not add_bos else evaluate(env, "lmlab", f"path={env['model']},add_bos_token=True")
    hf_args = f"pretrained={env['hf']},dtype=float32" + (",add_bos_token=True" if add_bos else "")
    theirs = evaluate(env, "hf", hf_args, batch_size=4)  # another batch size: batching must not matter
    worst = 0.0
    for task in TASKS:
        a, b = mine["results"][task], theirs["results"][task]
        for key, value in b.items():
            if key in ("alias", "name") or "_stderr" in key:
                continue
            if key.startswith(("acc", "exact_match", "sample_len")):
                assert a[key] == value, (task, key)  # counts of right answers: exactly
            else:
                assert a[key] == pytest.approx(value, rel=1e-4), (task, key)
                worst = max(worst, abs(a[key] - value) / abs(value))
        ra, rb = responses(mine, task), responses(theirs, task)
        assert len(ra) == len(rb) == {"lmlab_mc": len(MC), "lmlab_ppl": len(PPL), "lmlab_gen": len(GEN)}[task]
        for xa, xb in zip(ra, rb):
            assert len(xa) == len(xb)
            for u, v in zip(xa, xb):
                if isinstance(v, float) and not isinstance(v, bool):
                    assert u == pytest.approx(v, rel=1e-4, abs=1e-4), task  # every log-likelihood
                    worst = max(worst, abs(u - v) / max(abs(v), 1e-9))
                else:
                    assert u == v, task  # is_greedy flags and generated texts exactly
    assert any(r[0] for r in responses(mine, "lmlab_gen")), "the generations should not all be empty"
    print(f"add_bos_token={add_bos}: worst relative difference vs hf {worst:.2e}")


def _instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.mark.parametrize("family", ["transformer", "griffin"])
def test_batching_rolling_windows_and_generation_in_each_family(env, family):
    import torch

    from lmlab.eval import perplexity
    from lmlab.eval.lm_harness import LmlabLM
    from lmlab.models import load_model
    from lmlab.models.family import build_model

    model, tok, _ = load_model(env["model"])
    if family == "griffin":
        torch.manual_seed(0)
        model = build_model({"family": "griffin", "preset": "micro", "vocab_size": tok.vocab_size, "width": 32,
                             "num_heads": 4, "mlp_expanded_width": 48, "attention_window_size": 8,
                             "max_seq_len": 32}).eval()
    one = LmlabLM(model=model, tokenizer=tok, batch_size=1, device="cpu")
    many = LmlabLM(model=model, tokenizer=tok, batch_size=8, device="cpu")
    pairs = [(m["question"], " " + c) for m in MC for c in m["choices"]] + [("", "import os"), ("Return the ", "x")]
    a = one.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    b = many.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    assert [g for _, g in a] == [g for _, g in b]
    assert [v for v, _ in a] == pytest.approx([v for v, _ in b], abs=1e-4)

    # rolling windows = lmlab's own lm-eval-style perplexity (lmlab.eval.perplexity) on every document
    docs = [d["text"] for d in PPL]
    rolled = many.loglikelihood_rolling(_instances("loglikelihood_rolling", [(d,) for d in docs]), disable_tqdm=True)
    assert many.max_length == (model.max_context or model.cfg.max_seq_len)
    for doc, ll in zip(docs, rolled):
        nll, predicted, windows = perplexity.text_nll(model, tok.encode(doc), tok.bos_id, many.max_length, 4, "cpu")
        assert predicted == len(tok.encode(doc))
        assert ll == pytest.approx(-nll, rel=1e-5)
    assert max(len(tok.encode(d)) for d in docs) > 2 * many.max_length  # several windows were needed

    reqs = [(g["prompt"], {"until": ["\n", " the"], "max_gen_toks": 10, "do_sample": False}) for g in GEN]
    reqs.append(("def ", {"until": ["ss"], "max_gen_toks": 5}))  # another group of gen_kwargs
    ga = one.generate_until(_instances("generate_until", reqs), disable_tqdm=True)
    gb = many.generate_until(_instances("generate_until", reqs), disable_tqdm=True)
    assert ga == gb and len(ga) == len(reqs)
    assert not any("\n" in t or " the" in t for t in ga[:-1]) and "ss" not in ga[-1]


def test_eval_section_end_to_end_and_the_report(env, ours, capsys):
    tasks = env["tasks"]
    out = env["root"] / "eval_lm"
    args = ["eval", str(env["model"]), f"out={out}", "max_new_tokens=0", "packed_default=false",
            f"lm_eval={{tasks: [{', '.join(TASKS)}], include_path: {tasks}}}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "eval lm_eval lmlab_mc: acc " in printed and "eval lm_eval lmlab_ppl: word_perplexity " in printed
    ev = json.loads((out / "eval.json").read_text())["lm_eval"]
    assert ev["version"] == lm_eval.__version__ and ev["settings"]["max_length"] == 64
    by_task = {t["task"]: t for t in ev["tasks"]}
    assert set(by_task) == set(TASKS)
    assert by_task["lmlab_mc"]["num_fewshot"] == 1 and by_task["lmlab_ppl"]["n"] == len(PPL)
    for task in TASKS:
        for m in by_task[task]["metrics"]:  # the same numbers as simple_evaluate with our LM
            assert m["value"] == pytest.approx(ours["results"][task][f"{m['metric']},{m['filter']}"], rel=1e-9)
    acc = next(m for m in by_task["lmlab_mc"]["metrics"] if m["metric"] == "acc")
    assert acc["stderr"] is not None and acc["higher_is_better"] is True
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats["lm_eval_lmlab_mc_acc"] == acc["value"] and "lm_eval_lmlab_ppl_bits_per_byte" in stats

    assert main(args) == 0 and "up to date" in capsys.readouterr().out
    with open(tasks / "ppl.jsonl", "a") as f:  # a task's data changed: the eval is stale
        f.write(json.dumps({"text": "One more paragraph of text."}) + "\n")
    try:
        assert main(args) == 0
        capsys.readouterr()
        ev2 = json.loads((out / "eval.json").read_text())["lm_eval"]
        assert {t["task"]: t["n"] for t in ev2["tasks"]}["lmlab_ppl"] == len(PPL) + 1
    finally:
        write_tasks(tasks, env["root"] / "hf_datasets")

    report = env["root"] / "report"
    assert main(["report", f"root={env['root']}", f"out={report}"]) == 0
    md = (report / "report.md").read_text()
    assert "## lm-evaluation-harness" in md
    assert "| lmlab_mc | acc ↑ |" in md and "| lmlab_ppl | bits_per_byte ↓ |" in md
    assert f"lm-eval {lm_eval.__version__}" in md


def test_clear_errors_and_old_fingerprints(env, capsys, monkeypatch):
    out = env["root"] / "eval_err"
    base = ["eval", str(env["model"]), f"out={out}", "max_new_tokens=0", "packed_default=false"]
    assert main(base + [f"lm_eval={{tasks: [lmlab_nope], include_path: {env['tasks']}, include_defaults: false}}"]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s) ['lmlab_nope']" in err and "Traceback" not in err

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    assert main(base + ["lm_eval={tasks: [lmlab_mc]}"]) == 2
    assert "pip install 'lmlab[lm_eval]'" in capsys.readouterr().err
    monkeypatch.undo()

    # without the section the fingerprinted config has no `lm_eval` key: older evals stay up to date
    from lmlab import artifacts

    seen = []
    real = artifacts.stage_fingerprint
    monkeypatch.setattr(artifacts, "stage_fingerprint", lambda kind, config, *a, **k: seen.append(config) or
                        real(kind, config, *a, **k))
    assert main(base) == 0
    assert seen and "lm_eval" not in seen[0] and "long_context" not in seen[0]


def test_lm_evals_command_line_with_the_lmlab_model(env, ours, capsys, monkeypatch):
    import lm_eval.tasks

    from lmlab.eval import lm_harness

    class LocalOnly(lm_eval.tasks.TaskManager):  # lm-eval's CLI indexes its ~15k built-in tasks first (~20 s)
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalOnly)
    monkeypatch.setattr(sys, "argv", ["lm_harness"])
    lm_harness.main(["--model", "lmlab", "--model_args", f"path={env['model']}", "--tasks", "lmlab_mc",
                     "--include_path", str(env["tasks"]), "--batch_size", "16", "--device", "cpu"])
    table = capsys.readouterr().out
    acc = ours["results"]["lmlab_mc"]["acc,none"]
    assert "lmlab_mc" in table and f"{acc:.4f}" in table
