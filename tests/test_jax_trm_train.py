"""`lmlab trm backend=jax` (lmlab.train.trm_jax) against the torch trainer it mirrors.

- The optimizers: one AdamATan2 / AdamW step and sign-SGD on repeated puzzle ids equal
  TRMOptimizer's (lmlab.train.trm_optim), to float32 rounding.
- The whole run: the torch trainer in float32 and the JAX one, from the same seed on the toy
  puzzle set of tests/test_trm_train.py, log the same losses, gradient norms, train metrics and
  test-split metrics at every logged step, and write the same kind of run directory (the final
  EMA weights within 1e-4 in model.safetensors), which `lmlab puzzle-eval` reads.
- Data parallel over hosts: two processes of 4 (fake, XLA_FLAGS) CPU devices each log what one
  device logs; a batch that does not divide the devices is refused, naming sizes that do.
- Orbax checkpoints: kill -9 mid-run and the same command gives, bitwise, the uninterrupted run's
  weights and metrics; a checkpoint saved on the 8-device mesh resumes on 1 device.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from test_trm_train import ENV, run_cli, write_toy_set

from lmlab.train.logging import read_metrics

jax = pytest.importorskip("jax", reason="the jax extra is not installed (pip install 'lmlab[jax]')")
pytest.importorskip("flax")
pytest.importorskip("optax")

ARGS = ["model.hidden_size=32", "model.num_heads=2", "model.h_cycles=2", "model.l_cycles=2", "model.puzzle_emb_len=2",
        "model.halt_max_steps=4", "train.batch_size=16", "train.grad_accum=2", "train.warmup_steps=4",
        "train.lr=1e-3", "train.ema=0.9", "puzzle_emb_lr=1e-3", "eval.batches=1", "log.every=2", "checkpoint.every=0"]


def _trm(data, out, *extra, env=None):
    cmd = [sys.executable, "-m", "lmlab", "trm", f"data={data}", f"out={out}", *ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, timeout=300)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_set(tmp_path_factory.mktemp("toy") / "set")


@pytest.fixture(scope="module")
def jax_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("jax") / "run"
    r = _trm(toy, out, "train.steps=20", "eval.every=10", "backend=jax")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_optimizers_equal_the_torch_ones():
    import jax.numpy as jnp

    from lmlab.jax_backend.trm import convert
    from lmlab.jax_backend.trm.optim import network_optimizer, sign_sgd_rows
    from lmlab.models.trm import TRM, TRMConfig
    from lmlab.train.trm_optim import TRMOptimizer

    cfg = TRMConfig(seq_len=6, vocab_size=5, hidden_size=16, num_heads=2, num_puzzle_identifiers=7, puzzle_emb_len=1)
    for kind in ("adam_atan2", "adamw"):
        torch.manual_seed(0)
        m = TRM(cfg)
        params, consts, table = convert.from_torch_state(m.state_dict(), cfg)
        opt_t = TRMOptimizer(m, kind, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.5, emb_lr=0.1, emb_weight_decay=0.2)
        opt_j = network_optimizer(kind, (0.9, 0.95), 0.5)
        state = opt_j.init(params)
        ids = torch.tensor([3, 1, 3, 3, 6])  # repeated ids: their gradients add up before the sign
        for step in range(3):  # bias correction changes with the step
            g = torch.Generator().manual_seed(step)
            grads = {n: torch.randn(p.shape, generator=g) for n, p in m.named_parameters() if p.requires_grad}
            rows = torch.randn(len(ids), cfg.emb_ndim, generator=g)
            for n, p in m.named_parameters():
                p.grad = grads.get(n)
            leaf = m.puzzle_emb.weight[ids].detach().requires_grad_(True)
            leaf.grad = rows.clone()
            m.puzzle_emb.pending.append((ids, leaf))
            opt_t.step()
            jgrads, _, _ = convert.from_torch_state({**grads, **{k: m.state_dict()[k] for k in convert.CONSTS},
                                                     convert.TABLE: m.puzzle_emb.weight}, cfg)
            updates, state = opt_j.update(jgrads, state, params, lr=1e-2)
            params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
            table = sign_sgd_rows(jnp.asarray(table), jnp.asarray(ids.numpy()), jnp.asarray(rows.numpy()), 0.1, 0.2)
        back = convert.to_torch_state(params, consts, table)
        for n, p in m.state_dict().items():  # the table too: looked-up rows moved, the others untouched
            torch.testing.assert_close(back[n], p.float(), atol=2e-6, rtol=1e-5, msg=f"{kind}: {n}")


def test_the_jax_run_logs_what_the_torch_run_logs(toy, jax_run, tmp_path):
    from safetensors.torch import load_file

    ref = tmp_path / "torch"
    r = _trm(toy, ref, "train.steps=20", "eval.every=10", "train.dtype=float32")
    assert r.returncode == 0, r.stderr[-3000:]
    theirs, ours = read_metrics(ref), read_metrics(jax_run)
    assert [sorted(x) for x in theirs] == [sorted(x) for x in ours]
    skip = {"tokens_per_s", "time_s", "examples_per_s"}
    for a, b in zip(theirs, ours):
        for k, v in a.items():
            if k not in skip:
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (a["step"], k, v, b[k])
    assert [x["step"] for x in ours if "val_exact_accuracy" in x] == [10, 20]
    wt, wj = load_file(str(ref / "model.safetensors")), load_file(str(jax_run / "model.safetensors"))
    assert set(wt) == set(wj)
    for k in wt:
        torch.testing.assert_close(wj[k], wt[k], atol=1e-4, rtol=1e-4, msg=k)
    m = json.loads((jax_run / "manifest.json").read_text())
    assert m["kind"] == "trm" and m["stats"]["parallel"]["backend"] == "jax" and m["stats"]["steps"] == 20
    assert json.loads((jax_run / "model.json").read_text())["family"] == "trm"
    # the torch stages read it: puzzle-eval on the whole test split
    r = run_cli([sys.executable, "-m", "lmlab", "puzzle-eval", str(jax_run), f"data={toy}", f"out={tmp_path / 'pe'}",
                 "device=cpu", "dtype=float32"])
    assert r.returncode == 0, r.stderr[-2000:]
    # ... and so does the JAX solver (puzzle-eval backend=jax, 8 devices): the same answers and metrics
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    args = [sys.executable, "-m", "lmlab", "puzzle-eval", str(jax_run), f"data={toy}", "backend=jax"]
    r = subprocess.run([*args, f"out={tmp_path / 'pj'}", "batch_size=16"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("pe", "pj"))
    assert b["backend"] == "jax" and a["backend"] == "torch"
    for k in ("examples", "exact_accuracy", "token_accuracy", "steps_used_mean", "exact_accuracy_by_step"):
        assert b[k] == pytest.approx(a[k], abs=1e-6), k
    import numpy as np

    pa, pb = (np.load(tmp_path / d / "predictions.npz", allow_pickle=True) for d in ("pe", "pj"))
    assert np.array_equal(pa["preds"], pb["preds"]) and np.array_equal(pa["exact"], pb["exact"])
    r = subprocess.run([*args, f"out={tmp_path / 'px'}", "batch_size=12"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "batch_size=12 does not divide into the 8 devices" in r.stderr


def _metrics(run):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time_s", "examples_per_s")}
            for r in read_metrics(run)]


def test_kill_9_then_the_same_command_is_bitwise_the_uninterrupted_run(toy, jax_run, tmp_path):
    import signal
    import time

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lmlab", "trm", f"data={toy}", f"out={out}", *ARGS, "train.steps=20", "eval.every=10",
           "backend=jax", "checkpoint.every=2"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not (out / "checkpoints_jax" / "4").is_dir() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr[-3000:]
    assert (out / "model.safetensors").read_bytes() == (jax_run / "model.safetensors").read_bytes()
    assert _metrics(out) == _metrics(jax_run)


def test_a_batch_must_divide_the_devices():
    from lmlab.errors import UserError
    from lmlab.train.trm_jax import check_batch

    with pytest.raises(UserError, match=r"train.batch_size=12 does not divide into the 8 devices.*8, 16, 24"):
        check_batch(12, 8)
    check_batch(16, 8)


def test_backend_jax_without_the_extra_names_the_pip_command(monkeypatch):
    import importlib.util

    from lmlab.errors import UserError
    from lmlab.jax_backend import require_jax

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flax" else real(name, *a))
    with pytest.raises(UserError, match=r"needs flax.*pip install 'lmlab\[jax\]'"):
        require_jax()


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports free now (held open together while chosen). Not MASTER_PORT+1 for JAX's
    coordinator: bind(0) hands out odd ports and Linux gives outgoing connections the even ones,
    so the port after a chosen one may already be some connection's local port."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_all(procs, logs, timeout: float) -> None:
    """Wait for every process; past `timeout`, kill them all and fail with their logs' ends."""
    import time

    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        pytest.fail(f"the processes did not finish within {timeout:g} s:\n" +
                    "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs))


def test_two_processes_of_four_devices_log_what_one_device_logs_and_resume_on_one(toy, jax_run, tmp_path):
    """Two hosts (processes on 127.0.0.1, 4 fake devices each: an 8-device mesh, data:2 x fsdp:4,
    so every parameter the fsdp axis divides is split over 4 devices), launched as torchrun would
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): each reads its half of every batch, process 0
    alone writes; the run logs what the one-device run logs. Its checkpoint at
    step 10 resumes in one process on one device, and the rest is the one-device run's. A process
    whose coordinator never answers stops with one clear line."""
    import shutil

    port, coordinator, lonely_port = _free_ports(3)
    base = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
            "LMLAB_JAX_COORDINATOR": f"127.0.0.1:{coordinator}", "LMLAB_JAX_INIT_TIMEOUT": "60"}
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "lmlab", "trm", f"data={toy}", f"out={out}", *ARGS, "train.steps=20", "eval.every=10",
           "backend=jax", "checkpoint.every=10", "parallel.mesh=data:2,fsdp:4"]
    # output to files, not pipes: a rank blocked on a full pipe that nobody reads yet would hang the other
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env={**base, "RANK": str(r)})
             for r, log in zip((0, 1), logs)]
    _wait_all(procs, logs, 300)
    results = [("", log.read_text()) for log in logs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-3000:] + results[1][1][-2000:]
    assert "8 device(s) (cpu) on 2 host(s)" in results[0][1]
    for a, b in zip(read_metrics(jax_run), read_metrics(out), strict=True):
        for k in ("loss", "grad_norm", "lm_loss", "val_token_accuracy"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
    stats = json.loads((out / "manifest.json").read_text())["stats"]["parallel"]
    assert stats["world_size"] == 8 and stats["hosts"] == 2

    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    (moved / "manifest.json").unlink()
    shutil.rmtree(moved / "checkpoints_jax" / "20")
    r = _trm(toy, moved, "train.steps=20", "eval.every=10", "backend=jax", "checkpoint.every=10",
             "parallel.mesh=data:1")
    assert r.returncode == 0 and "saved on 8 device(s), now 1" in r.stderr, r.stderr[-3000:]
    for a, b in zip(read_metrics(jax_run), read_metrics(moved), strict=True):
        for k in ("loss", "grad_norm", "val_token_accuracy"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)

    lonely = {**base, "RANK": "1", "LMLAB_JAX_COORDINATOR": f"127.0.0.1:{lonely_port}", "LMLAB_JAX_INIT_TIMEOUT": "2"}
    r = subprocess.run([*cmd[:5], f"out={tmp_path / 'lonely'}", *cmd[6:]], capture_output=True, text=True,
                       env=lonely, timeout=120)
    assert r.returncode == 2 and "did not answer within 2 s" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "lonely").exists()


