"""The pretrain stage end to end on tiny real data: config errors, weighted sampling, and the
hard requirement -- a run killed (SIGKILL) or interrupted (Ctrl-C) and restarted finishes
bit-identical to an uninterrupted one, also when its newest checkpoint is corrupt."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmlab.data import corpus, pack, tokenizer
from lmlab.data.loader import PackedDataset
from lmlab.errors import UserError
from lmlab.train import pretrain
from lmlab.train.logging import read_metrics

WORDS = "the cat sat on a mat while dogs ran over green hills and birds sang songs of old times near rivers".split()


def make_packed(root: Path, vocab_size: int = 400, seed: int = 0) -> Path:
    """corpus -> tokenizer -> pack with the real stages, on a small files corpus."""
    src = root / "text"
    src.mkdir(parents=True)
    r = random.Random(seed)
    for i in range(60):
        (src / f"doc{i}.txt").write_text(" ".join(r.choice(WORDS) for _ in range(r.randint(40, 120))) + ".\n")
    corpus.run(corpus.Config(out=str(root / "corpus"), sources=[{"kind": "files", "paths": [str(src)]}]))
    tokenizer.run(tokenizer.Config(corpus=str(root / "corpus"), out=str(root / "tok"), vocab_size=vocab_size, threads=1))
    pack.run(pack.Config(corpus=str(root / "corpus"), tokenizer=str(root / "tok"), out=str(root / "packed"),
                         seq_len=33, workers=1, val_fraction=0.1))
    return root / "packed"


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    return make_packed(tmp_path_factory.mktemp("data"))


ENV = {**os.environ, "LMLAB_NO_PROGRESS": "1"}


def args(packed: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmlab", "pretrain", f"data={packed}", f"out={out}", "model.preset=micro",
            "train.steps=30", "train.batch_size=4", "train.grad_accum=2", "train.warmup_steps=5",
            "eval.every=10", "eval.batches=2", "checkpoint.every=5", "checkpoint.keep=3", "log.every=1", *extra]


def run_cli(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)


def same_weights(a: Path, b: Path) -> bool:
    """model.safetensors of two runs are the same file, byte for byte."""
    return (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def losses(run: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("val_bpb")) for r in read_metrics(run)]


def start_and_stop(cmd: list[str], run: Path, sig: int, after_step: int) -> subprocess.Popen:
    """Start `cmd`, wait until checkpoint 10 exists and metrics reached `after_step`, send `sig`."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 90
    while time.time() < deadline and p.poll() is None:
        rows = read_metrics(run)
        if (run / "checkpoints" / "step_000010").is_dir() and rows and rows[-1]["step"] >= after_step:
            break
        time.sleep(0.02)
    assert p.poll() is None, f"the run ended before it could be stopped: {p.communicate()[1][-2000:]}"
    p.send_signal(sig)
    p.wait(timeout=60)
    return p


