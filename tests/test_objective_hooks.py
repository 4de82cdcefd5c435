"""The loop's objective hooks (lmlab/train/loop.py): before_step, state_dict, build_optimizer,
frozen_models, and train.ema — each exercised on a toy objective, with exact resume."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from lmlab.train.loop import CheckpointConfig, EvalConfig, RunOptions, TrainConfig, train


class Cfg(RunOptions):
    train: TrainConfig
    eval: EvalConfig


def cfg(steps=6, **train_kw) -> Cfg:
    return Cfg(train={"steps": steps, "grad_accum": 2, "device": "cpu", "warmup_steps": 0, "lr": 0.05, **train_kw},
               eval={"batches": 1, "every": 2}, log={"every": 1}, checkpoint=CheckpointConfig(every=2, keep=5))


class Carry:
    """Each step, before its micro-batches, `before_step` makes a target from the carried state
    (as GRPO makes rollouts); the carry changes every step (as TRM's halting state does)."""

    def __init__(self):
        self.carry = torch.zeros(3)
        self.calls: list[tuple] = []
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen_models = [self.frozen]
        self.evals: list[torch.Tensor] = []

    def before_step(self, model, step):
        self.calls.append((step, torch.is_grad_enabled(), model.training))
        self.carry = self.carry * 0.5 + step
        self.target = self.frozen(self.carry)

    def batch(self, step, micro):
        return torch.full((2, 3), float(step + micro))

    def loss(self, model, batch):
        return (model(batch) - self.target).pow(2).sum(), batch.numel()

    def evaluate(self, model, device):
        self.evals.append(model.weight.detach().clone())
        return {"val_loss": float(model.weight.sum())}

    def state_dict(self):
        return {"carry": self.carry.clone()}

    def load_state_dict(self, state):
        self.carry = state["carry"].clone()


def make():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 3)


