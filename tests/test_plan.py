"""`lmlab plan`: exact parameter counts, the memory model's shape, the verdict, and one measured CPU peak."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmlab import plan as P
from lmlab.errors import UserError
from lmlab.models import save_model
from lmlab.models.transformer import Transformer, param_count, resolve_model_config
from lmlab.train import dpo, pretrain, sft

ROOT = Path(__file__).resolve().parent.parent
BASE = P.RunShape(rows=8, seq=1023, forwards=1, world=1, strategy="none", checkpointing=False, bf16=True,
                  device="cuda")


def dims(preset: str = "base", **over) -> P.ModelDims:
    return P.model_dims(P.build_meta(resolve_model_config({"preset": preset, **over}, vocab_size=32768)))


def total(m, **shape) -> float:
    return P.total_bytes(m, replace(BASE, **shape))


@pytest.mark.parametrize("over", [{"preset": "micro"}, {"preset": "tiny"}, {"preset": "small"},
                                  {"preset": "micro", "qk_norm": True, "tie_embeddings": False, "n_kv_head": 1}])
def test_parameter_counts_are_the_real_models(over):
    cfg = resolve_model_config(over, vocab_size=512)
    real = Transformer(cfg)
    m = P.model_dims(P.build_meta(cfg))
    assert m.params == real.num_params() == param_count(cfg)
    assert m.matmul == sum(mod.weight.numel() for mod in real.modules() if isinstance(mod, torch.nn.Linear))
    assert m.block_params == sum(p.numel() for p in real.blocks[0].parameters())
    assert m.trainable == m.params and m.tied == cfg.tie_embeddings


def test_the_estimate_grows_with_batch_and_sequence():
    m = dims()
    by_rows = [total(m, rows=r) for r in (1, 2, 4, 8, 16)]
    by_seq = [total(m, seq=s) for s in (128, 256, 512, 1023)]
    assert by_rows == sorted(by_rows) and len(set(by_rows)) == len(by_rows)
    assert by_seq == sorted(by_seq) and len(set(by_seq)) == len(by_seq)
    assert total(m, rows=16, forwards=2) > total(m, rows=16)  # accumulating gradients are held


def test_checkpointing_and_fsdp_need_less():
    m = dims()
    assert total(m, rows=16, checkpointing=True) < 0.5 * total(m, rows=16)
    ddp = total(m, world=8, strategy="ddp")
    fsdp = total(m, world=8, strategy="fsdp")
    assert fsdp < total(m) < ddp  # DDP adds its gradient buckets to the single-process run


def test_fsdp_divides_the_sharded_parts_by_the_world_size():
    m = dims()
    one = P.estimate(m, replace(BASE, strategy="fsdp"))["components"]
    for world in (2, 8):
        many = P.estimate(m, replace(BASE, strategy="fsdp", world=world))["components"]
        for key in ("weights", "gradients", "adamw"):
            assert many[key] == pytest.approx(one[key] / world)
        for key in ("activations", "loss", "fsdp_gathered"):  # per process, whatever the world size
            assert many[key] == one[key]
    assert one["bf16_copies"] == 0 and one["ddp_buckets"] == 0  # gathered in bf16, no extra copies


def test_a_run_that_does_not_fit_says_by_how_much_and_what_fits():
    cfg = pretrain.Config(model={"preset": "base"}, train={"batch_size": 64})
    p = P.plan("pretrain", cfg, gpu="rtx3060-12gb")
    assert not p["fits"] and p["margin"] < 0 and p["target"]["memory"] == int(11.76 * P.GIB)
    changes = {s["change"]: s for s in p["suggestions"]}
    assert changes["parallel.activation_checkpointing=true"]["fits"]
    rows = next(int(c.split("=")[1]) for c in changes if c.startswith("train.micro_batch="))
    fits = [P.plan("pretrain", pretrain.Config(model={"preset": "base"}, train={"batch_size": 64, "micro_batch": k}),
                   gpu="rtx3060-12gb")["fits"] for k in (rows, rows + 1)]
    assert fits == [True, False]  # the largest micro_batch that fits
    assert "a bigger device (--gpu a100-40gb)" in changes
    # the real command: the table on stdout, one error line on stderr, exit 2
    out = subprocess.run([sys.executable, "-m", "lmlab", "plan", "pretrain", "model.preset=base",
                          "train.batch_size=64", "--gpu", "rtx3060-12gb"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: does not fit: needs ") and "GiB over" in err[0]
    assert f"train.micro_batch={rows}" in err[0] and "parallel.activation_checkpointing=true" in err[0]
    assert "activations" in out.stdout and "AdamW moments" in out.stdout


def test_the_json_of_a_run_that_fits(capsys):
    p = P.main(["pretrain", "model.preset=micro", "--vocab-size", "512", "--memory-gib", "4", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["fits"] is True and printed["model"]["vocab"] == 512 and printed["vocab_from"] == "--vocab-size"
    assert printed["total"] == p["total"] <= 4 * P.GIB and printed["target"]["device"] == "cuda"
    assert printed["run"]["seq"] == 255  # rows of max_seq_len 256 tokens: the model sees 255


def test_the_hardware_preset_is_applied_first():
    cfg = pretrain.Config(hardware="rtx3060-12gb", model={"preset": "base"}, train={"batch_size": 64})
    p = P.plan("pretrain", cfg)
    assert p["hardware"]["applied"]["train.micro_batch"] == 8 and p["run"]["rows"] == 8
    assert p["run"]["forwards"] == 8 and p["target"]["name"] == "rtx3060-12gb" and p["fits"]


def test_vocab_and_sequence_from_the_packed_data(tmp_path):
    tok, packed = tmp_path / "tok", tmp_path / "packed"
    tok.mkdir(), packed.mkdir()
    (tok / "tokenizer_meta.json").write_text(json.dumps({"vocab_size": 777}))
    (packed / "manifest.json").write_text(json.dumps({"kind": "packed", "stats": {"seq_len": 129},
                                                       "inputs": {"tokenizer": {"path": str(tok)}}}))
    p = P.plan("pretrain", pretrain.Config(data=[str(packed)], model={"preset": "micro"}), memory_gib=1)
    assert p["model"]["vocab"] == 777 and p["run"]["seq"] == 128 and p["vocab_from"] == "the packed data's tokenizer"


def test_finetuning_plans_read_the_init_model(tmp_path):
    cfg = resolve_model_config({"preset": "micro"}, vocab_size=300)
    save_model(Transformer(cfg), tmp_path / "init")
    full = P.plan("sft", sft.Config(init=str(tmp_path / "init"), seq_len=64), memory_gib=1)
    assert full["model"]["params"] == param_count(cfg) and full["run"]["packed_mask"] and full["run"]["seq"] == 64
    lora = P.plan("sft", sft.Config(init=str(tmp_path / "init"), seq_len=64, lora={"enabled": True, "r": 4}),
                  memory_gib=1)
    assert 0 < lora["model"]["trainable"] < full["model"]["trainable"] and lora["total"] < full["total"]
    pairs = P.plan("dpo", dpo.Config(init=str(tmp_path / "init"), train={"batch_size": 3}), memory_gib=1)
    assert pairs["run"]["rows"] == 6 and pairs["run"]["loss"] == "logits"  # a pair is two sequences
    with pytest.raises(UserError, match="model.json"):
        P.plan("sft", sft.Config(init=str(tmp_path)), memory_gib=1)


def test_world_sizes_the_loop_refuses_are_refused():
    with pytest.raises(UserError, match="strategy=none"):
        P.plan("pretrain", pretrain.Config(parallel={"strategy": "none"}, model={"preset": "micro"}), world=2,
               vocab_size=300, memory_gib=1)
    with pytest.raises(UserError, match="equal parts"):
        P.plan("pretrain", pretrain.Config(train={"batch_size": 6}, model={"preset": "micro"}), world=4,
               vocab_size=300, memory_gib=1)
    # the analytic model is the transformer's: another family is traced (tests/test_plan_trace.py)
    with pytest.raises(UserError, match=r"analytic models the transformer's tensors; a 'griffin'"):
        P.plan("pretrain", pretrain.Config(model={"family": "griffin", "preset": "micro"}), world=1,
               vocab_size=300, memory_gib=1, method="analytic")


def test_the_estimate_matches_a_measured_cpu_peak():
    """Two real AdamW steps of a micro model; live tensor bytes from torch.profiler's memory events."""
    spec = importlib.util.spec_from_file_location("plan_check", ROOT / "scripts" / "plan_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    case = check.parse_case("micro,256,8,vocab=4096")
    measured, model = check._profiled_peak(lambda: check._train_steps(case, torch.device("cpu")))
    shape = P.RunShape(rows=8, seq=256, forwards=1, world=1, strategy="none", checkpointing=False, bf16=False,
                       device="cpu")
    planned = P.estimate(P.model_dims(model), shape)["peak"]
    assert planned == pytest.approx(measured, rel=0.10)  # scripts/plan_check.py: within 5% on its CPU cases
