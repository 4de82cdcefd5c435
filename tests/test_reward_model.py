"""The Bradley-Terry reward model: the loss and metrics against hand-computed values (TRL's formula), margins,
the preference formats dpo reads, training that ranks chosen over rejected, the API, exact resume and bad input."""

from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch

from conftest import build_micro_pipeline
from lmlab.cli import main
from lmlab.train import reward_model
from lmlab.train.scorer_losses import REWARD_METRICS, bradley_terry, reward_metric_sums

# ----------------------------------------------------------------------------- the formulas

RC, RR = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])
MARGIN = torch.tensor([0.5, 0.0, 0.0])


def test_bradley_terry_loss_hand_computed_with_margin_and_centring():
    # −log σ(x) at x = 1 − 0 − 0.5, 0, 2 − 3: log(1 + e^−0.5), log 2, log(1 + e)
    plain = [math.log1p(math.exp(-0.5)), math.log(2), math.log1p(math.e)]
    assert torch.allclose(bradley_terry(RC, RR, MARGIN), torch.tensor(plain), atol=1e-6)
    assert torch.allclose(bradley_terry(RC, RR), torch.tensor([math.log1p(math.exp(-1)), math.log(2),
                                                               math.log1p(math.e)]), atol=1e-6)
    # centring: + c·(r_c + r_r)² = 0.1 x [1, 0, 25]
    centred = bradley_terry(RC, RR, MARGIN, center_rewards_coefficient=0.1)
    assert torch.allclose(centred, torch.tensor(plain) + torch.tensor([0.1, 0.0, 2.5]), atol=1e-6)
    # the batch mean is TRL's: mean(−logσ(r_c − r_r − m)) + c·mean((r_c + r_r)²)
    trl = -torch.nn.functional.logsigmoid(RC - RR - MARGIN).mean() + 0.1 * torch.mean((RC + RR) ** 2)
    assert centred.mean().item() == pytest.approx(trl.item(), rel=1e-6)
    assert torch.equal(bradley_terry(RC, RR, MARGIN, 0.0), bradley_terry(RC, RR, MARGIN, None))
    # gradient: d/dr_c of −log σ(d) is −σ(−d)
    rc = RC.clone().requires_grad_(True)
    bradley_terry(rc, RR).sum().backward()
    assert torch.allclose(rc.grad, -torch.sigmoid(-(RC - RR)))


def test_reward_metric_sums():
    sums = dict(zip(REWARD_METRICS, reward_metric_sums(RC, RR).tolist()))
    # accuracy: only 1 > 0 (a tie is not a win, as in TRL); margins 1 + 0 − 1; mean rewards 0.5 + 0 + 2.5
    assert sums == {"accuracy": 1.0, "margin": 0.0, "mean_reward": 3.0}


# ----------------------------------------------------------------------------- on a micro model

