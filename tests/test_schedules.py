"""LR schedules (exact values), warmup resolution, weight-decay groups and run-length resolution."""

import math

import pytest
import torch
from torch import nn

from lmlab.config import load_config
from lmlab.errors import UserError
from lmlab.train.loop import TrainConfig, resolve_total_steps
from lmlab.train.optim import Schedule, build_optimizer, param_groups, resolve_warmup


def test_warmup_is_linear_from_the_first_step():
    s = Schedule("cosine", lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert [s(i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)], abs=0)
    assert s(9) == 1.0 and s(10) == 1.0


def test_cosine_endpoints_and_midpoint():
    s = Schedule("cosine", lr=2.0, total_steps=101, warmup_steps=0, min_lr_ratio=0.1)
    assert s(0) == 2.0
    assert s(100) == pytest.approx(0.2, abs=1e-15)  # the last step lands exactly on min_lr
    assert s(50) == pytest.approx(0.2 + 0.5 * 1.8, abs=1e-15)  # half way = the mean of peak and floor
    assert s(25) == pytest.approx(0.2 + 0.9 * (1 + math.cos(math.pi / 4)), abs=1e-15)
    values = [s(i) for i in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_phases():
    s = Schedule("wsd", lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.0, decay_frac=0.2)
    assert s(0) == 0.1 and s(9) == 1.0
    assert all(s(i) == 1.0 for i in range(10, 80))  # stable until the last 20 steps
    assert s(80) == pytest.approx(1 - 1 / 20) and s(89) == pytest.approx(0.5)
    assert s(99) == 0.0


def test_schedule_with_min_lr_ratio_one_is_constant_after_warmup():
    s = Schedule("cosine", lr=0.5, total_steps=20, warmup_steps=2, min_lr_ratio=1.0)
    assert [s(i) for i in range(2, 20)] == [0.5] * 18


def test_warmup_fraction_or_count():
    assert resolve_warmup(0.1, 200) == 20
    assert resolve_warmup(25, 200) == 25
    assert resolve_warmup(0.0, 200) == 0


def test_weight_decay_skips_norms_and_embeddings_and_counts_tied_once():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    m = Tiny()
    decay, no_decay = param_groups(m, 0.1)
    assert decay["params"] == [m.proj.weight] and decay["weight_decay"] == 0.1
    assert {id(p) for p in no_decay["params"]} == {id(m.embed.weight), id(m.proj.bias), id(m.norm.weight), id(m.norm.bias)}
    opt = build_optimizer(m, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    assert opt.defaults["foreach"] is True


def test_steps_and_tokens_both_set_is_an_error_naming_both():
    with pytest.raises(UserError) as e:
        load_config(TrainConfig, None, ["steps=10", "tokens=1000"])
    assert "train.steps" in str(e.value) and "train.tokens" in str(e.value)


def test_run_length_resolution():
    assert resolve_total_steps(TrainConfig(steps=7), 100, 10**6) == 7
    assert resolve_total_steps(TrainConfig(tokens=1001), 100, 10**6) == 11  # rounded up to whole steps
    assert resolve_total_steps(TrainConfig(tokens="chinchilla"), 1000, 12345) == math.ceil(20 * 12345 / 1000)
    with pytest.raises(UserError, match="train.steps=N"):
        resolve_total_steps(TrainConfig(), 100, 10)
    with pytest.raises(UserError, match="tokens"):
        load_config(TrainConfig, None, ["tokens=lots"])
