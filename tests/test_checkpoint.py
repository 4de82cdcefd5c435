"""Checkpoints: exact round trip, verification, fallback past corrupt ones, pruning, atomicity; metrics truncation."""

import json

import pytest
import torch
from torch import nn

from lmlab.errors import UserError
from lmlab.train import checkpoint as ck
from lmlab.train.logging import MetricsLogger, read_metrics, truncate_metrics


def make(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
    m[1].weight = m[0].weight  # tied, like a tied lm_head
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True)
    return m, opt


def step(m, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 16, (4, 5), generator=g)
    loss = nn.functional.cross_entropy(m(x).reshape(-1, 16), x.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_round_trip_is_exact(tmp_path):
    m, opt = make()
    for s in range(3):
        step(m, opt, s)
    ck.save_checkpoint(tmp_path, 3, m, opt, {"tokens": 60, "extra": [1, 2]})
    m2, opt2 = make(seed=1)
    path, state = ck.find_resumable(tmp_path, m2, opt2)
    assert path.name == "step_000003" and state["step"] == 3 and state["extra"] == [1, 2]
    assert m2[1].weight is m2[0].weight  # tie survives loading
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    step(m, opt, 9)
    step(m2, opt2, 9)  # identical optimizer moments -> identical next step
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    meta = json.loads((path / "meta.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "optimizer.pt", "trainer.json"}


def test_keep_last_k(tmp_path):
    m, opt = make()
    for s in (10, 20, 30, 40):
        ck.save_checkpoint(tmp_path, s, m, opt, {}, keep=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [30, 40]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_meta"])
def test_corrupt_latest_falls_back_with_a_message_naming_the_file(tmp_path, damage):
    m, opt = make()
    ck.save_checkpoint(tmp_path, 1, m, opt, {"tokens": 1})
    step(m, opt, 0)
    ck.save_checkpoint(tmp_path, 2, m, opt, {"tokens": 2})
    latest = ck.checkpoint_dir(tmp_path, 2)
    f = latest / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:50])
    elif damage == "flip":
        b = bytearray(f.read_bytes())
        b[-1] ^= 1
        f.write_bytes(bytes(b))
    else:
        (latest / "meta.json").unlink()
    warnings = []
    m2, opt2 = make(seed=3)
    path, state = ck.find_resumable(tmp_path, m2, opt2, warn=warnings.append)
    assert state["step"] == 1 and path.name == "step_000001"
    assert len(warnings) == 1 and "step 2" in warnings[0]
    assert ("meta.json" if damage == "delete_meta" else "model.safetensors") in warnings[0]


def test_no_good_checkpoint_refuses(tmp_path):
    m, opt = make()
    ck.save_checkpoint(tmp_path, 5, m, opt, {})
    (ck.checkpoint_dir(tmp_path, 5) / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="optimizer.pt.*resume=never"):
        ck.find_resumable(tmp_path, m, opt, warn=lambda s: None)
    assert ck.find_resumable(tmp_path / "fresh", m, opt) is None


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    m, opt = make()
    ck.save_checkpoint(tmp_path, 1, m, opt, {})
    before = (ck.checkpoint_dir(tmp_path, 1) / "model.safetensors").read_bytes()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(UserError, match="out of disk space"):
        ck.save_checkpoint(tmp_path, 2, m, opt, {}, keep=1)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    assert (ck.checkpoint_dir(tmp_path, 1) / "model.safetensors").read_bytes() == before
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())


def test_metrics_truncation_drops_later_and_partial_lines(tmp_path):
    log = MetricsLogger(tmp_path)
    for s in (1, 2, 3, 4):
        log.write({"step": s, "loss": 1.0 / s, "bad": float("nan")})
    log.write({"step": 4, "val_loss": 0.5})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # cut short by kill -9
    truncate_metrics(tmp_path / "metrics.jsonl", 3)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["bad"] is None
    MetricsLogger(tmp_path, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    MetricsLogger(tmp_path, resume_step=0).close()  # a fresh start forgets old lines
    assert read_metrics(tmp_path) == []


def test_missing_tensorboard_or_wandb_warns_once_and_goes_on(tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    log = MetricsLogger(tmp_path, tensorboard=True)
    log.write({"step": 1, "loss": 2.0})
    log.close()
    err = capsys.readouterr().err
    assert err.count("warning: log.tensorboard=true") == 1
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
