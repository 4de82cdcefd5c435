"""DPO: the loss formulas against hand-computed values, completion-only log-probs, the reference
cache, training that raises the reward margin, LoRA, exact resume, the CLI and bad input."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_micro_pipeline
from lmlab.cli import main
from lmlab.train import dpo
from lmlab.train.dpo_losses import METRICS, dpo_loss, metric_sums, sequence_logps

# ----------------------------------------------------------------------------- the formulas

# pc, pr, rc, rr = policy/reference log-probs of chosen/rejected; x = (pc - pr) - (rc - rr) = [1, -1]
PC, PR = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
RC, RR = torch.tensor([-1.5, -1.5]), torch.tensor([-1.5, -1.5])
L_POS = 0.4740769841801067  # -log sigmoid(0.5) = log(1 + e^-0.5)
L_NEG = 0.9740769841801067  # -log sigmoid(-0.5) = log(1 + e^0.5)


@pytest.mark.parametrize("loss, eps, expected", [
    ("sigmoid", 0.0, [L_POS, L_NEG]),                                        # -log σ(βx), β = 0.5
    ("sigmoid", 0.1, [0.9 * L_POS + 0.1 * L_NEG, 0.9 * L_NEG + 0.1 * L_POS]),  # cDPO: 0.524077, 0.924077
    ("robust", 0.1, [(0.9 * L_POS - 0.1 * L_NEG) / 0.8, (0.9 * L_NEG - 0.1 * L_POS) / 0.8]),  # 0.411577, 1.036577
    ("robust", 0.0, [L_POS, L_NEG]),
    ("hinge", 0.0, [0.5, 1.5]),                                              # relu(1 - 0.5 x)
    ("ipo", 0.0, [0.0, 4.0]),                                                # (x - 1/(2·0.5))²
])
def test_losses_equal_hand_computed_values(loss, eps, expected):
    losses, chosen_r, rejected_r = dpo_loss(PC, PR, RC, RR, beta=0.5, loss=loss, label_smoothing=eps)
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-6), (loss, eps, losses)
    # implicit rewards β·(π − ref): chosen 0.5·[0.5, -0.5], rejected 0.5·[-0.5, 0.5]
    assert torch.allclose(chosen_r, torch.tensor([0.25, -0.25]))
    assert torch.allclose(rejected_r, torch.tensor([-0.25, 0.25]))
    sums = dict(zip(METRICS, metric_sums(chosen_r, rejected_r, PC, PR).tolist()))
    assert sums["rewards/margins"] == pytest.approx(0.0) and sums["rewards/accuracies"] == 1.0
    assert sums["logps/chosen"] == pytest.approx(-3.0) and sums["logps/rejected"] == pytest.approx(-3.0)


def test_beta_scaling():
    x_pc = torch.tensor([-3.0, -1.0, -2.0])
    # sigmoid depends on β·x only: β=0.2 at x equals β=0.1 at 2x
    a = dpo_loss(x_pc, torch.zeros(3), torch.zeros(3), torch.zeros(3), beta=0.2)[0]
    b = dpo_loss(2 * x_pc, torch.zeros(3), torch.zeros(3), torch.zeros(3), beta=0.1)[0]
    assert torch.allclose(a, b)
    # rewards are linear in β; ipo's target margin 1/(2β) halves when β doubles
    r1 = dpo_loss(x_pc, torch.zeros(3), torch.zeros(3), torch.zeros(3), beta=0.1)[1]
    r2 = dpo_loss(x_pc, torch.zeros(3), torch.zeros(3), torch.zeros(3), beta=0.3)[1]
    assert torch.allclose(r2, 3 * r1)
    ipo = dpo_loss(torch.tensor([2.5]), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.2, loss="ipo")[0]
    assert ipo.item() == pytest.approx(0.0)  # x = 1/(2·0.2) = 2.5 is IPO's optimum
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, loss="robust", label_smoothing=0.5)


def test_sequence_logps_only_count_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    logps, n = sequence_logps(logits, targets)
    direct = torch.log_softmax(logits, -1)
    assert n.tolist() == [2, 4]
    assert logps[0].item() == pytest.approx((direct[0, 2, 3] + direct[0, 3, 4]).item(), abs=1e-5)
    # logits at prompt/padding positions (no target) change nothing
    changed = logits.clone()
    changed[0, :2] += 100 * torch.randn(2, 7)
    changed[0, 4] = 0
    assert torch.allclose(sequence_logps(changed, targets)[0], logps)


# ----------------------------------------------------------------------------- on a micro model

@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro pretrained model made a chat model (chat.json), and a tiny arithmetic preference file.

    Half the rejected replies are a refusal, which a micro model can learn to disprefer in a
    few steps (the other half, an off-by-one sum, it cannot learn that fast).
    """
    from lmlab.data.chat import save_chat_template

    root = tmp_path_factory.mktemp("dpo")
    p = build_micro_pipeline(root, steps=8)
    save_chat_template(p["model"], "chatml")
    rng = random.Random(0)
    lines = []
    for _ in range(24):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        lines.append({"prompt": f"What is {a} plus {b}?", "chosen": f"{a} + {b} = {a + b}",
                      "rejected": "I do not know." if a % 2 else f"{a} + {b} = {a + b + 1}"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {**p, "pairs": root / "pairs.jsonl"}


def _cfg(micro, out, **kw) -> dpo.Config:
    base = dict(init=str(micro["model"]), out=str(out), data=[str(micro["pairs"])], val_fraction=0.0,
                train={"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "device": "cpu"},
                eval={"every": 0, "batches": 2}, log={"every": 1}, checkpoint={"every": 0})
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return dpo.Config(**base)


def _load_pairs(micro, max_len=64, truncation="left"):
    from lmlab.data.formats import read_preferences
    from lmlab.models import load_model

    model, tok, _ = load_model(micro["model"])
    recs = read_preferences(str(micro["pairs"]))
    pairs, counts = dpo.tokenize_pairs([recs], ["pairs"], "chatml", tok, max_len, truncation)
    return model, tok, recs, pairs, counts


def test_pairs_tokenized_as_sft_trains_them(micro):
    from lmlab.data.chat import prompt_ids, render

    model, tok, recs, pairs, _ = _load_pairs(micro)
    rec = recs[0]
    ids, mask = render("chatml", rec["prompt"] + [{"role": "assistant", "content": rec["chosen"]}], tok)
    p = pairs.prompt(0).tolist()
    assert p == prompt_ids("chatml", rec["prompt"], tok)          # the generation prompt, exactly
    assert p + pairs.chosen(0).tolist() == ids[:len(p) + len(pairs.chosen(0))]
    assert pairs.chosen(0).tolist() == [i for i, m in zip(ids, mask) if m]  # reply + <|im_end|>
    assert pairs.chosen(0)[-1] == tok.special_tokens["<|im_end|>"]

    # completion log-prob from the collated batch == a direct log_softmax sum over the completion
    batch = dpo.collate(pairs, [0, 1], pad_id=0)
    with torch.no_grad():
        pc, pr = dpo.policy_logps(model, batch, average=False)
        for k, part, got in [(0, pairs.chosen(0), pc[0]), (1, pairs.rejected(1), pr[1])]:
            seq = torch.tensor(np.concatenate([pairs.prompt(k), part]))[None]
            lp = torch.log_softmax(model(seq[:, :-1])[0], -1)[0]
            start = len(pairs.prompt(k))
            direct = sum(lp[t - 1, seq[0, t]].item() for t in range(start, seq.shape[1]))
            assert got.item() == pytest.approx(direct, abs=1e-4)
        # logits computed only at completion positions (the output-layer hook) == the full logits
        full = sequence_logps(model(batch["x"])[0], batch["y"])
        sel = dpo.completion_logps(model, batch["x"], batch["y"])
        assert torch.allclose(full[0], sel[0], atol=1e-4) and torch.equal(full[1], sel[1])
        # IPO averages over completion tokens
        pc_avg, _ = dpo.policy_logps(model, batch, average=True)
        assert pc_avg[0].item() == pytest.approx(pc[0].item() / len(pairs.chosen(0)), abs=1e-5)


def test_too_long_pairs_cut_from_the_left_or_refused(micro):
    from lmlab.errors import UserError

    _, tok, _, full, _ = _load_pairs(micro)
    longest = max(len(full.prompt(i)) + max(len(full.chosen(i)), len(full.rejected(i))) for i in range(len(full)))
    max_len = longest - 3
    _, _, _, cut, counts = _load_pairs(micro, max_len=max_len)
    assert counts["pairs_truncated"] >= 1 and counts["pairs_dropped"] == 0 and len(cut) == len(full)
    for i in range(len(cut)):
        p, q = cut.prompt(i).tolist(), full.prompt(i).tolist()
        assert len(p) + max(len(cut.chosen(i)), len(cut.rejected(i))) <= max_len
        assert p[0] == tok.bos_id and p[1:] == q[len(q) - len(p) + 1:]   # bos + the end of the prompt
        assert cut.chosen(i).tolist() == full.chosen(i).tolist()           # completions intact
    with pytest.raises(UserError, match=r"longer than max_len=.*pairs:.*pair \d+.*truncation=left"):
        _load_pairs(micro, max_len=max_len, truncation="error")
    # completions that leave no room for the question: dropped (all of them -> a clear error in run)
    _, _, _, none_left, counts = _load_pairs(micro, max_len=16)
    assert len(none_left) == 0 and counts["pairs_dropped"] == counts["pairs_read"]


def test_reference_cache_written_once_reused_and_invalidated(micro, tmp_path, monkeypatch):
    from lmlab.models import load_model, save_model

    out = tmp_path / "run"
    dpo.run(_cfg(micro, out))
    ref = np.load(out / dpo.REF_CACHE)
    assert ref.shape == (24, 4) and np.all(ref[:, :2] < 0) and np.all(ref[:, 2:] >= 2)
    assert json.loads((out / "manifest.json").read_text())["stats"]["reference_reused"] is False

    # another beta: the same reference, read from the cache (computing it would fail here)
    def no_compute(*a, **k):
        raise AssertionError("the reference was recomputed")
    monkeypatch.setattr(dpo, "compute_reference", no_compute)
    dpo.run(_cfg(micro, out, beta=0.3, resume="never"))
    assert json.loads((out / "manifest.json").read_text())["stats"]["reference_reused"] is True
    monkeypatch.undo()

    # a changed reference model invalidates the cache
    changed = tmp_path / "changed_init"
    shutil.copytree(micro["model"], changed)
    model, _, _ = load_model(changed)
    with torch.no_grad():
        model.embed.weight.mul_(1.5)
    save_model(model, changed)
    dpo.run(_cfg(micro, out, init=str(changed), resume="never"))
    assert json.loads((out / "manifest.json").read_text())["stats"]["reference_reused"] is False
    assert not np.allclose(np.load(out / dpo.REF_CACHE)[:, :2], ref[:, :2])


def test_policy_equals_reference_at_step_zero(micro):
    """Before any update x = 0: sigmoid loss = log 2, IPO loss = (1/(2β))², hinge 1, rewards 0."""
    model, tok, _, pairs, _ = _load_pairs(micro)
    ref = dpo.compute_reference(model, pairs, 4, torch.device("cpu"), None)
    for loss, expected in (("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2), ("hinge", 1.0)):
        cfg = _cfg(micro, "unused", loss=loss)
        obj = dpo.PreferenceObjective(pairs, np.arange(len(pairs)), np.zeros(0, np.int64), ref, [1.0], cfg, 0)
        model.eval()
        with torch.no_grad():
            batch = obj.batch(0, 0)
            total, n_pairs = obj.loss(model, batch)  # the loss summed over the pairs, and their number
        assert total.item() / n_pairs == pytest.approx(expected, rel=1e-4)
        assert n_pairs == batch["x"].shape[0] // 2 and obj.tokens(batch) == batch["n_tokens"] > 0
        metrics = obj.train_metrics()  # the means since the last call, then reset
        assert abs(metrics["rewards/margins"]) < 1e-4 and set(METRICS) == set(metrics)
        assert obj.train_metrics() == {}
        assert obj.evaluate(model, torch.device("cpu")) == {}  # no val pairs; train means are not repeated
    # RPO adds alpha x the mean NLL of the chosen tokens: here from the reference, as policy == reference
    obj = dpo.PreferenceObjective(pairs, np.arange(len(pairs)), np.zeros(0, np.int64), ref, [1.0],
                                  _cfg(micro, "unused", rpo_alpha=0.5), 0)
    idx = obj.pair_indices(0, 0)
    nll = -ref[idx, 0].sum() / ref[idx, 2].sum()
    with torch.no_grad():
        total, n_pairs = obj.loss(model, obj.batch(0, 0))
        assert total.item() / n_pairs == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-4)


def test_dpo_steps_raise_the_margin_on_training_pairs(micro, tmp_path):
    from lmlab.models import load_model

    out = tmp_path / "run"
    dpo.run(_cfg(micro, out, train={"steps": 16, "lr": 3e-3}, eval={"every": 8, "batches": 2}))
    model, tok, manifest = load_model(out)
    _, _, _, pairs, _ = _load_pairs(micro)
    ref = np.load(out / dpo.REF_CACHE)
    with torch.no_grad():
        pc, pr = dpo.policy_logps(model, dpo.collate(pairs, range(len(pairs)), 0), average=False)
    margins = 0.1 * ((pc.numpy() - ref[:, 0]) - (pr.numpy() - ref[:, 1]))
    assert margins.mean() > 0.5 and (margins > 0).mean() >= 0.75, margins
    lines = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "rewards/margins" in r]
    assert [r["step"] for r in lines] == list(range(1, 17)) and all("loss" in r for r in lines)  # log.every=1
    assert lines[-1]["rewards/margins"] > 0
    assert manifest["stats"]["final_train_metrics"] == {k: lines[-1][k] for k in METRICS}
    assert manifest["stats"]["pairs_per_s"] > 0 and manifest["chat"]["template"] == "chatml"


def test_resume_is_exact(micro, tmp_path):
    from safetensors.torch import load_file

    cfg = dict(train={"steps": 4}, checkpoint={"every": 2})
    a = tmp_path / "a"
    dpo.run(_cfg(micro, a, **cfg))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_000004")          # as if killed during step 3 or 4
    for f in ("manifest.json", "model.safetensors"):
        (b / f).unlink()
    dpo.run(_cfg(micro, b, **cfg))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for d in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_lora_reference_is_the_base_and_outputs_load(micro, tmp_path):
    from lmlab.models import load_model

    full = tmp_path / "full"
    dpo.run(_cfg(micro, full, train={"steps": 1}))
    lora = tmp_path / "lora"
    dpo.run(_cfg(micro, lora, lora={"enabled": True, "r": 4, "merge": False}, train={"steps": 3, "lr": 5e-3}))
    # adapters disabled == the init model: the same reference log-probs as the full run's
    assert np.allclose(np.load(lora / dpo.REF_CACHE), np.load(full / dpo.REF_CACHE), atol=1e-4)
    assert (lora / "adapter" / "adapter_config.json").is_file() and not (lora / "model.safetensors").exists()
    stats = json.loads((lora / "manifest.json").read_text())["stats"]
    assert stats["trainable_params"] < stats["params"] / 2
    model, _, manifest = load_model(lora)                    # base (init) + adapter, merged on load
    base, _, _ = load_model(micro["model"])
    assert manifest["chat"]["template"] == "chatml"
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


def test_cli_run_no_op_rerun_and_outputs(micro, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["dpo", f"init={micro['model']}", f"data={micro['pairs']}", f"out={out}", "train.steps=2",
            "train.batch_size=2", "train.device=cpu", "val_fraction=0.25", "eval.every=1", "eval.batches=1",
            "checkpoint.every=0", "loss=hinge"]
    assert main(args) == 0
    for f in ("model.safetensors", "model.json", "tokenizer", "chat.json", "metrics.jsonl", "manifest.json",
              dpo.REF_CACHE):
        assert (out / f).exists(), f
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "model" and m["config"]["template"] == "chatml" and m["config"]["loss"] == "hinge"
    assert m["stats"]["pairs_val"] >= 1 and set(m["stats"]["final_val_metrics"]) == set(METRICS)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val_lines = [r for r in lines if "val_loss" in r]
    assert len(val_lines) == 2 and "val_rewards/accuracies" in val_lines[0]
    assert not set(METRICS) & set(val_lines[0])  # the train means are on the train lines only
    train_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_lines] == [2] and set(METRICS) <= set(train_lines[0])  # log.every=10: the end
    capsys.readouterr()
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out


def test_bad_input_exits_2_and_keeps_the_good_artifact(micro, tmp_path, capsys):
    out = tmp_path / "good"
    good = ["dpo", f"init={micro['model']}", f"out={out}", "train.steps=1", "train.batch_size=2",
            "train.device=cpu", "checkpoint.every=0", "eval.batches=0"]
    assert main(good + [f"data={micro['pairs']}"]) == 0
    before = (out / "manifest.json").read_text(), (out / "model.safetensors").read_bytes()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(micro["pairs"].read_text() + json.dumps({"prompt": "Hi?", "chosen": "Hello", "rejected": "Hello"})
                   + "\n")
    capsys.readouterr()
    assert main(good + [f"data={bad}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:25" in err and "identical" in err and "Traceback" not in err
    assert main(good + [f"data={micro['pairs']}", "max_len=20", "truncation=error"]) == 2
    err = capsys.readouterr().err
    assert "longer than max_len=20" in err and f"first: {micro['pairs']}:1 (" in err  # FILE:LINE
    assert main(good + [f"data={micro['pairs']}", "max_len=100000"]) == 2
    assert "max_seq_len" in capsys.readouterr().err
    assert ((out / "manifest.json").read_text(), (out / "model.safetensors").read_bytes()) == before


def test_weighted_sources_epochs_and_val_split(micro):
    """Two sources mixed 3:1 by weight (SFT's Mixture), train.epochs sizing, val split by whole prompts."""
    _, _, _, pairs, _ = _load_pairs(micro)
    both = dpo.Pairs()
    for s in (0, 1):
        for i in range(len(pairs)):
            both.add(pairs.prompt(i), pairs.chosen(i), pairs.rejected(i), s, f"{s}:{pairs.prompt_key[i]}")
    train_idx, val_idx = dpo.split_val(both, 2, 0.25, seed=1)
    assert len(val_idx) > 0 and not {both.prompt_key[i] for i in val_idx} & {both.prompt_key[i] for i in train_idx}
    assert all(0 < sum(both.source[i] == s for i in val_idx) < 24 for s in (0, 1))  # each source split
    cfg = _cfg(micro, "unused", train={"steps": None, "epochs": 2, "batch_size": 4})
    obj = dpo.PreferenceObjective(both, train_idx, val_idx, np.zeros((len(both), 4)), [3.0, 1.0], cfg, 0)
    block = [i for step in range(obj.epoch_len // 4) for i in obj.pair_indices(step, 0)]
    share = np.mean([both.source[i] == 0 for i in block])
    assert share == pytest.approx(0.75, abs=0.05)
    assert np.array_equal(obj.pair_indices(5, 0), dpo.PreferenceObjective(
        both, train_idx, val_idx, np.zeros((len(both), 4)), [3.0, 1.0], cfg, 0).pair_indices(5, 0))  # pure
    assert dpo._total_steps(cfg.train, obj.epoch_len) == math.ceil(2 * obj.epoch_len / 4)


def test_hh_rlhf_recipe_is_a_valid_config():
    from lmlab.config import load_config

    cfg = load_config(dpo.Config, Path(__file__).parent.parent / "configs" / "dpo" / "hh_rlhf_tiny.yaml")
    assert cfg.data[0].hf == "Anthropic/hh-rlhf" and cfg.data[0].format == "preference"
    assert cfg.loss == "sigmoid" and cfg.beta == 0.1 and cfg.train.epochs == 1


def test_train_metrics_on_every_log_line(micro, tmp_path):
    """The objective's train_metrics hook: TRL's metrics on each train line, as means since the previous one."""
    out = tmp_path / "run"
    dpo.run(_cfg(micro, out, train={"steps": 4}, eval={"every": 2, "batches": 1}, val_fraction=0.25))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(set(METRICS) <= set(r) for r in train)
    for r in train:
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
        assert 0 <= r["rewards/accuracies"] <= 1 and r["logps/chosen"] < 0
    assert train[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)  # step 1: the policy is the reference
    assert len({r["rewards/margins"] for r in train}) == 4   # per step, not one running mean repeated
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(not set(METRICS) & set(r) for r in evals)
    # log.every=2: each line averages the two steps since the previous one (batches are a pure function
    # of the step, so the means of the per-step lines above are the answer)
    out2 = tmp_path / "run2"
    dpo.run(_cfg(micro, out2, train={"steps": 4}, eval={"every": 2, "batches": 1}, val_fraction=0.25,
                 log={"every": 2}))
    train2 = [json.loads(x) for x in (out2 / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in train2] == [2, 4]
    for r, (a, b) in zip(train2, [(train[0], train[1]), (train[2], train[3])]):
        for k in METRICS:
            assert r[k] == pytest.approx((a[k] + b[k]) / 2, rel=1e-4, abs=1e-6), k


def test_malformed_pairs_skipped_and_later_errors_name_file_line(micro, tmp_path, capsys):
    """invalid=skip: malformed records are skipped and counted; errors after tokenizing still name FILE:LINE."""
    bad = tmp_path / "pairs_bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi?", "chosen": " ", "rejected": "Hello"}) + "\n"   # 1: empty reply
                   + '{"prompt": "cut off\n'                                                 # 2: not JSON
                   + json.dumps({"prompt": "Hi?", "chosen": "Hello", "rejected": "Hello"}) + "\n"  # 3: identical
                   + micro["pairs"].read_text())                                             # 4..27: good
    spec = f"data=[{{path: {bad}, invalid: skip, identical_pairs: skip}}]"
    common = ["dpo", f"init={micro['model']}", f"out={tmp_path / 'cli'}", "train.steps=1", "train.batch_size=2",
              "train.device=cpu", "checkpoint.every=0", "eval.batches=0"]
    capsys.readouterr()
    assert main(common + [f"data={bad}"]) == 2
    assert f"{bad}:1: the chosen reply is empty; or set invalid=skip" in capsys.readouterr().err
    assert main(common + [spec, "max_len=20", "truncation=error"]) == 2
    err = capsys.readouterr().err
    assert f"first: {bad}:4 (" in err and "Traceback" not in err  # the first good pair's line, not 'pair 1'

    out = tmp_path / "run"
    dpo.run(_cfg(micro, out, data=[{"path": str(bad), "invalid": "skip", "identical_pairs": "skip"}]))
    err = capsys.readouterr().err
    assert f"dpo: warning: skipped 2 malformed records in {bad} (empty_reply 1, not_json 1; first: {bad}:1: " in err
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats["pairs_read"] == 24 and stats["pairs_invalid_skipped"] == 2 and stats["pairs_identical_skipped"] == 1
    assert stats["invalid_by_reason"] == {"empty_reply": 1, "not_json": 1}
    assert [x.split(": ")[0] for x in stats["invalid_first"]] == [f"{bad}:1", f"{bad}:2"]
    # the pairs that were fine train exactly as they do from the clean file
    assert np.array_equal(np.load(out / dpo.REF_CACHE), np.load(_clean_run(micro, tmp_path) / dpo.REF_CACHE))


def _clean_run(micro, tmp_path):
    out = tmp_path / "clean"
    dpo.run(_cfg(micro, out))
    return out