@pytest.fixture(scope="module")
def reference(packed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    r = run_cli(args(packed, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_uninterrupted_run_writes_the_model_artifact(reference):
    m = json.loads((reference / "manifest.json").read_text())
    assert m["kind"] == "model" and m["complete"]
    s = m["stats"]
    assert s["steps"] == 30 and s["tokens_trained"] == 30 * 4 * 2 * 32 and s["params"] > 0
    assert s["final_val_bpb"] > 0 and s["flops_per_token"] > 6 * 0
    assert (reference / "model.safetensors").is_file() and (reference / "model.json").is_file()
    assert (reference / "tokenizer" / "tokenizer.model").is_file()
    rows = read_metrics(reference)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns
    assert {"lr", "tokens", "tokens_per_s", "grad_norm"} <= set(train_rows[0])
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_ppl"] == pytest.approx(np.exp(evals[-1]["val_loss"]))
    assert [p.name for p in sorted((reference / "checkpoints").iterdir())] == ["step_000020", "step_000025", "step_000030"]


def test_rerun_of_finished_run_does_nothing(packed, reference):
    before = (reference / "model.safetensors").stat().st_mtime_ns
    r = run_cli(args(packed, reference))
    assert r.returncode == 0 and "up to date" in r.stdout and "nothing to do" in r.stdout
    assert (reference / "model.safetensors").stat().st_mtime_ns == before


def test_kill_9_then_resume_is_bitwise_identical_even_past_a_corrupt_checkpoint(packed, reference, tmp_path):
    out = tmp_path / "run"
    p = start_and_stop(args(packed, out), out, signal.SIGKILL, after_step=13)
    assert p.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    newest = sorted((out / "checkpoints").glob("step_*"))[-1]
    f = newest / "model.safetensors"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated, as by a full disk or a bad copy
    r = run_cli(args(packed, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{newest.name}/model.safetensors" in r.stderr and "trying an older one" in r.stderr
    assert "resuming from" in r.stderr
    assert same_weights(out, reference)
    assert losses(out) == losses(reference)


def test_ctrl_c_checkpoints_exits_130_and_resumes_identically(packed, reference, tmp_path):
    out = tmp_path / "run"
    p = start_and_stop(args(packed, out), out, signal.SIGINT, after_step=12)
    err = p.stderr.read()
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Run the same command to continue" in err
    stopped_at = max(int(d.name.split("_")[1]) for d in (out / "checkpoints").glob("step_*"))
    assert stopped_at >= 12  # a checkpoint at the step boundary where it stopped
    r = run_cli(args(packed, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"step {stopped_at} of 30" in r.stderr
    assert same_weights(out, reference)
    assert losses(out) == losses(reference)


def test_resume_with_changed_settings_is_refused_and_leaves_the_run_alone(packed, reference):
    r = run_cli(args(packed, reference, "train.lr=0.001"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "train.lr" in r.stderr and "resume=never" in r.stderr
    assert json.loads((reference / "manifest.json").read_text())["complete"]


def test_steps_and_tokens_together_is_a_user_error(packed, tmp_path):
    r = run_cli(args(packed, tmp_path / "x", "train.tokens=chinchilla"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "train.steps=30" in r.stderr and "train.tokens='chinchilla'" in r.stderr


def test_weighted_sampling_proportions_and_purity(packed):
    a, b = PackedDataset(packed, "train"), PackedDataset(packed, "train")
    obj = pretrain.PackedLM([a, b], [3.0, 1.0], [], batch_size=64, seq_len=33, seed=5, eval_batches=0)
    which = np.concatenate([obj.pick_rows(s, 0)[0] for s in range(200)])
    assert abs((which == 0).mean() - 0.75) < 0.02
    rows = np.concatenate([obj.pick_rows(s, 0)[1] for s in range(200)])
    assert rows.min() >= 0 and rows.max() < len(a) and len(np.unique(rows)) > 0.9 * len(a)
    x1, y1 = obj.batch(7, 1)
    x2, y2 = obj.batch(7, 1)
    assert (x1 == x2).all() and (y1 == y2).all() and (x1[:, 1:] == y1[:, :-1]).all()
    assert not (obj.batch(8, 1)[0] == x1).all() and not (obj.batch(7, 0)[0] == x1).all()


def test_mixing_tokenizers_is_refused_naming_both(packed, tmp_path):
    other = make_packed(tmp_path / "other", vocab_size=380, seed=1)
    cfg = pretrain.Config(data=[str(packed), {"path": str(other), "weight": 2}], out=str(tmp_path / "r"),
                          train={"steps": 1})
    with pytest.raises(UserError) as e:
        pretrain.run(cfg)
    assert str(packed) in str(e.value) and str(other) in str(e.value) and "tokenizer" in str(e.value)


def test_seq_len_longer_than_packed_rows_is_refused(packed, tmp_path):
    cfg = pretrain.Config(data=str(packed), out=str(tmp_path / "r"), train={"steps": 1, "seq_len": 64})
    with pytest.raises(UserError, match=r"train.seq_len=64 .*\(33 tokens\)"):
        pretrain.run(cfg)


def test_objective_train_metrics_are_merged_into_each_log_line(tmp_path):
    """The loop's optional train_metrics() hook: called at every log step, merged into that train line."""
    import torch

    from lmlab.train.loop import EvalConfig, RunOptions, TrainConfig, train

    class Cfg(RunOptions):
        train: TrainConfig
        eval: EvalConfig

    class Toy:
        def __init__(self):
            self.calls, self.logged = 0, []

        def batch(self, step, micro):
            return torch.full((2, 3), float(step))

        def loss(self, model, batch):
            self.calls += 1
            return model(batch).pow(2).sum(), 2  # (sum, count): two outputs per micro-batch

        def evaluate(self, model, device):
            return {}

        def train_metrics(self):
            out, self.calls = {"toy/losses": self.calls, "loss": -1.0}, 0  # the loop's own "loss" wins
            self.logged.append(out["toy/losses"])
            return out

    cfg = Cfg(train={"steps": 5, "grad_accum": 2, "device": "cpu", "warmup_steps": 0}, eval={"batches": 0},
              log={"every": 2}, checkpoint={"every": 0})
    toy = Toy()
    train(torch.nn.Linear(3, 1), toy, cfg, tmp_path, total_steps=5, resume_config={})
    lines = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [(r["step"], r["toy/losses"]) for r in lines] == [(2, 4), (4, 4), (5, 2)]  # micro-batches since last
    assert all(r["loss"] >= 0 for r in lines) and toy.logged == [4, 4, 2]
