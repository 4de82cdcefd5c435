"""Hardware presets (configs/hardware) and lmlab.train.hardware: loading, detection, precedence, the record."""

from __future__ import annotations

import pytest

from lmlab.config import load_config
from lmlab.errors import UserError
from lmlab.train import dpo, pretrain, sft
from lmlab.train.hardware import (apply_hardware, describe_record, detect_preset, list_presets, load_preset,
                                  match_preset, preset_overrides)

PRESETS = ["a100-40gb", "a100-80gb", "cpu", "h100-80gb", "rtx3060-12gb", "rtx4090-24gb"]
STAGES = [pretrain, sft, dpo]
KEYS = {"train.micro_batch", "train.dtype", "train.compile", "parallel.strategy", "parallel.activation_checkpointing"}


def test_the_presets_are_there_and_describe_their_device():
    assert list_presets() == PRESETS
    for name in PRESETS:
        p = load_preset(name)
        assert set(p) == {"match", "train", "parallel"}, name
        assert set(preset_overrides(p)) == KEYS, name
        m = p["match"]
        if name == "cpu":
            assert m == {"device": "cpu"}
        else:
            lo, hi = m["memory_gib"]
            assert m["device"] == "cuda" and m["names"] and lo <= m["total_gib"] <= hi, name


@pytest.mark.parametrize("stage", STAGES, ids=lambda m: m.__name__.rsplit(".", 1)[1])
@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_applies_to_each_stage_config(stage, name):
    # applying validates every value against the real Config (a key or value it does not know fails)
    cfg, record = apply_hardware(stage.Config(hardware=name))
    overrides = preset_overrides(load_preset(name))
    assert record == {"preset": name, "detected": False, "applied": overrides, "kept": {}}
    assert cfg.train.micro_batch == overrides["train.micro_batch"]
    assert cfg.train.dtype == overrides["train.dtype"] and cfg.train.compile == overrides["train.compile"]
    assert cfg.parallel.strategy == overrides["parallel.strategy"]
    assert cfg.parallel.activation_checkpointing == overrides["parallel.activation_checkpointing"]
    assert cfg.hardware == name  # the config still says what the user asked for


def test_values_the_user_set_win_over_the_preset(tmp_path):
    cfg = pretrain.Config(hardware="rtx3060-12gb", train={"micro_batch": 3, "steps": 5},
                          parallel={"activation_checkpointing": True})
    new, record = apply_hardware(cfg)
    assert new.train.micro_batch == 3 and new.parallel.activation_checkpointing is True
    assert new.train.compile is True and new.train.steps == 5  # preset value; the user's other keys stay
    assert record["kept"] == {"train.micro_batch": 3, "parallel.activation_checkpointing": True}
    assert set(record["applied"]) == KEYS - set(record["kept"])
    assert cfg.train.micro_batch == 3 and cfg.train.compile is False  # the input config is not changed
    # a value given in the YAML file counts as set even when it equals the default
    f = tmp_path / "run.yaml"
    f.write_text("hardware: a100-80gb\ntrain: {compile: false, steps: 2}\n")
    new, record = apply_hardware(load_config(sft.Config, f))
    assert new.train.compile is False and record["kept"] == {"train.compile": False}
    assert new.train.micro_batch == 64


def test_applying_twice_changes_nothing_more():
    once, _ = apply_hardware(dpo.Config(hardware="rtx4090-24gb"))
    twice, record = apply_hardware(once)
    assert twice.model_dump() == once.model_dump() and not record["applied"]
    assert set(record["kept"]) == KEYS


def test_no_preset_is_no_change():
    cfg = pretrain.Config()
    assert apply_hardware(cfg) == (cfg, None)
    assert describe_record(None) == "hardware: no preset"


def test_auto_picks_the_cpu_preset_without_cuda():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert detect_preset() == "cpu" and detect_preset("cpu") == "cpu"
    cfg, record = apply_hardware(pretrain.Config(hardware="auto"))
    assert record["preset"] == "cpu" and record["detected"] is True
    assert cfg.parallel.strategy == "auto" and cfg.train.micro_batch == 16
    assert describe_record(record).startswith("hardware cpu (detected): set train.micro_batch=16")


