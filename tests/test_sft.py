"""The sft stage on a real micro pipeline: masking, packing, mixing, full and LoRA runs, resume, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_micro_pipeline

from lmlab.cli import main
from lmlab.data.chat import render
from lmlab.errors import Interrupted
from lmlab.models import load_model
from lmlab.train import sft
from lmlab.train.sft import Mixture, SFTObjective, conversation_positions, pack_rows


def conv(i: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    p = build_micro_pipeline(root)
    with open(root / "sums.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"messages": conv(i)}) + "\n")
    with open(root / "alpaca.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"instruction": f"Say the word number {i}.", "input": "", "output": f"word {i}"}) + "\n")
    model, tok, _ = load_model(p["model"])
    return {**p, "root": root, "model_obj": model, "tok": tok}


def cfg_for(pipe, out, *over):
    from lmlab.config import load_config
    base = [f"init={pipe['model']}", f"data={pipe['root'] / 'sums.jsonl'}", f"out={out}", "train.steps=8",
            "train.batch_size=4", "train.device=cpu", "train.lr=3e-3", "eval.every=4", "eval.batches=1",
            "log.every=1", "checkpoint.every=0", "val_fraction=0.1"]
    return load_config(sft.Config, None, base + list(over))


def test_loss_is_on_assistant_tokens_only(pipe):
    model, tok = pipe["model_obj"], pipe["tok"]
    ids, mask = render("chatml", conv(7), tok)
    x, y = conversation_positions(ids, mask)
    assert (y != -100).sum() == sum(mask[1:]) > 0  # trained tokens == the template's mask count
    reply = tok.decode([t for t in y if t != -100])
    assert "7 plus 7 is 14." in reply and "What is" not in reply
    rows = pack_rows([(x, y)], len(x), tok.pad_id, packing=True)
    obj = SFTObjective([rows], [1.0], None, 1, 1, 0, True, 0, tok.pad_id)
    b = obj.batch(0, 0)
    with torch.no_grad():
        loss, n = obj.loss(model, b)
        logits = model(torch.tensor(x)[None])[0][0]
    m = torch.tensor(y) != -100
    manual = F.cross_entropy(logits[m], torch.tensor(y)[m])
    assert n == int(m.sum()) and obj.tokens(b) == len(x)  # loss terms: the reply's targets; tokens: positions
    assert torch.allclose(loss / n, manual, atol=1e-5)
    # Other targets (the prompt's) do not count: a different user question changes the context,
    # but dropping the reply targets leaves no loss at all.
    y_none = np.full_like(y, -100)
    obj2 = SFTObjective([pack_rows([(x, y_none), (x, y)], 2 * len(x), tok.pad_id, True)], [1.0], None, 1, 1, 0,
                        True, 0, tok.pad_id)
    with torch.no_grad():
        total, n2 = obj2.loss(model, obj2.batch(0, 0))
    assert n2 == n and torch.allclose(total / n2, manual, atol=1e-5)


def test_packed_conversations_train_exactly_as_alone(pipe):
    model, tok = pipe["model_obj"], pipe["tok"]
    examples = [conversation_positions(*render("chatml", conv(i), tok)) for i in (3, 41, 500)]
    seq = sum(len(x) for x, _ in examples) + 5
    rows = pack_rows(examples, seq, tok.pad_id, packing=True)
    assert len(rows) == 1 and rows.used[0] == seq - 5
    b = SFTObjective([rows], [1.0], None, 1, 1, 0, True, 0, tok.pad_id).batch(0, 0)
    with torch.no_grad():
        packed = model(b["x"], doc_ids=b["doc"])[0][0]
        at = 0
        for x, _ in examples:
            alone = model(torch.tensor(x)[None])[0][0]
            assert torch.allclose(packed[at:at + len(x)], alone, atol=1e-5)
            at += len(x)
    assert len(pack_rows(examples, seq, tok.pad_id, packing=False)) == 3


def test_weighted_mixing_is_exact_per_block_and_pure():
    mix = Mixture([10, 30], [3.0, 1.0], seed=5)
    picks = [mix.locate(i) for i in range(4 * mix.block)]
    for blk in range(4):
        labels = [d for d, _ in picks[blk * 40:(blk + 1) * 40]]
        assert labels.count(0) == 30 and labels.count(1) == 10
    rows0 = [r for d, r in picks if d == 0]
    for p in range(12):  # dataset 0 is walked in whole passes: each row once per pass
        assert sorted(rows0[p * 10:(p + 1) * 10]) == list(range(10))
    assert Mixture([10, 30], [3.0, 1.0], seed=5).locate(77) == picks[77]
    assert [Mixture([10, 30], [3.0, 1.0], seed=6).locate(i) for i in range(40)] != picks[:40]


def test_full_sft_learns_and_writes_a_chat_model(pipe):
    out = pipe["root"] / "full"
    sft.run(cfg_for(pipe, out, "train.steps=30", "eval.every=10", "sample_prompts=['What is 3 plus 3?']",
                    "sample_max_new_tokens=8"))
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    assert any("val_loss" in r for r in lines)
    samples = [json.loads(s) for s in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [10, 20, 30] and samples[0]["prompt"] == "What is 3 plus 3?"
    m = json.loads((out / "manifest.json").read_text())
    st = m["stats"]
    assert m["kind"] == "model" and st["mode"] == "full" and st["conversations"] == 24
    assert st["train_conversations"] + st["val_conversations"] == 24 and st["val_conversations"] == 2
    assert 0 < st["trained_on_share"] < 1 and st["trained_on_tokens"] < st["tokens_trained"]
    model, tok, man = load_model(out)
    assert man["chat"]["template"] == "chatml"
    first = sft.run(cfg_for(pipe, out, "train.steps=30", "eval.every=10", "sample_prompts=['What is 3 plus 3?']",
                            "sample_max_new_tokens=8"))
    assert json.loads((first / "manifest.json").read_text())["created"] == m["created"]  # no-op re-run


def test_lora_run_loads_as_base_plus_adapter_and_merges(pipe):
    out = pipe["root"] / "lora"
    sft.run(cfg_for(pipe, out, "lora.enabled=true", "lora.r=4", "lora.use_dora=true"))
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "base.json").read_text())["path"] == str(pipe["model"])
    merged, _, _ = load_model(out)
    wrapped, _, _ = load_model(out, merge=False)
    x = torch.randint(0, 400, (2, 20))
    with torch.no_grad():
        assert torch.allclose(merged(x)[0], wrapped(x)[0], atol=1e-5)
        assert not torch.allclose(merged(x)[0], pipe["model_obj"](x)[0], atol=1e-4)
    st = json.loads((out / "manifest.json").read_text())["stats"]
    assert st["mode"] == "lora" and st["lora"]["use_dora"] and st["trainable_params"] < st["params"] / 2
    out2 = pipe["root"] / "lora_merged"
    sft.run(cfg_for(pipe, out2, "lora.enabled=true", "lora.r=4", "lora.merge=true"))
    assert (out2 / "model.safetensors").is_file() and (out2 / "adapter").is_dir()


def test_interrupted_run_resumes_bitwise_identically(pipe, monkeypatch):
    over = ("lora.enabled=true", "lora.dropout=0.1", "checkpoint.every=2", "train.grad_accum=2")
    ref = pipe["root"] / "ref"
    sft.run(cfg_for(pipe, ref, *over))
    out = pipe["root"] / "resumed"
    real = SFTObjective.batch

    def ctrl_c_at_step_5(self, step, micro):
        if step == 5:
            raise KeyboardInterrupt
        return real(self, step, micro)

    monkeypatch.setattr(SFTObjective, "batch", ctrl_c_at_step_5)
    with pytest.raises(Interrupted):
        sft.run(cfg_for(pipe, out, *over))
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(SFTObjective, "batch", real)
    sft.run(cfg_for(pipe, out, *over))
    from safetensors.torch import load_file
    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_runs_and_bad_input_exits_2_leaving_the_good_run(pipe, capsys):
    out = pipe["root"] / "cli"
    common = [f"init={pipe['model']}", f"out={out}", "train.steps=3", "train.batch_size=2", "train.device=cpu",
              "eval.batches=0", "checkpoint.every=0",
              f"data=[{{path: {pipe['root'] / 'sums.jsonl'}, weight: 0.7}}, {{path: {pipe['root'] / 'alpaca.jsonl'}, weight: 0.3}}]"]
    assert main(["sft", *common]) == 0
    st = json.loads((out / "manifest.json").read_text())["stats"]
    assert [d["conversations"] for d in st["datasets"]] == [24, 12]
    good = (out / "manifest.json").read_text()
    assert main(["sft", *common, "lora.enabled=true", "lora.target_modules=[q_proj]"]) == 2
    err = capsys.readouterr().err
    assert "q_proj" in err and "qkv" in err and "gate_up" in err and "Traceback" not in err
    assert main(["sft", *common, "template=nope"]) == 2
    assert main(["sft", *common, f"data={pipe['root'] / 'missing.jsonl'}"]) == 2
    assert (out / "manifest.json").read_text() == good and (out / "model.safetensors").is_file()


def test_malformed_records_skipped_counted_and_reported(pipe, capsys):
    """data invalid=skip: bad records are skipped, warned about (FILE:LINE) and counted in the manifest."""
    bad = pipe["root"] / "sums_bad.jsonl"
    good_lines = (pipe["root"] / "sums.jsonl").read_text().splitlines()
    bad.write_text("\n".join([json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot",
                                                                                        "content": "x"}]}),
                              *good_lines[:10], '{"messages": [', json.dumps({"messages": []}),
                              *good_lines[10:]]) + "\n")
    out = pipe["root"] / "skip"
    with pytest.raises(Exception, match=rf"{bad}:1: message 1 has unknown role 'bot'.*invalid=skip"):
        sft.run(cfg_for(pipe, out, f"data={bad}"))
    capsys.readouterr()
    sft.run(cfg_for(pipe, out, f"data=[{{path: {bad}, invalid: skip}}]", "train.steps=2"))
    err = capsys.readouterr().err
    assert (f"sft: warning: skipped 3 malformed records in {bad} (empty_conversation 1, not_json 1, unknown_role 1; "
            f"first: {bad}:1: message 1 has unknown role 'bot'") in err
    assert f"; {bad}:12: not valid JSON" in err and f"; {bad}:13: " in err
    st = json.loads((out / "manifest.json").read_text())["stats"]
    assert st["conversations"] == 24 and st["invalid_skipped"] == 3 and st["datasets"][0]["invalid_skipped"] == 3
    assert st["invalid_by_reason"] == {"unknown_role": 1, "not_json": 1, "empty_conversation": 1}
    assert [x.split(": ")[0] for x in st["invalid_first"]] == [f"{bad}:1", f"{bad}:12", f"{bad}:13"]
    # the valid conversations are exactly those of the clean file, in the same order
    from lmlab.data.formats import DataSpec, read_conversations
    where: list = []
    convs = read_conversations(DataSpec(path=str(bad), invalid="skip"), locations=where)
    assert convs == read_conversations(str(pipe["root"] / "sums.jsonl"))
    assert where == [f"{bad}:{n}" for n in [*range(2, 12), *range(14, 28)]]


def test_render_errors_name_the_record():
    from lmlab.errors import UserError

    class NoTokenizer:  # render fails on it before anything else: the error must name the record
        special_tokens = {}

    with pytest.raises(UserError, match=r"^data/x\.jsonl:7: .*special token"):
        sft.render_all([conv(1)], "chatml", NoTokenizer(), 64, {}, ["data/x.jsonl:7"])


def test_accumulation_weighs_every_trained_token_alike(pipe, tmp_path):
    """8 rows in one micro-batch or 4 + 4 accumulated: the same step, because the loss is the
    mean over all trained tokens of the step, not the mean of the micro-batches' means (which
    would weigh the 4 short replies' few tokens like the 4 long replies' many)."""
    from safetensors.torch import load_file

    data = tmp_path / "mixed.jsonl"
    with open(data, "w") as f:
        for i in range(16):  # half the replies 1 token-ish, half 10-25 words: micro-batches differ a lot
            reply = "ok" if i % 2 == 0 else " ".join(f"word{j}" for j in range(8 + i))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say {i}"},
                                             {"role": "assistant", "content": reply}]}) + "\n")
    common = [f"data={data}", "train.steps=2", "val_fraction=0", "eval.batches=0", "packing=false",
              "train.dtype=float32"]  # a CPU with native bf16 would autocast (rounding differs by batch shape)
    one = sft.run(cfg_for(pipe, tmp_path / "one", *common, "train.batch_size=8", "train.grad_accum=1"))
    two = sft.run(cfg_for(pipe, tmp_path / "two", *common, "train.batch_size=4", "train.grad_accum=2"))
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=5e-6, rtol=0)  # measured 4e-7 (old scheme: 1.3e-4)
    la = [r["loss"] for r in map(json.loads, (one / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    lb = [r["loss"] for r in map(json.loads, (two / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-5)