def test_a_time_budget_fixes_the_length_and_equals_that_fixed_length(toy, tmp_path):
    """train.time_budget with backend=jax, each step taking 0.5 s (lmlab.train.jax_loop.clock
    replaced): steps 3-6 are timed (the first two compile), 0.0834 min fits 10 steps, and the run
    is bitwise the `train.steps=10` run; the checkpoint before the resolution keeps the timed
    steps, the ones after it the resolved length."""
    import contextlib
    import io

    from test_time_budget import FakeClock

    from lmlab.config import load_config
    from lmlab.train import jax_loop, trm
    from lmlab.train.jax_checkpoint import Checkpoints

    def run(out, *extra) -> str:
        cfg = load_config(trm.Config, None, [f"data={toy}", f"out={out}", *ARGS, "backend=jax", "train.dtype=float32",
                                             "train.warmup_steps=6", "eval.every=5", "checkpoint.every=5", *extra])
        err = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
            mp.setattr(jax_loop, "clock", FakeClock(0.5))
            trm.run(cfg)
        return err.getvalue()

    budgeted, fixed = tmp_path / "budgeted", tmp_path / "fixed"
    err = run(budgeted, "train.steps=30", "train.time_budget=0.0834")
    assert "time budget 0.0834 min: measured 0.5 s/step over steps 3-6 -> 10 of 30 steps" in err
    run(fixed, "train.steps=10")
    assert _metrics(budgeted) == _metrics(fixed) and _metrics(fixed)[-1]["step"] == 10
    assert (budgeted / "model.safetensors").read_bytes() == (fixed / "model.safetensors").read_bytes()
    stats = json.loads((budgeted / "manifest.json").read_text())["stats"]
    assert stats["steps"] == stats["resolved_steps"] == 10 and stats["measured_step_s"] == 0.5
    ck = Checkpoints(budgeted, keep=3)
    assert ck.meta(5)["probe_times"] == [[3, 0.5], [4, 0.5], [5, 0.5]] and "budget" not in ck.meta(5)
    assert ck.meta(10)["budget"]["resolved_steps"] == 10
    ck.close()
