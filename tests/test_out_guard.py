"""What a stage may do to `out` (artifacts.check_out): replace its own kind of artifact, refuse the rest untouched.

One micro pipeline (every stage, a few steps each) is built once; each stage is then pointed
at a user's directory, a regular file, another kind of artifact and (training stages) a
model made by another verb: every one is refused with exit code 2 and a one-line message,
and every byte under the test's directory is unchanged. Re-running a stage onto its own
output is still a no-op, and an unfinished run of the same verb is still continued.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab import artifacts
from lmlab.cli import main
from lmlab.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "LMLAB_NO_PROGRESS": "1"}


def stage_args(w: dict, verb: str, out: Path) -> list[str]:
    """The CLI arguments of `verb` writing `out`, the same ones the fixture built its artifacts with."""
    r = w["root"]
    train = ["train.batch_size=4", "train.device=cpu", "eval.every=0", "eval.batches=0", "log.every=1",
             "checkpoint.every=0"]
    return {
        "corpus": ["corpus", f"out={out}", "sources=[{kind: stdlib, max_docs: 30}]"],
        "tokenizer": ["tokenizer", f"corpus={r / 'corpus'}", f"out={out}", "vocab_size=400", "threads=1"],
        "pack": ["pack", f"corpus={r / 'corpus'}", f"tokenizer={r / 'tokenizer'}", f"out={out}", "seq_len=65",
                 "workers=1", "val_fraction=0.2"],
        "pretrain": ["pretrain", f"data={r / 'packed'}", f"out={out}", "model.preset=micro", "model.max_seq_len=64",
                     "train.steps=3", *train],
        "tasks": ["tasks", f"out={out}", "tasks=[{name: arithmetic, difficulty: [1], n_train: 6, n_test: 2, n_dpo: 2, "
                  "n_fewshot: 1}]"],
        "sft": ["sft", f"init={r / 'model'}", f"data={r / 'sums.jsonl'}", f"out={out}", "seq_len=64", "val_fraction=0",
                "train.steps=2", "train.lr=3e-3", *train],
        "dpo": ["dpo", f"init={r / 'sft'}", f"data={r / 'prefs.jsonl'}", f"out={out}", "val_fraction=0", "max_len=64",
                "train.steps=1", *train],
        "pairs": ["pairs", str(r / "sft"), f"problems={r / 'tasks' / 'train.jsonl'}", f"out={out}", "max_problems=2",
                  "n_samples=1", "max_new_tokens=4", "device=cpu"],
        "eval": ["eval", str(r / "model"), f"out={out}", "max_batches=1", "max_new_tokens=2", "prompts=[def ]",
                 "baseline=false", "device=cpu"],
        "report": ["report", f"inputs=[{r / 'eval'}]", f"out={out}"],
        "export": ["export", str(r / "model"), f"out={out}"],
    }[verb]


# verb -> the fixture's output of that verb; and, for the refusal tests, an artifact of another kind
OWN = {"corpus": "corpus", "tokenizer": "tokenizer", "pack": "packed", "pretrain": "model", "tasks": "tasks",
       "sft": "sft", "dpo": "dpo", "pairs": "pairs", "eval": "eval", "report": "report", "export": "hf"}
FOREIGN = {"corpus": "tokenizer", "tokenizer": "model", "pack": "corpus", "pretrain": "tasks", "tasks": "packed",
           "sft": "eval", "dpo": "corpus", "pairs": "tasks", "eval": "model", "report": "eval", "export": "corpus"}
# a model run made by another training verb
OTHER_VERB = {"pretrain": "sft", "sft": "model", "dpo": "sft"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    w = {"root": root}
    with open(root / "sums.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i} plus {i}?"},
                                             {"role": "assistant", "content": f"{2 * i}"}]}) + "\n")
    with open(root / "prefs.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"{i} plus 1?", "chosen": f"{i + 1}", "rejected": "no idea"}) + "\n")
    for verb in ("corpus", "tokenizer", "pack", "pretrain", "tasks", "sft", "dpo", "pairs", "eval", "report", "export"):
        assert main(stage_args(w, verb, root / OWN[verb])) == 0, verb
    return w


def snapshot(top: Path) -> dict:
    """Every entry under `top` (hidden leftovers included): sha256 of each file, 'dir' for directories."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for d in dirnames:
            found[os.path.relpath(os.path.join(dirpath, d), top)] = "dir"
        for name in filenames:
            p = os.path.join(dirpath, name)
            found[os.path.relpath(p, top)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return found


def make_target(w: dict, case: str, verb: str, where: Path) -> Path:
    """`where/target` made into a user's directory, a regular file, or a copy of a foreign artifact."""
    target = where / "target"
    if case == "userdir":
        (target / "notes").mkdir(parents=True)
        (target / "thesis.txt").write_text("my thesis\n")
        (target / "notes" / "a.md").write_text("draft\n")
    elif case == "file":
        target.write_text("notes\n")
    else:
        shutil.copytree(w["root"] / (FOREIGN[verb] if case == "foreign" else OTHER_VERB[verb]), target)
    return target


CASES = [(v, c) for v in OWN for c in ("userdir", "file", "foreign")] + [(v, "other_verb") for v in OTHER_VERB]


@pytest.mark.parametrize("verb,case", CASES)
def test_out_that_is_not_this_stages_is_refused_untouched(world, tmp_path, capsys, verb, case):
    target = make_target(world, case, verb, tmp_path)
    before = snapshot(tmp_path)
    assert main(stage_args(world, verb, target)) == 2
    err = capsys.readouterr().err.strip()
    assert snapshot(tmp_path) == before, "the refused out (or its neighbours) changed"
    assert err.startswith(f"error: out={target} ") and "\n" not in err and "Traceback" not in err, err
    assert f"`lmlab {verb}` would replace" in err and "choose another out, e.g. out=" in err, err
    kind = (artifacts.read_manifest(target) or {}).get("kind") if target.is_dir() else None
    expect = {"userdir": "is a directory with 2 entries but no readable manifest.json", "file": "is a file",
              "foreign": f" '{kind}' artifact made by `lmlab ", "other_verb": "holds a 'model' artifact made by `lmlab "}[case]
    assert expect in err, err


@pytest.mark.parametrize("verb", list(OWN))
def test_same_stage_rerun_is_a_noop_and_writes_nothing(world, capsys, verb):
    out = world["root"] / OWN[verb]
    before = snapshot(world["root"])
    assert main(stage_args(world, verb, out)) == 0
    assert f"{verb}: up to date ({out}), nothing to do" in capsys.readouterr().out
    assert snapshot(world["root"]) == before
    assert artifacts.read_manifest(out)["verb"] == verb  # every manifest records its verb


def test_same_kind_artifact_is_replaced(world, tmp_path):
    out = tmp_path / "corpus"
    shutil.copytree(world["root"] / "corpus", out)
    assert main(["corpus", f"out={out}", "sources=[{kind: stdlib, max_docs: 12}]"]) == 0
    m = artifacts.read_manifest(out)
    assert m["verb"] == "corpus" and m["config"]["sources"][0]["max_docs"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no hidden leftovers


# ----------------------------------------------------------------------------- training runs

def unfinished_copy(w: dict, name: str, dest: Path, marker: bool = True) -> Path:
    """A model run as training leaves it mid-way: run.json and checkpoints, no manifest yet."""
    shutil.copytree(w["root"] / name, dest)
    (dest / "manifest.json").unlink()
    if not marker:  # as a run made before run.json existed
        (dest / "run.json").unlink()
    assert list((dest / "checkpoints").iterdir()), "the final checkpoint is what makes it resumable"
    return dest


@pytest.mark.parametrize("name,verb", [("model", "pretrain"), ("sft", "sft")])
@pytest.mark.parametrize("marker", [True, False])
def test_unfinished_run_is_continued_by_its_verb_and_refused_by_the_others(world, tmp_path, capsys, marker, name,
                                                                          verb):
    run = unfinished_copy(world, name, tmp_path / "run", marker)
    before = snapshot(tmp_path)
    for other in sorted({"pretrain", "sft", "dpo", "tokenizer", "eval"} - {verb}):
        assert main(stage_args(world, other, run)) == 2
        err = capsys.readouterr().err
        assert f"holds an unfinished 'model' run made by `lmlab {verb}`" in err and "Traceback" not in err, err
        assert snapshot(tmp_path) == before
    assert main(stage_args(world, verb, run)) == 0  # resumes at its last step, then finishes
    assert f"resuming from {run / 'checkpoints'}" in capsys.readouterr().err
    m = artifacts.read_manifest(run)
    assert m["verb"] == verb and m["complete"]
    assert json.loads((run / "run.json").read_text())["verb"] == verb


def test_pretrain_out_is_a_file_via_the_real_cli(world, tmp_path):
    """The reported bug: a FileExistsError traceback from out.mkdir; now the guard's one line."""
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    r = subprocess.run([sys.executable, "-m", "lmlab", *stage_args(world, "pretrain", target)], cwd=tmp_path,
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [f"error: out={target} is a file, not a directory, which `lmlab pretrain` would replace; "
                     f"choose another out, e.g. out={tmp_path / 'model'}"], lines
    assert target.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("verb,case", [("corpus", "userdir"), ("tokenizer", "foreign"), ("sft", "other_verb")])
def test_refusals_via_the_real_cli(world, tmp_path, verb, case):
    target = make_target(world, case, verb, tmp_path)
    before = snapshot(tmp_path)
    r = subprocess.run([sys.executable, "-m", "lmlab", *stage_args(world, verb, target)], cwd=ROOT,
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(f"error: out={target} "), r.stderr
    assert snapshot(tmp_path) == before


def test_model_message_names_the_maker_and_a_free_out(world, tmp_path):
    run = tmp_path / "x" / "model"
    shutil.copytree(world["root"] / "model", run)
    with pytest.raises(UserError) as e:
        artifacts.check_out(run, "tokenizer", "tokenizer")
    assert str(e.value) == (f"out={run} holds a 'model' artifact made by `lmlab pretrain`, which `lmlab tokenizer` "
                            f"would replace; choose another out, e.g. out={tmp_path / 'x' / 'tokenizer'}")
    (tmp_path / "x" / "tokenizer").write_text("taken\n")  # the suggestion is always a free path
    with pytest.raises(UserError, match=f"e.g. out={tmp_path / 'x' / 'tokenizer-2'}$"):
        artifacts.check_out(run, "tokenizer", "tokenizer")


# ----------------------------------------------------------------------------- paths, inputs, legacy

def test_out_below_a_file_says_the_parent_is_a_file(world, tmp_path, capsys):
    (tmp_path / "somefile").write_text("x\n")
    out = tmp_path / "somefile" / "tok"
    assert main(stage_args(world, "tokenizer", out)) == 2
    err = capsys.readouterr().err
    assert f"is below {tmp_path / 'somefile'}, which is a file, not a directory" in err, err
    assert (tmp_path / "somefile").read_text() == "x\n"
    # and a write that fails that way anyway (atomic_dir's mkdir: "File exists") says so through disk_error
    for make in (lambda: out.parent.mkdir(parents=True, exist_ok=True), lambda: out.mkdir(parents=True)):
        with pytest.raises(OSError) as exc:
            make()
        msg = str(artifacts.disk_error(exc.value, out))
        assert f"its parent {tmp_path / 'somefile'} is a file" in msg and "choose another out" in msg, msg


def test_empty_dir_and_absent_out_are_fine_and_inputs_are_refused(world, tmp_path):
    (tmp_path / "empty").mkdir()
    artifacts.check_out(tmp_path / "empty", "corpus", "corpus")
    artifacts.check_out(tmp_path / "a" / "b", "corpus", "corpus")
    with pytest.raises(UserError, match="is the model itself"):
        artifacts.check_out(world["root"] / "sft", "pairs", "pairs", inputs={"model": world["root"] / "sft"})
    with pytest.raises(UserError, match="contains the model"):
        artifacts.check_out(world["root"], "pairs", "pairs", inputs={"model": world["root"] / "sft"})
    with pytest.raises(UserError, match="is the init model itself"):  # same kind, same verb, but its own input
        artifacts.check_out(world["root"] / "sft", "model", "sft", inputs={"init model": world["root"] / "sft"})


def test_manifest_without_a_verb_falls_back_to_its_kind_and_config(world, tmp_path):
    """Artifacts made before manifests recorded a verb: same kind is accepted; a model's verb comes from its config."""
    for name, kind, verb, other in (("corpus", "corpus", "corpus", None), ("model", "model", "pretrain", "sft"),
                                    ("sft", "model", "sft", "dpo"), ("dpo", "model", "dpo", "pretrain")):
        d = tmp_path / name
        shutil.copytree(world["root"] / name, d)
        m = json.loads((d / "manifest.json").read_text())
        del m["verb"]
        (d / "manifest.json").write_text(json.dumps(m))
        artifacts.check_out(d, kind, verb)
        if other:
            with pytest.raises(UserError, match=f"made by `lmlab {verb}`, which `lmlab {other}` would replace"):
                artifacts.check_out(d, kind, other)


def test_generate_and_bench_refuse_a_file_they_did_not_write(world, tmp_path, capsys):
    model = world["root"] / "model"
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"my": "data"}\n')
    gen = ["generate", str(model), "prompts=[a, b]", "max_new_tokens=2", "device=cpu"]
    for out in (notes, tmp_path, notes / "x.jsonl"):
        assert main([*gen, f"out={out}"]) == 2
        assert "Traceback" not in capsys.readouterr().err
    assert main(["bench", "generate", f"out={notes}"]) == 2
    assert "`lmlab bench` did not write" in capsys.readouterr().err
    assert notes.read_text() == '{"my": "data"}\n'
    out = tmp_path / "gens.jsonl"
    assert main([*gen, f"out={out}"]) == 0 and main([*gen, f"out={out}"]) == 0  # its own output is replaced
    assert len(out.read_text().splitlines()) == 2