@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro chat model and 24 arithmetic preference pairs (half the rejected replies a refusal)."""
    from lmlab.data.chat import save_chat_template

    root = tmp_path_factory.mktemp("reward")
    p = build_micro_pipeline(root, steps=8)
    save_chat_template(p["model"], "chatml")
    rng = random.Random(0)
    lines = []
    for _ in range(24):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        lines.append({"prompt": f"What is {a} plus {b}?", "chosen": f"{a} + {b} = {a + b}",
                      "rejected": "I do not know." if a % 2 else f"{a} + {b} = {a + b + 1}"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {**p, "pairs": root / "pairs.jsonl", "lines": lines}


def _args(micro, out, *extra):
    return ["reward", f"init={micro['model']}", f"data={micro['pairs']}", f"out={out}", "train.steps=16",
            "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=0", "train.device=cpu", "eval.every=8",
            "eval.batches=2", "log.every=1", "checkpoint.every=0", "val_fraction=0.0", *extra]


def test_cli_trains_a_reward_model_that_ranks_chosen_over_rejected(micro, tmp_path, capsys):
    from lmlab.infer.scorer import RewardModel, Verifier
    from lmlab.errors import UserError

    out = tmp_path / "rm"
    assert main(_args(micro, out, "center_rewards_coefficient=0.01")) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "reward" and m["verb"] == "reward" and m["config"]["template"] == "chatml"
    meta = json.loads((out / "scorer.json").read_text())
    assert meta["kind"] == "reward" and meta["score"] == "reward" and meta["tokenizer_sha256"] == m["tokenizer_sha256"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 17))
    assert set(reward_model.METRICS) <= set(train[0])  # TRL's names on every train line
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the zero head: every reward 0
    assert np.mean([r["loss"] for r in train[-4:]]) < 0.75 * np.mean([r["loss"] for r in train[:4]])
    assert m["stats"]["final_train_metrics"] == {k: train[-1][k] for k in reward_model.METRICS}

    rm = RewardModel.load(out)
    prompts = [x["prompt"] for x in micro["lines"]]
    chosen = rm.score(prompts, [x["chosen"] for x in micro["lines"]])
    rejected = rm.score(prompts, [x["rejected"] for x in micro["lines"]])
    assert np.mean(np.array(chosen) > np.array(rejected)) >= 0.75
    # a single pair: the raw reward, the scorer's own forward at the reply's last token
    enc = rm.encode(prompts[0], micro["lines"][0]["chosen"])
    with torch.no_grad():
        r = rm.model(torch.tensor([enc.ids]))[0, -1].item()
    assert rm.score(prompts[0], micro["lines"][0]["chosen"]) == pytest.approx(r, abs=1e-6) == pytest.approx(chosen[0])
    with pytest.raises(UserError, match="not a verifier"):
        Verifier.load(out)
    capsys.readouterr()
    assert main(_args(micro, out, "center_rewards_coefficient=0.01")) == 0
    assert "up to date" in capsys.readouterr().out


def test_margins_are_read_per_pair_and_checked(micro, tmp_path, capsys):
    from lmlab.data.formats import DataSpec, read_preferences

    path = tmp_path / "margins.jsonl"
    recs = [dict(x) for x in micro["lines"][:6]]
    recs[1]["margin"], recs[4]["margin"] = 1.5, 2
    path.write_text("".join(json.dumps(x) + "\n" for x in recs))
    spec = DataSpec(path=str(path), format="preference")
    where: list[str] = []
    read_preferences(spec, locations=where)
    assert reward_model.read_margins(spec, where) == [0.0, 1.5, 0.0, 0.0, 2.0, 0.0]

    out = tmp_path / "m"
    assert main([*_args(micro, out, "train.steps=1", "eval.batches=0"), f"data={path}"]) == 0
    assert json.loads((out / "manifest.json").read_text())["stats"]["pairs_with_margin"] == 2
    recs[2]["margin"] = "big"
    path.write_text("".join(json.dumps(x) + "\n" for x in recs))
    capsys.readouterr()
    assert main([*_args(micro, tmp_path / "m2", "train.steps=1"), f"data={path}"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3" in err and "margin" in err and not (tmp_path / "m2").exists()


def test_hh_rlhf_and_ultrafeedback_formats_train_together(micro, tmp_path):
    from lmlab.data.formats import DataSpec, read_preferences
    from lmlab.infer.scorer import encode_reply
    from lmlab.models import load_model

    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2 plus 2?"
                                        "\n\nAssistant: 2 + 2 = 4",
                              "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2 plus 2?"
                                          "\n\nAssistant: I do not know."}) + "\n")
    uf = tmp_path / "uf.jsonl"
    user = {"role": "user", "content": "What is 3 plus 3?"}
    uf.write_text(json.dumps({"chosen": [user, {"role": "assistant", "content": "3 + 3 = 6"}],
                              "rejected": [user, {"role": "assistant", "content": "I do not know."}]}) + "\n")
    _, tok, _ = load_model(micro["model"])
    records, where = [], []
    for f in (hh, uf):
        w: list[str] = []
        records.append(read_preferences(DataSpec(path=str(f), format="preference"), locations=w))
        where.append(w)
    pairs, counts = reward_model.tokenize_pairs(records, where, [[0.0], [0.0]], "chatml", tok, 64, "left")
    assert len(pairs) == 2 and counts["pairs_read"] == 2
    # the hh-rlhf prompt is the whole transcript before the last reply (three turns)
    assert len(records[0][0]["prompt"]) == 3
    assert pairs.seqs.ids[0].tolist() == encode_reply("chatml", records[0][0]["prompt"], "2 + 2 = 4", tok, 64).ids
    out = tmp_path / "mixed"
    assert main(["reward", f"init={micro['model']}", f"data=[{hh}, {uf}]", f"out={out}", "train.steps=2",
                 "train.batch_size=2", "train.device=cpu", "val_fraction=0.0", "eval.batches=0",
                 "checkpoint.every=0"]) == 0
    assert json.loads((out / "manifest.json").read_text())["stats"]["pairs_train"] == 2


def test_resume_is_exact(micro, tmp_path):
    from safetensors.torch import load_file

    extra = ("train.steps=4", "checkpoint.every=2", "eval.every=0", "val_fraction=0.2")
    a = tmp_path / "a"
    assert main(_args(micro, a, *extra)) == 0
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_000004")          # as if killed during step 3 or 4
    for f in ("manifest.json", "model.safetensors", "head.safetensors", "scorer.json"):
        (b / f).unlink()
    assert main(_args(micro, b, *extra)) == 0
    for f in ("model.safetensors", "head.safetensors"):
        wa, wb = load_file(a / f), load_file(b / f)
        assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa), f
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for d in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_bad_input_exits_2_and_writes_nothing(micro, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["reward", f"init={micro['model']}", f"out={out}", "train.steps=1", "train.device=cpu"]

    def fails(*args) -> str:
        capsys.readouterr()
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and not out.exists()
        return err

    assert "no preference data" in fails()
    assert "'tokenizer' artifact" in fails(f"data={micro['pairs']}", f"init={micro['tokenizer']}")
    same = tmp_path / "same.jsonl"
    same.write_text(micro["pairs"].read_text() + json.dumps({"prompt": "Hi?", "chosen": "Hello", "rejected": "Hello"})
                    + "\n")
    err = fails(f"data={same}")
    assert f"{same}:25" in err and "identical" in err
    err = fails(f"data={micro['pairs']}", "max_len=12", "truncation=error")
    assert "longer than max_len=12" in err and f"{micro['pairs']}:1" in err
