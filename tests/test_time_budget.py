"""train.time_budget: the length is resolved from the first steps' measured time, recorded in the
checkpoints and the manifest, equal to a fixed-steps run, kept on resume; and the pipeline's
expected duration per kind of machine.

The step time is injected by replacing `lmlab.train.loop.clock` (called at the start and the
end of every optimizer step) with a fake that advances a fixed amount per call, so every step
"takes" exactly that long and the resolved length is deterministic.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from conftest import build_micro_pipeline

from lmlab import pipeline
from lmlab.cli import main
from lmlab.config import load_config
from lmlab.errors import Interrupted, UserError
from lmlab.train import budget, dpo, loop, pretrain, sft
from lmlab.train.logging import read_metrics


class FakeClock:
    """Each call advances by step_s: the loop calls it twice per step, so each step takes step_s."""

    def __init__(self, step_s: float) -> None:
        self.t, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.t += self.step_s
        return self.t


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("budget")
    p = build_micro_pipeline(root, steps=4)
    convs = [[{"role": "user", "content": f"What is {i} plus {i}?"},
              {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}] for i in range(24)]
    (root / "sums.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    pairs = [{"prompt": f"What is {i} plus 1?", "chosen": f"{i + 1}", "rejected": "I do not know."} for i in range(16)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs))
    return p


def pretrain_cfg(micro, out, *over) -> pretrain.Config:
    base = [f"data={micro['packed']}", f"out={out}", "model.preset=micro", "model.max_seq_len=64",
            "train.steps=40", "train.batch_size=4", "train.warmup_steps=10", "train.device=cpu",
            "eval.every=10", "eval.batches=2", "checkpoint.every=5", "checkpoint.keep=3", "log.every=1"]
    return load_config(pretrain.Config, None, base + list(over))


def run_with_clock(fn, step_s: float) -> str:
    """Run fn() with every step taking step_s seconds; return what it printed on stderr."""
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr(loop, "clock", FakeClock(step_s))
        fn()
    return err.getvalue()


def stats(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["stats"]


def losses(run: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("val_loss")) for r in read_metrics(run)]


def same_weights(a: Path, b: Path) -> bool:
    return (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


BUDGET = "train.time_budget=0.21"  # 12.6 s: 25 steps at 0.5 s/step, 33 at 0.375


@pytest.fixture(scope="module")
def budgeted(micro, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("budgeted") / "run"
    err = run_with_clock(lambda: pretrain.run(pretrain_cfg(micro, out, BUDGET)), 0.5)
    return {"out": out, "err": err}


def test_the_length_is_resolved_from_the_measured_steps_and_recorded(budgeted):
    out, err = budgeted["out"], budgeted["err"]
    assert "time budget 0.21 min: measured 0.5 s/step over steps 3-10 -> 25 of 40 steps" in err
    assert "(at most: time budget 0.21 min)" in err
    s = stats(out)
    assert s["steps"] == s["resolved_steps"] == 25 and s["max_steps"] == 40
    assert s["measured_step_s"] == 0.5 and s["time_budget_min"] == 0.21 and s["probe_steps"] == [3, 10]
    assert s["tokens_trained"] == 25 * s["tokens_per_step"]
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 26))
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20, 25]  # the end eval at the resolved length
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_000015", "step_000020", "step_000025"]
    for c in ckpts:
        assert json.loads((c / "trainer.json").read_text())["budget"]["resolved_steps"] == 25


def test_a_budgeted_run_equals_a_fixed_steps_run_bit_for_bit(micro, budgeted, tmp_path):
    fixed = tmp_path / "fixed"
    pretrain.run(pretrain_cfg(micro, fixed, "train.steps=25"))
    assert same_weights(budgeted["out"], fixed)
    assert losses(budgeted["out"]) == losses(fixed)


def test_rerunning_the_same_command_is_a_no_op_on_a_slower_machine(micro, budgeted, capsys):
    before = (budgeted["out"] / "model.safetensors").stat().st_mtime_ns
    run_with_clock(lambda: pretrain.run(pretrain_cfg(micro, budgeted["out"], BUDGET)), 2.0)
    assert "up to date" in capsys.readouterr().out
    assert (budgeted["out"] / "model.safetensors").stat().st_mtime_ns == before


def interrupt_at(micro, out, step: int, step_s: float) -> None:
    real = pretrain.PackedLM.batch

    def ctrl_c(self, s, m):
        if s == step:
            raise KeyboardInterrupt
        return real(self, s, m)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain.PackedLM, "batch", ctrl_c)
        with pytest.raises(Interrupted):
            run_with_clock(lambda: pretrain.run(pretrain_cfg(micro, out, BUDGET)), step_s)
    assert not (out / "manifest.json").exists()


def test_resume_after_the_resolution_keeps_the_recorded_length(micro, budgeted, tmp_path):
    out = tmp_path / "run"
    interrupt_at(micro, out, 17, 0.5)  # steps 1-17 done; the newest checkpoint is step 15
    state = json.loads((out / "checkpoints" / "step_000015" / "trainer.json").read_text())
    assert state["budget"]["resolved_steps"] == 25 and "probe_times" not in state
    with pytest.raises(UserError, match=r"train\.time_budget: 0\.21 -> 0\.5"):  # another budget: refused
        pretrain.run(pretrain_cfg(micro, out, "train.time_budget=0.5"))
    # A 4x slower machine would resolve 6 steps; the resumed run must keep the recorded 25.
    err = run_with_clock(lambda: pretrain.run(pretrain_cfg(micro, out, BUDGET)), 2.0)
    assert "-> 25 of 40 steps (resolved before the checkpoint)" in err and "step 15 of 25" in err
    assert stats(out)["resolved_steps"] == 25 and stats(out)["measured_step_s"] == 0.5
    assert same_weights(out, budgeted["out"])
    assert losses(out) == losses(budgeted["out"])


def test_a_run_interrupted_before_the_resolution_measures_again(micro, tmp_path):
    out = tmp_path / "run"
    interrupt_at(micro, out, 7, 0.5)  # steps 1-7 done; checkpoint 5 holds the times of steps 3-5
    state = json.loads((out / "checkpoints" / "step_000005" / "trainer.json").read_text())
    assert "budget" not in state and state["probe_times"] == [[3, 0.5], [4, 0.5], [5, 0.5]]
    # Resumed at step 5 on a faster machine: steps 6-7 are not timed (warm-up), 8-10 are.
    err = run_with_clock(lambda: pretrain.run(pretrain_cfg(micro, out, BUDGET)), 0.25)
    assert "measured 0.375 s/step over 6 of steps 3-10 -> 33 of 40 steps" in err
    assert stats(out)["resolved_steps"] == 33
    fixed = tmp_path / "fixed"
    pretrain.run(pretrain_cfg(micro, fixed, "train.steps=33"))
    assert same_weights(out, fixed)
    assert losses(out) == losses(fixed)


def test_a_budget_larger_than_needed_keeps_the_maximum(micro, tmp_path):
    out = tmp_path / "run"
    err = run_with_clock(lambda: pretrain.run(pretrain_cfg(micro, out, "train.steps=12", "train.time_budget=60")),
                         0.5)
    assert "-> 12 of 12 steps" in err
    assert stats(out)["steps"] == stats(out)["resolved_steps"] == 12


@pytest.mark.parametrize("value", ["0", "-1", "abc", ".inf"])
def test_a_bad_budget_is_a_config_error(micro, tmp_path, value, capsys):
    with pytest.raises(UserError, match=r"train\.time_budget"):
        pretrain_cfg(micro, tmp_path / "run", f"train.time_budget={value}")
    assert main(["pretrain", f"data={micro['packed']}", f"out={tmp_path / 'cli'}", "train.steps=5",
                 f"train.time_budget={value}"]) == 2
    assert "train.time_budget" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_a_budget_needs_a_maximum_length(micro, tmp_path):
    cfg = pretrain_cfg(micro, tmp_path / "run", "train.steps=null", "train.time_budget=5")
    with pytest.raises(UserError, match=r"train\.time_budget=5 needs a maximum length"):
        pretrain.run(cfg)


def test_where_the_length_is_resolved():
    assert budget.budget_resolve_at(50, 750) == 20  # the probe ends inside a long warmup
    assert budget.budget_resolve_at(10, 750) == 10  # at the end of a shorter one
    assert budget.budget_resolve_at(5, 750) == 5
    assert budget.budget_resolve_at(4, 750) == 20  # too short to time 3 steps in: 20 steps, past it
    assert budget.budget_resolve_at(0, 8) == 8  # never past the maximum
    # the resolved length: what fits, at least the steps already taken, at most the maximum
    assert budget.resolve_budget(1, {3: 0.5, 4: 1.5}, 750, 20)["resolved_steps"] == 60
    assert budget.resolve_budget(1, {3: 100.0}, 750, 20)["resolved_steps"] == 20
    assert budget.resolve_budget(1000, {3: 1.0}, 750, 20)["resolved_steps"] == 750


def test_sft_and_dpo_resolve_their_length_too(micro, tmp_path):
    common = ["train.device=cpu", "train.batch_size=4", "train.warmup_steps=5", "eval.batches=0", "log.every=1",
              "checkpoint.every=0"]
    sft_out = tmp_path / "sft"
    # 0.055 min = 3.3 s: 6 steps at 0.5 s/step, of at most 12 (2 epochs of 24 conversations, 4 per step)
    cfg = load_config(sft.Config, None, [f"init={micro['model']}", f"data={micro['root'] / 'sums.jsonl'}",
                                         f"out={sft_out}", "train.epochs=2", "val_fraction=0", "packing=false",
                                         "train.time_budget=0.055", *common])
    err = run_with_clock(lambda: sft.run(cfg), 0.5)
    s = stats(sft_out)
    assert "measured 0.5 s/step over steps 3-5 -> 6 of 12 steps" in err
    assert s["steps"] == s["resolved_steps"] == 6 and s["max_steps"] == 12 and s["epochs"] == 1.0
    dpo_out = tmp_path / "dpo"
    cfg = load_config(dpo.Config, None, [f"init={sft_out}", f"data={micro['root'] / 'pairs.jsonl'}",
                                         f"out={dpo_out}", "train.steps=10", "val_fraction=0",
                                         "train.time_budget=0.055", *common])
    err = run_with_clock(lambda: dpo.run(cfg), 0.5)
    s = stats(dpo_out)
    assert "-> 6 of 10 steps" in err
    assert s["steps"] == s["resolved_steps"] == 6 and s["pairs_trained"] == 24


# ----------------------------------------------------------------------------- the pipeline's expected duration

def pipeline_cfg(*over) -> pipeline.Config:
    return load_config(pipeline.Config, None, ["name=cpu", "expected_minutes={cpu_bf16: 22, cpu_fp32: 25}",
                                               "measured_on=2 cores", *over])


@pytest.mark.parametrize("native_bf16, kind", [(False, "cpu_fp32"), (True, "cpu_bf16")])
def test_the_kind_of_cpu_picks_the_expected_minutes(monkeypatch, native_bf16, kind):
    from lmlab import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
    assert runtime.machine_kind("cpu")[0] == kind
    line = pipeline.expected_line(pipeline_cfg(), "cpu")
    if native_bf16:
        assert line == ("[cpu] expected about 22 min on this machine (CPU with native bf16 instructions: bf16 "
                        "autocast), measured on 2 cores")
    else:
        assert line == ("[cpu] expected about 25 min on this machine (CPU without native bf16 instructions: float32 "
                        "training), measured on 2 cores")


def test_a_gpu_picks_cuda_and_an_unmeasured_kind_says_so(monkeypatch):
    from lmlab import runtime

    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime.torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert runtime.machine_kind("auto") == ("cuda", "CUDA GPU NVIDIA H200")
    assert pipeline.expected_line(pipeline_cfg("expected_minutes.cuda=12")).startswith(
        "[cpu] expected about 12 min on this machine (CUDA GPU NVIDIA H200)")
    assert pipeline.expected_line(pipeline_cfg()) == (
        "[cpu] no expected duration for this kind of machine (CUDA GPU NVIDIA H200); measured: cpu_bf16 22 min, "
        "cpu_fp32 25 min, measured on 2 cores")


def test_no_figures_print_nothing_and_bad_ones_are_config_errors():
    assert pipeline.expected_line(load_config(pipeline.Config, None, [])) is None
    with pytest.raises(UserError, match="expected_minutes.laptop"):
        pipeline_cfg("expected_minutes.laptop=3")
    with pytest.raises(UserError, match="expected_minutes.cpu_fp32"):
        pipeline_cfg("expected_minutes.cpu_fp32=-1")


def test_the_pipeline_prints_the_line_when_it_starts(monkeypatch, tmp_path, capsys):
    from lmlab import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    cfg = pipeline_cfg(f"root={tmp_path}", "only=[export]",
                       "stages=[{stage: pretrain, config: {data: '{root}/packed', out: '{root}/model', "
                       "train: {steps: 10, device: cpu}}}]")
    pipeline.run(cfg)  # only=[export]: nothing runs, the line is still printed
    out = capsys.readouterr().out
    assert ("[cpu] expected about 25 min on this machine (CPU without native bf16 instructions: float32 training), "
            "measured on 2 cores; only=['export'] runs part of it") in out


def test_the_cpu_pipeline_has_a_budget_and_expected_minutes():
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(pipeline.Config, root / "configs" / "pipelines" / "cpu.yaml")
    assert cfg.expected_minutes.cpu_bf16 and cfg.expected_minutes.cpu_fp32
    (train,) = [e.config["train"] for e in cfg.stages if e.stage == "pretrain"]
    assert train["steps"] == 750 and train["time_budget"] > 0
    assert budget.budget_resolve_at(train["warmup_steps"], train["steps"]) <= train["warmup_steps"]


def test_report_says_what_fit_the_budget(budgeted):
    from lmlab.report.report import model_section

    out = budgeted["out"]
    m = json.loads((out / "manifest.json").read_text())
    rows = read_metrics(out)
    text = "\n".join(model_section(out, m, [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]))
    assert "25 of at most 40 steps: what fit a time budget of 0.21 min at 0.5 s/step" in text
