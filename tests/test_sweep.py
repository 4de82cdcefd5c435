"""`lmlab sweep` on real micro pretraining runs and a real Optuna journal: space validation (via the
CLI too), a 3-trial sweep (run dirs, sweep.json, summary.md, plots, the report section) and its
no-op re-run, failed trials, pruning, Ctrl-C and a worker killed mid-trial (both resumed from the
checkpoint), two worker processes on one journal."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from lmlab import sweep
from lmlab.config import build_config
from lmlab.errors import Interrupted, UserError
from lmlab.train.loop import EVAL_HOOKS
from lmlab.train.pretrain import Config as PretrainConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "LMLAB_NO_PROGRESS": "1"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORDS = "the cat sat on a mat while dogs ran over green hills and birds sang songs of old times near rivers".split()
SPACE = {"train.lr": {"type": "float", "low": "1e-3", "high": 3.0e-2, "log": True},  # "1e-3": YAML's string
         "model.n_layer": {"type": "int", "low": 1, "high": 2},
         "train.schedule": {"type": "categorical", "choices": ["cosine", "wsd"]}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A pipeline root with corpus -> tokenizer -> packed (33-token rows), built by the real stages."""
    from lmlab.data import corpus, pack, tokenizer

    root = tmp_path_factory.mktemp("data")
    src = root / "text"
    src.mkdir()
    r = random.Random(0)
    for i in range(40):
        (src / f"doc{i}.txt").write_text(" ".join(r.choice(WORDS) for _ in range(r.randint(40, 120))) + ".\n")
    corpus.run(corpus.Config(out=str(root / "corpus"), sources=[{"kind": "files", "paths": [str(src)]}]))
    tokenizer.run(tokenizer.Config(corpus=str(root / "corpus"), out=str(root / "tok"), vocab_size=400, threads=1))
    pack.run(pack.Config(corpus=str(root / "corpus"), tokenizer=str(root / "tok"), out=str(root / "packed"),
                         seq_len=33, workers=1, val_fraction=0.1))
    return root


def write_space(path: Path, space: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(space))
    return path


def args(data: Path, out: Path, space: Path, trials: int, steps: int = 8, checkpoint_every: int = 0) -> list[str]:
    """`lmlab sweep pretrain ...` arguments for micro runs with an eval every 2 steps."""
    return ["pretrain", f"data={data / 'packed'}", "model.preset=micro", "model.max_seq_len=32",
            f"train.steps={steps}", "train.batch_size=4", "train.device=cpu", "eval.every=2", "eval.batches=1",
            "log.every=2", f"checkpoint.every={checkpoint_every}", "--space", str(space), "--trials", str(trials),
            "--out", str(out), "--seed", "0"]


def cli(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "lmlab", "sweep", *argv]


def load(out: Path) -> dict:
    return json.loads((out / "sweep.json").read_text())