@pytest.mark.parametrize("name, gib, expected", [
    ("NVIDIA A100-SXM4-80GB", 79.2, "a100-80gb"),
    ("NVIDIA A100-PCIE-40GB", 39.4, "a100-40gb"),
    ("NVIDIA H100 80GB HBM3", 79.1, "h100-80gb"),
    ("NVIDIA H200", 139.8, "h100-80gb"),                    # named, more memory than any preset: its family's
    ("NVIDIA GeForce RTX 4090", 23.6, "rtx4090-24gb"),
    ("NVIDIA GeForce RTX 3060", 11.76, "rtx3060-12gb"),
    ("NVIDIA GeForce RTX 3060", 7.8, "rtx3060-12gb"),        # the 8 GB card: smaller than every preset
    ("NVIDIA L40S", 44.4, "a100-40gb"),                      # unknown: the largest preset it has room for
    ("Tesla T4", 14.6, "rtx3060-12gb"),
])
def test_detection_by_name_and_memory(name, gib, expected):
    assert match_preset("cuda", name, gib) == expected


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(UserError) as e:
        apply_hardware(pretrain.Config(hardware="tpu-v5"))
    msg = str(e.value)
    assert "unknown hardware preset 'tpu-v5'" in msg and all(name in msg for name in PRESETS) and "auto" in msg
    with pytest.raises(UserError, match="not found"):
        load_preset("no/such/preset.yaml")


def test_a_preset_file_of_ones_own(tmp_path):
    f = tmp_path / "cluster.yaml"
    f.write_text("match: {device: cuda, names: [X1], memory_gib: [1, 2], total_gib: 1.5}\n"
                 "train: {micro_batch: 2}\nparallel: {strategy: fsdp}\n")
    cfg, record = apply_hardware(sft.Config(hardware=str(f)))
    assert cfg.train.micro_batch == 2 and cfg.parallel.strategy == "fsdp"
    assert record["applied"] == {"train.micro_batch": 2, "parallel.strategy": "fsdp"}
    f.write_text("train: {micro_batchh: 2}\n")
    with pytest.raises(UserError, match="train.micro_batchh"):
        apply_hardware(sft.Config(hardware=str(f)))
    f.write_text("train: {micro_batch: many}\n")
    with pytest.raises(UserError, match="micro_batch"):
        apply_hardware(sft.Config(hardware=str(f)))


def test_a_preset_fills_only_what_the_command_line_leaves_unset():
    """`lmlab pretrain hardware=X key=value`: the overrides are the user's, the rest the preset's."""
    from lmlab.config import load_config
    from lmlab.train import pretrain
    from lmlab.train.hardware import apply_hardware

    cfg = load_config(pretrain.Config, None, ["hardware=rtx3060-12gb", "train.compile=false"])
    cfg, record = apply_hardware(cfg)
    assert record["kept"] == {"train.compile": False}
    assert cfg.train.compile is False and cfg.train.micro_batch == 8


def test_a_run_with_hardware_auto_records_the_preset_in_its_manifest_and_report(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import make_packed

    from lmlab.report import report

    packed = make_packed(tmp_path / "data")
    out = pretrain.run(load_config(pretrain.Config, None, [
        f"data={packed}", f"out={tmp_path / 'run'}", "model.preset=micro", "train.steps=4", "train.batch_size=4",
        "train.device=cpu", "eval.batches=1", "hardware=auto"]))
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats["hardware_preset"]["preset"] == "cpu" and stats["hardware_preset"]["detected"] is True
    assert stats["hardware_preset"]["applied"]["train.micro_batch"] == 16
    md = Path(report.run(report.Config(inputs=[str(out)], out=str(tmp_path / "report")))).read_text()
    assert "| hardware preset | cpu (auto-detected) |" in md
