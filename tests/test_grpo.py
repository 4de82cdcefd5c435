"""GRPO: the formulas against hand-computed values and TRL's definitions, then the stage on a micro
chat model (rollouts, TRL's metrics, exact resume with μ > 1 and a reference, LoRA, bad input)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import build_micro_pipeline

from lmlab.cli import main
from lmlab.train import grpo
from lmlab.train.grpo_losses import group_advantages, k3_kl, normalise, token_terms, trl_loss


# ----------------------------------------------------------------------------- formulas

def test_group_advantages_group_batch_none_with_ties_and_zero_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv, std, zero = group_advantages(r, 4, "group")
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (s + 1e-4))
    assert torch.allclose(std, torch.tensor([s] * 4 + [0.0] * 4))
    assert zero.tolist() == [False] * 4 + [True] * 4      # the all-equal group: no signal, counted
    adv, _, _ = group_advantages(r, 4, "none")
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    adv, std, zero = group_advantages(r, 4, "batch")
    sb = math.sqrt((2 * 0.75 ** 2 + 6 * 0.25 ** 2) / 7)  # std of the whole batch; the mean is still the group's
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (sb + 1e-4))
    assert not zero.any()
    ties = torch.tensor([2.0, 2.0, 0.0, 0.0])
    adv, _, _ = group_advantages(ties, 2, "group")       # two groups, each of two equal rewards
    assert torch.equal(adv, torch.zeros(4))
    nan = torch.tensor([1.0, float("nan"), 0.0, 0.5])    # an unscorable completion: out of the baseline, A = 0
    adv, std, _ = group_advantages(nan, 4, "none")
    assert torch.allclose(adv, torch.tensor([0.5, 0.0, -0.5, 0.0])) and std[0].item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), 4)


def test_clipped_surrogate_clip_flags_and_k3_kl_by_hand():
    logps = torch.tensor([-1.0, -2.0, -0.5, -0.1])
    old = torch.tensor([-1.2, -1.0, -0.5, -0.5])
    adv = torch.tensor([1.0, -1.0, 2.0, 1.0])
    t = token_terms(logps, old, None, adv, eps_low=0.2, eps_high=0.28, beta=0.0)
    r = [math.exp(0.2), math.exp(-1.0), 1.0, math.exp(0.4)]
    assert torch.allclose(t.ratio, torch.tensor(r))
    # token 0: ratio 1.221 inside the clip; 1: A<0 and ratio 0.368 < 0.8 -> clipped term -0.8 is the min;
    # 2: ratio 1; 3: A>0 and ratio 1.49 > 1.28 -> clipped at 1.28
    assert torch.allclose(t.loss, torch.tensor([-r[0], 0.8, -2.0, -1.28]))
    assert t.low_clipped.tolist() == [False, True, False, False]
    assert t.high_clipped.tolist() == [False, False, False, True]
    ref = torch.tensor([-1.5, -2.0, 0.0, -0.1])
    d = [-0.5, 0.0, 0.5, 0.0]
    want_kl = torch.tensor([math.exp(x) - x - 1 for x in d])
    assert torch.allclose(k3_kl(logps, ref), want_kl)
    tb = token_terms(logps, old, ref, adv, 0.2, 0.28, beta=0.04)
    assert torch.allclose(tb.loss, t.loss + 0.04 * want_kl) and torch.allclose(tb.kl, want_kl)
    # one iteration per generation: old = logp detached, ratio exactly 1, gradient that of logp x A
    lp = logps.clone().requires_grad_(True)
    one = token_terms(lp, None, None, adv, 0.2, 0.2, 0.0)
    assert torch.equal(one.ratio.detach(), torch.ones(4))
    one.loss.sum().backward()
    assert torch.allclose(lp.grad, -adv)


def _micro(per_token, lengths):
    """A padded (B, L) micro-batch and the same as flat tokens with their rows."""
    B, L = len(lengths), max(lengths)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    padded = torch.zeros(B, L)
    padded[mask] = per_token
    rows = mask.nonzero()[:, 0]
    return padded, mask, rows


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_normalisations_equal_trl_over_accumulated_micro_batches(loss_type):
    """The loop's Σ sums / Σ counts over two micro-batches equals TRL's accumulated loss, and a hand value."""
    L = 4  # max_completion_length
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])       # rows of 2 and 3 tokens
    b = torch.tensor([6.0, -1.0, 0.5, 2.0])           # rows of 1 and 3 tokens
    pa, ma, ra = _micro(a, [2, 3])
    pb, mb, rb = _micro(b, [1, 3])
    sums = [normalise(a, ra, 2, loss_type, L), normalise(b, rb, 2, loss_type, L)]
    ours = sum(s for s, _ in sums) / sum(c for _, c in sums)
    tokens = 9
    if loss_type == "dapo":  # TRL: each micro-batch over the generation batch's tokens, no /accumulation
        theirs = trl_loss(pa, ma, loss_type, L, tokens) + trl_loss(pb, mb, loss_type, L, tokens)
    else:                    # TRL: each micro-batch's loss / gradient_accumulation_steps
        theirs = (trl_loss(pa, ma, loss_type, L) + trl_loss(pb, mb, loss_type, L)) / 2
    hand = {"grpo": (1.5 + 4.0 + 6.0 + 0.5) / 4,                 # mean of per-row means
            "bnpo": (15 / 5 + 7.5 / 4) / 2,                      # per micro-batch token means, averaged
            "dr_grpo": (15 + 7.5) / (4 * L),                      # all tokens / (N x L)
            "dapo": (15 + 7.5) / tokens}[loss_type]               # all tokens / the step's tokens
    assert float(ours) == pytest.approx(hand) and float(theirs) == pytest.approx(hand)


# ----------------------------------------------------------------------------- rewards for the stage tests

def digits_reward(prompts, completions, **_):
    """Share of the completion's characters that are digits: varies across samples, so groups carry signal."""
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]