def journal(out: Path):
    """The sweep's default storage, opened as any Optuna user would."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(out / "optuna.journal")))


@pytest.fixture(scope="module")
def swept(data):
    """A finished 3-trial sweep under the data root (so the report finds it)."""
    out = data / "lr_sweep"
    argv = args(data, out, write_space(data / "space.yaml", SPACE), 3)
    sweep.main(argv)
    return out, argv


def test_bad_space_exits_2_with_one_line_and_writes_nothing(data, tmp_path):
    out = tmp_path / "sweep"
    space = write_space(tmp_path / "s.yaml", {"train.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}})
    r = subprocess.run(cli(args(data, out, space, 2)), capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"error: search space {space}: 'train.lrr'") and "unknown config key" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("space, words", [
    ({"model.n_layer": {"type": "int", "low": 6, "high": 2}}, ["'model.n_layer'", "low=6 >= high=2"]),
    ({"train.schedule": {"type": "categorical", "choices": ["cosine", "linear"]}}, ["'train.schedule' = 'linear'"]),
    ({"train.lr": {"type": "float", "low": 0.0, "high": 1e-2}}, ["'train.lr' = 0.0", "greater than 0"]),
    ({"train.lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, ["log range needs low > 0"]),
    ({"model.n_layer": {"type": "int", "low": 1.5, "high": 4}}, ["not a whole number"]),
    ({"model.n_layer": {"type": "int", "low": 1, "high": 4, "stp": 1}}, ["unknown field(s) stp"]),
    ({"model.n_layer": {"low": 1, "high": 4}}, ["needs a mapping with type"]),
    ({"out": {"type": "categorical", "choices": ["a"]}}, ["cannot be searched"]),
])
def test_space_validation_names_the_key(space, words):
    from lmlab.sweep_space import load_space

    with pytest.raises(UserError) as e:
        load_space(space, PretrainConfig, None, ["data=x"])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_shipped_example_space_fits_the_tiny_pretrain_config():
    from lmlab.sweep_space import load_space

    params = load_space(ROOT / "configs/sweeps/pretrain_lr.yaml", PretrainConfig,
                        str(ROOT / "configs/stages/pretrain_tiny.yaml"),
                        ["data=runs/cpu/packed", "train.tokens=null", "train.steps=300", "eval.every=50"])
    assert {p.key for p in params} >= {"train.lr", "train.schedule", "model.n_layer"}


def test_values_round_trip_through_overrides():
    from lmlab.config import parse_override
    from lmlab.sweep_space import as_override

    for v in (1e-05, 0.1 + 0.2, 3, "yes", "null", True, None, "a: b"):
        assert parse_override(as_override("k", v))[1] == v


def test_three_trial_sweep_writes_run_dirs_sweep_json_and_summary(swept):
    out, _ = swept
    rec = load(out)
    assert rec["counts"]["COMPLETE"] == 3 and rec["finished"] == 3 and len(rec["trials"]) == 3
    for t in rec["trials"]:
        m = json.loads((out / t["run_dir"] / "manifest.json").read_text())
        assert m["kind"] == "model" and m["complete"]
        assert m["config"]["train"]["lr"] == t["params"]["train.lr"]  # the trial's values went to the stage
        assert m["config"]["model"]["n_layer"] == t["params"]["model.n_layer"]
        assert t["value"] == m["stats"]["final_val_loss"]
        assert sorted(map(int, t["intermediate"])) == [2, 4, 6, 8]
    best = min(rec["trials"], key=lambda t: t["value"])
    assert rec["best"]["number"] == best["number"] and rec["best"]["value"] == best["value"]
    text = (out / "summary.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "complete" in line]
    assert [float(r.split("|")[3]) for r in rows] == sorted(round(t["value"], 4) for t in rec["trials"])
    for name in ("history.png", "params.png"):
        assert f"]({name})" in text and (out / name).read_bytes()[:8] == PNG_MAGIC
    if rec["importance"]:
        assert (out / "importance.png").read_bytes()[:8] == PNG_MAGIC
    else:
        assert rec["importance_note"] in text


def test_rerun_after_completion_does_nothing_more(swept, capsys):
    out, argv = swept
    before = (out / "sweep.json").read_bytes()
    weights = {p: p.stat().st_mtime_ns for p in out.glob("trial_*/model.safetensors")}
    sweep.main(argv)
    captured = capsys.readouterr()
    assert "3 of 3 trials finished; nothing to do" in captured.err and "summary.md" in captured.out
    assert (out / "sweep.json").read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in out.glob("trial_*/model.safetensors")} == weights
    assert sorted(p.name for p in out.glob("trial_*")) == ["trial_0000", "trial_0001", "trial_0002"]


def test_changed_space_is_refused(swept, data):
    out, argv = swept
    space = write_space(data / "other.yaml", {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2}})
    with pytest.raises(UserError, match="space differ"):
        sweep.main([a if a != str(data / "space.yaml") else str(space) for a in argv])


def test_report_embeds_the_sweep(swept, data):
    from lmlab.report import report

    path = report.run(report.Config(root=str(data), out=str(data / "report")))
    text = path.read_text()
    assert "## Sweep `lr_sweep`" in text and "lr_sweep/trial_0000" in text
    assert (path.parent / "sweep-lr_sweep-history.png").read_bytes()[:8] == PNG_MAGIC


def test_failed_trial_is_recorded_and_the_sweep_goes_on(data, tmp_path):
    out = tmp_path / "heads"
    out.mkdir()
    study = optuna.create_study(study_name="heads", storage=journal(out))
    study.enqueue_trial({"model.n_head": 3})  # 64 is not divisible by 3: the stage refuses it
    study.enqueue_trial({"model.n_head": 4})
    space = write_space(tmp_path / "s.yaml", {"model.n_head": {"type": "int", "low": 2, "high": 4}})
    sweep.main(args(data, out, space, 1))
    rec = load(out)
    assert [t["state"] for t in rec["trials"]] == ["FAIL", "COMPLETE"]
    assert "not divisible by model.n_head=3" in rec["trials"][0]["note"]
    assert rec["best"]["params"] == {"model.n_head": 4}


def test_a_worker_stops_after_five_failures_in_a_row(data, tmp_path):
    out = tmp_path / "bad_heads"
    space = write_space(tmp_path / "s.yaml", {"model.n_head": {"type": "categorical", "choices": [3]}})
    with pytest.raises(UserError, match="5 trials in a row failed .*not divisible by model.n_head=3"):
        sweep.main(args(data, out, space, 2))
    assert [t["state"] for t in load(out)["trials"]] == ["FAIL"] * 5
    assert (out / "summary.md").is_file()


class PruneOnSecondReport(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return len(trial.intermediate_values) >= 2


def test_pruned_trial_stops_at_the_second_eval(data, tmp_path):
    out = tmp_path / "pruned"
    argv = args(data, out, write_space(tmp_path / "s.yaml", SPACE), 1)
    cfg = build_config(sweep.Config, {"stage": "pretrain", "overrides": argv[1:argv.index("--space")],
                                            "space": argv[argv.index("--space") + 1], "trials": 1, "out": str(out)})
    sweep.run(cfg, pruner=PruneOnSecondReport())
    rec = load(out)
    (t,) = rec["trials"]
    assert t["state"] == "PRUNED" and sorted(map(int, t["intermediate"])) == [2, 4]
    assert "pruned at step 4" in t["note"] and rec["finished"] == 1
    assert not (out / t["run_dir"] / "manifest.json").exists()  # left as it was, unfinished
    assert max(r["step"] for r in map(json.loads, (out / t["run_dir"] / "metrics.jsonl").read_text().splitlines())) == 4
    assert EVAL_HOOKS == []


def test_ctrl_c_stops_cleanly_and_the_same_command_continues(data, tmp_path, capfd):
    out = tmp_path / "ctrl_c"
    argv = args(data, out, write_space(tmp_path / "s.yaml", SPACE), 1, checkpoint_every=0)

    def ctrl_c(step, metrics):  # a real SIGINT, as from the keyboard, after the eval of step 4
        if step == 4:
            signal.raise_signal(signal.SIGINT)

    EVAL_HOOKS.append(ctrl_c)
    try:
        with pytest.raises(Interrupted, match="stopped after step 4"):
            sweep.main(argv)
    finally:
        EVAL_HOOKS.remove(ctrl_c)
    rec = load(out)
    assert [t["state"] for t in rec["trials"]] == ["FAIL", "WAITING"]
    assert rec["trials"][0]["note"] == "interrupted; continued by trial 1"
    assert (out / "trial_0000" / "checkpoints" / "step_000004").is_dir()
    capfd.readouterr()
    sweep.main(argv)
    assert f"resuming from {out / 'trial_0000' / 'checkpoints' / 'step_000004'}" in capfd.readouterr().err
    rec = load(out)
    assert [(t["state"], t["run_dir"]) for t in rec["trials"]] == [("FAIL", "trial_0000"), ("COMPLETE", "trial_0000")]


def test_killed_worker_is_resumed_from_its_checkpoint(data, tmp_path, capfd):
    out = tmp_path / "killed"
    argv = args(data, out, write_space(tmp_path / "s.yaml", SPACE), 1, steps=16, checkpoint_every=4)
    p = subprocess.Popen(cli(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not (out / "trial_0000/checkpoints/step_000004").is_dir():
        time.sleep(0.01)
    assert p.poll() is None, f"the worker ended before it could be killed: {p.communicate()[1][-2000:]}"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert not (out / "trial_0000" / "manifest.json").exists()
    capfd.readouterr()
    sweep.main(argv)  # the same command again, in this process
    err = capfd.readouterr().err
    rec = load(out)
    assert [(t["state"], t["run_dir"]) for t in rec["trials"]] == [("FAIL", "trial_0000"), ("COMPLETE", "trial_0000")]
    assert rec["trials"][1]["params"] == rec["trials"][0]["params"]
    assert rec["trials"][0]["note"] == f"left running by worker {socket.gethostname()}:{p.pid}, which stopped; " \
                                      f"continued by trial 1"
    assert rec["finished"] == 1 and "left running by worker" in err and f"resuming from {out / 'trial_0000' / 'checkpoints'}" in err
    assert json.loads((out / "trial_0000" / "manifest.json").read_text())["stats"]["steps"] == 16


def test_two_workers_share_one_journal_and_stop_at_n(data, tmp_path):
    """A worker process and this process on one journal: exactly N trials between them."""
    out = tmp_path / "parallel"
    argv = args(data, out, write_space(tmp_path / "s.yaml", SPACE), 3)
    p = subprocess.Popen(cli(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not (out / "trial_0000").is_dir():
        time.sleep(0.01)  # start once the other worker holds trial 0, so both take trials
    sweep.main(argv)
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-2000:]
    rec = load(out)
    assert [t["state"] for t in rec["trials"]] == ["COMPLETE"] * 3 and rec["finished"] == 3
    assert sorted(p.name for p in out.glob("trial_*")) == [f"trial_{i:04d}" for i in range(3)]
    study = optuna.load_study(study_name="parallel", storage=journal(out))
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
