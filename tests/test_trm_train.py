"""Training a TRM (lmlab.train.trm): the optimizers' formulas, sign-SGD on the looked-up rows only,
the sampler as a pure function of the batch index, the carry in checkpoints (kill -9 and resume
is bitwise exact), the stage through the CLI with `puzzle-eval`, and bad input.

The puzzle set here is a toy written by the test (sort 12 digits), so these tests do not depend
on the Sudoku generator; tests/test_trm_pipeline.py runs the real `lmlab puzzles` sets.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab import artifacts
from lmlab.data.puzzles.format import PuzzleSplit, read_split, write_split
from lmlab.data.puzzles.sampler import PuzzleBatches
from lmlab.models.trm import TRM, TRMConfig
from lmlab.train.logging import read_metrics
from lmlab.train.trm_optim import TRMOptimizer

ENV = {**os.environ, "LMLAB_NO_PROGRESS": "1", "PYTHONHASHSEED": "0"}


def toy_split(n: int, seed: int, sizes=None) -> PuzzleSplit:
    """n puzzles 'sort these 12 digits'; `sizes` gives examples per puzzle (default one each)."""
    rng = np.random.default_rng(seed)
    sizes = np.ones(n, np.int64) if sizes is None else np.asarray(sizes)
    x = rng.integers(1, 5, size=(int(sizes.sum()), 12))
    y = np.sort(x, axis=1) + 1
    pidx = np.concatenate([[0], np.cumsum(sizes)])
    groups = np.arange(0, n + 1, 1)
    return PuzzleSplit(x, y, np.arange(n, dtype=np.int32) % 3, pidx, groups, ratings=x[pidx[:-1], 0].astype(np.float32))


def write_toy_set(out: Path, n_train=256, n_test=32, kind="toy", vocab=None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_split(out, "train", toy_split(n_train, 0), 7, 3)
    write_split(out, "test", toy_split(n_test, 1), 7, 3)
    artifacts.write_json_atomic(out / "puzzles.json", {"kind": kind, "grid": [3, 4], "vocab": vocab or list("p123456"),
                                                       "vocab_size": 7})
    artifacts.write_json_atomic(out / "identifiers.json", ["<blank>", "b", "c"])
    artifacts.write_manifest(out, "puzzles", {"toy": kind}, f"fp-{kind}-{n_train}", verb="puzzles")
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_toy_set(tmp_path_factory.mktemp("toy") / "set")


def trm_args(data: Path, out: Path, steps=40, *extra) -> list[str]:
    return [sys.executable, "-m", "lmlab", "trm", f"data={data}", f"out={out}", "model.hidden_size=32",
            "model.num_heads=2", "model.h_cycles=2", "model.l_cycles=2", "model.puzzle_emb_len=2",
            "model.halt_max_steps=4", "train.batch_size=16", "train.grad_accum=2", f"train.steps={steps}",
            "train.warmup_steps=4", "train.lr=1e-3", "train.ema=0.9", "puzzle_emb_lr=1e-3", "eval.every=20",
            "eval.batches=1", "log.every=5", "checkpoint.every=10", "checkpoint.keep=5", *extra]


def run_cli(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


# ----------------------------------------------------------------------------- optimizers

def test_adam_atan2_is_the_official_kernels_update():
    p = torch.nn.Parameter(torch.tensor([0.5, -1.0]))
    model = torch.nn.Module()
    model.w = p
    opt = TRMOptimizer(model, "adam_atan2", lr=0.1, betas=(0.9, 0.95), weight_decay=0.5, emb_lr=0.1, emb_weight_decay=0)
    w, m, v = [0.5, -1.0], [0.0, 0.0], [0.0, 0.0]
    for t, g in enumerate(([0.2, -0.4], [0.1, 0.3], [-0.5, 0.05]), start=1):
        p.grad = torch.tensor(g)
        opt.step()
        for i in range(2):  # the adam-atan2 CUDA kernel's arithmetic, by hand
            w[i] *= 1 - 0.1 * 0.5
            m[i] += (g[i] - m[i]) * 0.1
            v[i] += (g[i] ** 2 - v[i]) * 0.05
            w[i] -= 0.1 / (1 - 0.9 ** t) * math.atan2(m[i], math.sqrt(v[i]) / math.sqrt(1 - 0.95 ** t))
        assert p.detach().tolist() == pytest.approx(w, abs=1e-6)


def test_adamw_option_equals_torch_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    ours = TRMOptimizer(a, "adamw", lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, emb_lr=0.01, emb_weight_decay=0)
    ref = torch.optim.AdamW(b.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(8, 4)
        for mod in (a, b):
            mod.zero_grad()
            mod(x).square().sum().backward()
        ours.step()
        ref.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_sign_sgd_updates_the_looked_up_rows_only_accumulating_micro_batches():
    def fresh():
        torch.manual_seed(0)
        m = TRM(TRMConfig(seq_len=12, vocab_size=7, num_puzzle_identifiers=5, hidden_size=32, num_heads=2,
                          h_cycles=1, l_cycles=1, puzzle_emb_len=2, halt_max_steps=2)).train()
        return m, TRMOptimizer(m, "adam_atan2", 1e-3, (0.9, 0.95), 0.0, emb_lr=0.1, emb_weight_decay=0.5)

    g = torch.Generator().manual_seed(1)
    data = {"inputs": torch.randint(1, 7, (4, 12), generator=g).int(), "labels": torch.randint(1, 7, (4, 12), generator=g).int(),
            "puzzle_identifiers": torch.tensor([1, 3, 1, 3], dtype=torch.int32)}
    m, opt = fresh()
    with torch.no_grad():
        m.puzzle_emb.weight.fill_(0.2)
    before = m.puzzle_emb.weight.clone()
    _, out = m(m.initial_carry(4), data)
    out["logits"].float().logsumexp(-1).sum().backward()
    grad_rows = {}
    for ids, leaf in m.puzzle_emb.pending:
        for i, r in zip(ids.tolist(), leaf.grad):
            grad_rows[i] = grad_rows.get(i, 0) + r
    opt.step()
    after = m.puzzle_emb.weight
    assert torch.equal(after[[0, 2, 4]], before[[0, 2, 4]])  # not looked up: untouched, not even decayed
    for i in (1, 3):
        assert torch.allclose(after[i], before[i] * (1 - 0.1 * 0.5) - 0.1 * torch.sign(grad_rows[i]))
    assert m.puzzle_emb.pending == []

    # the same step from two micro-batches of two rows each
    m2, opt2 = fresh()
    with torch.no_grad():
        m2.puzzle_emb.weight.fill_(0.2)
    for rows in (slice(0, 2), slice(2, 4)):
        part = {k: v[rows] for k, v in data.items()}
        _, out = m2(m2.initial_carry(2), part)
        out["logits"].float().logsumexp(-1).sum().backward()
    opt2.step()
    assert torch.allclose(m2.puzzle_emb.weight, after, atol=1e-6)


# ----------------------------------------------------------------------------- sampler

def test_sampler_is_a_pure_function_of_the_batch_index_and_visits_every_group():
    split = toy_split(20, 0, sizes=[1, 3, 2, 5, 1] * 4)
    a, b = PuzzleBatches(split, 6, seed=3), PuzzleBatches(split, 6, seed=3)
    for i in (0, 7, 3, 12):  # any order, a fresh object: the same batch
        ea, pa = a.indices(i)
        eb, pb = b.indices(i)
        assert np.array_equal(ea, eb) and np.array_equal(pa, pb) and len(ea) == 6
        # every example belongs to its puzzle
        assert all(split.puzzle_indices[p] <= e < split.puzzle_indices[p + 1] for e, p in zip(ea, pa))
    assert not np.array_equal(PuzzleBatches(split, 6, seed=4).indices(0)[0], a.indices(0)[0])
    one = toy_split(10, 0)
    s = PuzzleBatches(one, 5, seed=0)
    first_epoch = np.concatenate([s.indices(0)[1], s.indices(1)[1]])
    assert sorted(first_epoch.tolist()) == list(range(10))  # each group once per epoch
    whole = s.batch(3)
    halves = [s.batch(3, slice(0, 2)), s.batch(3, slice(2, 5))]
    assert torch.equal(torch.cat([h["inputs"] for h in halves]), whole["inputs"])


# ----------------------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trm") / "run"
    r = run_cli(trm_args(toy, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_the_run_writes_a_trm_model_with_the_official_metrics(reference):
    m = json.loads((reference / "manifest.json").read_text())
    assert m["kind"] == "trm" and m["verb"] == "trm" and m["stats"]["steps"] == 40
    assert json.loads((reference / "model.json").read_text())["family"] == "trm"
    assert json.loads((reference / "puzzles.json").read_text())["kind"] == "toy"
    rows = read_metrics(reference)
    train = [r for r in rows if "loss" in r]
    assert {"accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss", "q_halt_loss", "examples_per_s"} <= set(train[0])
    assert train[-1]["lm_loss"] < train[0]["lm_loss"]  # it learns
    assert [r["step"] for r in rows if "val_exact_accuracy" in r] == [20, 40]
    assert m["stats"]["examples_trained"] == 40 * 32 and m["stats"]["examples_per_s"] > 0


def test_kill_9_then_resume_is_bitwise_identical_with_the_carry(toy, reference, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen(trm_args(toy, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not (out / "checkpoints" / "step_000020").is_dir():
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    saved = torch.load(out / "checkpoints" / "step_000020" / "objective.pt", weights_only=False)
    assert set(saved["carries"]) == {"0:0:16", "1:0:16"}  # one carry per micro-batch, with its rows' state
    assert saved["carries"]["0:0:16"]["steps"].max() >= 1
    r = run_cli(trm_args(toy, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    strip = lambda rows: [{k: v for k, v in x.items() if k not in ("tokens_per_s", "time_s", "examples_per_s")}
                          for x in rows]
    assert strip(read_metrics(out))[-6:] == strip(read_metrics(reference))[-6:]


def test_puzzle_eval_measures_every_step_and_by_rating(toy, reference, tmp_path):
    out = tmp_path / "eval"
    r = run_cli([sys.executable, "-m", "lmlab", "puzzle-eval", f"model={reference}", f"data={toy}", f"out={out}",
                 "batch_size=8", "keep_predictions=5"])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["examples"] == 32 and len(m["exact_accuracy_by_step"]) == 4
    assert sum(m["steps_used_histogram"].values()) == 32 and 1 <= m["steps_used_mean"] <= 4
    assert sum(row["examples"] for row in m["accuracy_by_rating"]) == 32
    assert m["exact_accuracy"] == m["exact_accuracy_by_step"][-1]
    pred = np.load(out / "predictions.npz")
    assert pred["preds"].shape == (5, 12) and pred["exact"].shape == (5, 4)
    again = run_cli([sys.executable, "-m", "lmlab", "puzzle-eval", f"model={reference}", f"data={toy}", f"out={out}",
                     "batch_size=8", "keep_predictions=5"])
    assert "up to date" in again.stdout


def test_bad_input_clear_errors_and_nothing_lost(toy, reference, tmp_path):
    other = write_toy_set(tmp_path / "other", kind="maze", vocab=list("p#_SGo7"))
    r = run_cli([sys.executable, "-m", "lmlab", "puzzle-eval", f"model={reference}", f"data={other}",
                 f"out={tmp_path / 'e'}"])
    assert r.returncode == 2 and "does not match the model" in r.stderr and "vocabulary" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "e").exists()
    r = run_cli([sys.executable, "-m", "lmlab", "eval", str(reference)])
    assert r.returncode == 2 and "'trm' artifact" in r.stderr and "Traceback" not in r.stderr
    from lmlab.config import build_config
    from lmlab.errors import UserError
    from lmlab.train import trm as trm_stage

    for key, value, says in (("model", {"vocab_size": 9}, "model.vocab_size=9"),
                             ("parallel", {"strategy": "fsdp"}, "ddp")):
        cfg = build_config(trm_stage.Config, {"data": str(toy), "out": str(tmp_path / key), "train": {"steps": 2},
                                              key: value})
        with pytest.raises(UserError, match=says):
            trm_stage.run(cfg)
        assert not (tmp_path / key / "run.json").exists()
    split, _ = read_split(toy, "train")
    assert split.num_examples == 256  # the set is untouched


def test_arc_end_to_end_votes_the_augmentations_back(tmp_path):
    """A tiny ARC set through the stages (in process: the CLI is tested above): puzzles (augmented),
    trm, puzzle-eval with the voted pass@1 / pass@2 and the submission in the ARC Prize layout."""
    from lmlab.config import build_config
    from lmlab.data.puzzles import stage as puzzles_stage
    from lmlab.eval import puzzles as eval_stage
    from lmlab.train import trm as trm_stage

    def task(path, train, test):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"train": [{"input": i, "output": o} for i, o in train],
                                    "test": [{"input": i, "output": o} for i, o in test]}))

    src = tmp_path / "arc"
    task(src / "training" / "t1.json", [([[1, 2], [3, 4]], [[4, 3], [2, 1]])], [([[5, 6, 7]], [[7, 6, 5]])])
    for name in ("e1", "e2"):
        task(src / "evaluation" / f"{name}.json", [([[1, 0], [0, 0]], [[0, 0], [0, 1]])],
             [([[3, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 3]])])
    data, run_dir, ev = tmp_path / "set", tmp_path / "trm", tmp_path / "ev"
    puzzles_stage.run(build_config(puzzles_stage.Config, {"out": str(data), "kind": "arc",
                                                         "arc": {"path": str(src), "num_aug": 3}}))
    trm_stage.run(build_config(trm_stage.Config, {
        "data": str(data), "out": str(run_dir), "eval": {"batches": 0},
        "model": {"hidden_size": 32, "num_heads": 2, "h_cycles": 1, "l_cycles": 1, "puzzle_emb_len": 1,
                  "halt_max_steps": 2}, "train": {"batch_size": 8, "steps": 3, "warmup_steps": 1}}))
    eval_stage.run(build_config(eval_stage.Config, {"model": str(run_dir), "data": str(data), "out": str(ev)}))
    arc = json.loads((ev / "metrics.json").read_text())["arc"]
    assert set(arc) >= {"pass@1", "pass@2", "num_tasks"} and arc["num_tasks"] == 2
    assert 0 <= arc["pass@1"] <= arc["pass@2"] <= 1
    sub = json.loads((ev / "submission.json").read_text())
    assert set(sub) == {"e1", "e2"} and set(sub["e1"][0]) == {"attempt_1", "attempt_2"}