def raising_reward(prompts, completions, **_):
    raise ZeroDivisionError("boom")


def short_reward(prompts, completions, **_):
    return [1.0]


# ----------------------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    from lmlab.tasks import stage
    from lmlab.train import sft

    root = tmp_path_factory.mktemp("grpo")
    p = build_micro_pipeline(root, seq_len=129, steps=6)
    tasks = stage.run(stage.Config(out=str(root / "tasks"), tasks=[
        {"name": "arithmetic", "difficulty": [1], "n_train": 16, "n_test": 2, "n_dpo": 12, "n_fewshot": 0}]))
    s = sft.run(sft.Config(init=str(p["model"]), data=[str(tasks / "sft_train.jsonl")], out=str(root / "sft"),
                           seq_len=128, val_fraction=0.0, train={"steps": 3, "batch_size": 4, "lr": 3e-3, "device": "cpu"},
                           eval={"every": 0, "batches": 0}, log={"every": 1}, checkpoint={"every": 0}))
    return {"root": root, "sft": s, "problems": tasks / "train.jsonl"}


DIGITS = [{"name": "test_grpo:digits_reward"}, {"name": "exact", "weight": 0.5}]


def _cfg(chat, out, **kw):
    base = dict(init=str(chat["sft"]), problems=str(chat["problems"]), out=str(out), num_generations=4,
                max_completion_length=16, rewards=DIGITS, train={"steps": 3, "batch_size": 8, "lr": 3e-3,
                                                                 "device": "cpu"},
                eval={"every": 0, "batches": 0}, log={"every": 1}, checkpoint={"every": 0})
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return grpo.Config(**base)


def _lines(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_trains_logs_trl_metrics_and_completions(chat, tmp_path):
    out = tmp_path / "g"
    grpo.run(_cfg(chat, out, log_completions_every=1, val_fraction=0.25, eval={"every": 0, "batches": 1}))
    lines = [r for r in _lines(out) if "loss" in r]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/digits_reward/mean", "rewards/exact/mean",
                "completions/mean_length", "completions/clipped_ratio", "entropy", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max"):
        assert key in lines[0], key
    assert "kl" not in lines[0]                                   # beta 0: no reference, no kl
    assert all(r["frac_reward_zero_std"] < 1 for r in lines)      # digits give every group some spread
    assert lines[0]["clip_ratio/region_mean"] == 0.0              # μ = 1: the ratio is exactly 1
    assert lines[-1]["grad_norm"] > 0
    ev = [r for r in _lines(out) if "val_reward" in r]
    assert ev and "val_rewards/exact/mean" in ev[-1]
    comps = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert {c["step"] for c in comps} == {1, 2, 3} and set(comps[0]["rewards"]) == {"digits_reward", "exact"}
    m = json.loads((out / "manifest.json").read_text())
    assert m["verb"] == "grpo" and m["stats"]["rewards"] == ["digits_reward", "exact"]
    assert (out / "chat.json").is_file() and (out / "model.safetensors").is_file()


def test_resume_is_exact_inside_iterations_with_a_reference(chat, tmp_path):
    """μ = 2 keeps old log-probs; β > 0 a frozen reference; a resume at step 3 (mid-generation) is exact."""
    from safetensors.torch import load_file

    kw = dict(num_iterations=2, beta=0.1, train={"steps": 4}, checkpoint={"every": 1})
    a = tmp_path / "a"
    grpo.run(_cfg(chat, a, **kw))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_000004")
    shutil.rmtree(b / "checkpoints" / "step_000003")              # resume from step 2: the next generation
    for f in ("manifest.json", "model.safetensors"):
        (b / f).unlink()
    grpo.run(_cfg(chat, b, **kw))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [r for r in _lines(a) if "loss" in r]
    assert [r["loss"] for r in la] == [r["loss"] for r in _lines(b) if "loss" in r]
    assert all(r["kl"] >= 0 for r in la) and la[1]["kl"] > 0     # the second iteration has moved off the reference
    c = tmp_path / "c"                                            # resuming at step 3, inside a generation's μ steps
    shutil.copytree(a, c)
    shutil.rmtree(c / "checkpoints" / "step_000004")
    for f in ("manifest.json", "model.safetensors"):
        (c / f).unlink()
    grpo.run(_cfg(chat, c, **kw))
    wc = load_file(c / "model.safetensors")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


def test_lora_reference_is_the_base(chat, tmp_path):
    out = tmp_path / "lora"
    grpo.run(_cfg(chat, out, beta=0.1, num_iterations=2, lora={"enabled": True, "r": 4, "merge": True},
                  train={"steps": 2}))
    lines = [r for r in _lines(out) if "loss" in r]
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-6)        # step 1: the adapters are still zero (B = 0)
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()