class StopAt(Carry):
    """Interrupted (as by Ctrl-C) when step `at` is about to start; the last checkpoint is step `at`."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def before_step(self, model, step):
        if step == self.at:
            raise KeyboardInterrupt
        super().before_step(model, step)


def interrupted(obj, run_dir, config, total):
    import pytest

    from lmlab.errors import Interrupted
    with pytest.raises(Interrupted):
        train(make(), obj, config, run_dir, total_steps=total, resume_config={})


def test_before_step_runs_once_per_step_without_grad_in_eval_mode(tmp_path):
    obj = Carry()
    train(make(), obj, cfg(), tmp_path, total_steps=6, resume_config={})
    assert obj.calls == [(s, False, False) for s in range(6)]
    assert not obj.frozen.training and not any(p.requires_grad for p in obj.frozen.parameters())
    # frozen models are the objective's: never checkpointed
    ck = sorted((tmp_path / "checkpoints").glob("step_*"))[-1]
    assert set(load_file(str(ck / "model.safetensors"))) == {"weight", "bias"}
    assert (ck / "objective.pt").is_file()


def test_objective_state_survives_resume_exactly(tmp_path):
    full_obj, full = Carry(), make()
    train(full, full_obj, cfg(), tmp_path / "full", total_steps=6, resume_config={})
    part_obj = StopAt(4)
    part_obj.frozen.load_state_dict(full_obj.frozen.state_dict())
    # stopped when step 4 begins (checkpoint 4 exists), then a fresh start: new objective, new model
    interrupted(part_obj, tmp_path / "part", cfg(), 6)
    again_obj, again = Carry(), make()
    again_obj.frozen.load_state_dict(full_obj.frozen.state_dict())
    train(again, again_obj, cfg(), tmp_path / "part", total_steps=6, resume_config={})
    assert [c[0] for c in again_obj.calls] == [4, 5]  # resumed at step 4, with the carry of step 3
    assert torch.equal(again_obj.carry, full_obj.carry)
    assert torch.equal(again.weight, full.weight) and torch.equal(again.bias, full.bias)


def test_build_optimizer_and_lr_scale(tmp_path):
    class WithSGD(Carry):
        def build_optimizer(self, model, t, device):
            return torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr_scale": 0.0}], lr=t.lr)

    m = make()
    bias0 = m.bias.detach().clone()
    train(m, WithSGD(), cfg(steps=2), tmp_path, total_steps=2, resume_config={})
    assert torch.equal(m.bias, bias0)  # lr_scale 0: the scheduled LR times 0
    opt = torch.load(sorted((tmp_path / "checkpoints").glob("step_*"))[-1] / "optimizer.pt", weights_only=True)
    assert "momentum" in opt["param_groups"][0]  # the objective's SGD, not AdamW


def test_ema_is_the_average_used_for_eval_saved_and_resumed(tmp_path):
    d = 0.6
    obj, m = Carry(), make()
    raw = []  # the trained weights before each step, recorded by a run without EMA

    class Record(Carry):
        def before_step(self, model, step):
            raw.append(model.weight.detach().clone())
            super().before_step(model, step)

    rec = Record()
    rec.frozen.load_state_dict(obj.frozen.state_dict())
    train(make(), rec, cfg(steps=7), tmp_path / "raw", total_steps=7, resume_config={})
    final_raw = load_file(str(sorted((tmp_path / "raw" / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))
    expected = raw[0].clone()  # the shadow starts at the initial weights
    shadows = []
    for w in raw[1:] + [final_raw["weight"]]:  # the weights after steps 1..7
        expected = d * expected + (1 - d) * w
        shadows.append(expected.clone())

    train(m, obj, cfg(steps=7, ema=d), tmp_path / "ema", total_steps=7, resume_config={})
    torch.testing.assert_close(m.weight, shadows[-1], atol=1e-6, rtol=0)  # the model left is the average
    torch.testing.assert_close(obj.evals[0], shadows[1], atol=1e-6, rtol=0)  # eval after step 2 saw the EMA
    # interrupted at step 4 and resumed: the same average
    part_obj = StopAt(4)
    part_obj.frozen.load_state_dict(obj.frozen.state_dict())
    interrupted(part_obj, tmp_path / "ema2", cfg(steps=7, ema=d), 7)
    again_obj, again = Carry(), make()
    again_obj.frozen.load_state_dict(obj.frozen.state_dict())
    train(again, again_obj, cfg(steps=7, ema=d), tmp_path / "ema2", total_steps=7, resume_config={})
    assert torch.equal(again.weight, m.weight)


class NanAt(Carry):
    """The loss turns NaN from step `at` on (0-based), as a diverging run's does."""

    def __init__(self, at):
        super().__init__()
        self.at, self.step = at, 0

    def before_step(self, model, step):
        super().before_step(model, step)
        self.step = step

    def loss(self, model, batch):
        s, n = super().loss(model, batch)
        return (s * float("nan") if self.step >= self.at else s), n


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    import pytest

    from lmlab.errors import Diverged
    from lmlab.train.checkpoint import list_checkpoints

    # log every 3 steps, checkpoint every 2: the NaN of step 5 (1-based) is noticed before the
    # checkpoint of step 6, which is not written; step 4's stays, with finite weights
    config = Cfg(train={"steps": 8, "grad_accum": 2, "device": "cpu", "warmup_steps": 0, "lr": 0.05},
                 eval={"batches": 0}, log={"every": 3}, checkpoint=CheckpointConfig(every=2, keep=5))
    with pytest.raises(Diverged, match=r"loss was nan at step 5 of 8 \(noticed after step 6\).*checkpoint at step 4"):
        train(make(), NanAt(4), config, tmp_path, total_steps=8, resume_config={})
    kept = list_checkpoints(tmp_path)
    assert [step for step, _ in kept] == [2, 4]
    weights = load_file(str(kept[-1][1] / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (tmp_path / "model.safetensors").exists()


def test_a_finite_run_is_not_stopped(tmp_path):
    summary = train(make(), Carry(), cfg(), tmp_path, total_steps=6, resume_config={})
    assert summary["steps"] == 6 and torch.isfinite(torch.tensor(summary["final_loss"]))