def test_bad_input_is_one_clear_error(chat, tmp_path, capsys):
    base = ["grpo", f"init={chat['sft']}", f"problems={chat['problems']}", "max_completion_length=16",
            "train.steps=1", "train.device=cpu", "eval.batches=0"]
    cases = [
        (["num_generations=3", "train.batch_size=8", f"out={tmp_path / 'a'}"], "num_generations can be one of [2, 4, 8]"),
        (["rewards=[{name: test_grpo:raising_reward}]", "train.batch_size=8", "num_generations=4",
          f"out={tmp_path / 'b'}"], "reward function 'raising_reward' raised ZeroDivisionError"),
        (["rewards=[{name: test_grpo:short_reward}]", "train.batch_size=8", "num_generations=4",
          f"out={tmp_path / 'c'}"], "returned 1 rewards for 8 completions"),
        (["rewards=[{name: nosuch.module:f}]", f"out={tmp_path / 'd'}"], "cannot be imported"),
        (["max_completion_length=120", "train.batch_size=8", "num_generations=4", f"out={tmp_path / 'e'}"],
         "longer than the"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_reward_errors_none_marks_the_reward_and_trains_on(chat, tmp_path, capsys):
    out = tmp_path / "none"
    grpo.run(_cfg(chat, out, rewards=[{"name": "test_grpo:raising_reward"}, {"name": "test_grpo:digits_reward"}],
                  reward_errors="none", train={"steps": 2}))
    lines = [r for r in _lines(out) if "loss" in r]
    assert all(r["rewards/raising_reward/mean"] is None for r in lines) and lines[0]["reward"] > 0
    assert capsys.readouterr().err.count("raised ZeroDivisionError") == 1   # warned once


def test_malicious_code_completions_score_zero_and_the_trainer_survives(chat, tmp_path, monkeypatch):
    """GRPO on MBPP-style problems whose completions loop, fork, allocate, write outside and connect:
    every reward is 0 (a correct one 1), training goes on, nothing outside the sandbox changes."""
    import socket

    from lmlab.infer import engine

    outside = tmp_path / "outside.txt"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    evil = ["while True:\n    pass\n", "import os\nwhile True:\n    os.fork()\n",
            "x = []\nwhile True:\n    x.append(' ' * 10**7)\n", f"open({str(outside)!r}, 'w').write('pwned')\n",
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\n",
            "def add(a, b):\n    return a + b\n",          # the correct program
            "def add(a, b):\n    return a - b\n", "def add(a, b) return\n"]
    problems = tmp_path / "mbpp.jsonl"
    problems.write_text("".join(json.dumps({"task_id": i, "text": "Add a, b.",
                                            "code": "def add(a, b):\n    return a + b\n",
                                            "test_list": ["assert add(1, 2) == 3"],
                                            "test_setup_code": ""}) + "\n" for i in range(4)))
    real = engine.complete_ids

    def forced(model, tokenizer, prompts, sampling, stops=engine.Stops(), batch_size=32, device=None, bar=None):
        outs = real(model, tokenizer, prompts, sampling, stops, batch_size, device, bar)
        return [engine.Completion(o.ids, evil[i % len(evil)], o.finished) for i, o in enumerate(outs)]

    monkeypatch.setattr(engine, "complete_ids", forced)
    out = tmp_path / "code"
    grpo.run(_cfg(chat, out, problems=str(problems), rewards=[{"name": "code", "params": {"timeout_s": 2.0}}],
                  train={"steps": 2}, num_generations=8, log_completions_every=1))
    comps = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    by_text = {c["completion"]: c["rewards"]["code"] for c in comps}
    assert by_text["def add(a, b):\n    return a + b\n"] == 1.0
    assert all(v == 0.0 for t, v in by_text.items() if t != "def add(a, b):\n    return a + b\n"), by_text
    assert not outside.exists()
    try:
        conn, _ = server.accept()
        conn.close()
        connected = True
    except OSError:
        connected = False
    server.close()
    assert not connected
    lines = [r for r in _lines(out) if "loss" in r]
    assert len(lines) == 2 and lines[0]["rewards/code/mean"] == pytest.approx(1 / 8)
    assert (out / "model.safetensors").is_file()
