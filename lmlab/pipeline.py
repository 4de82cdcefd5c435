"""Run a list of stages from one YAML file: `lmlab pipeline configs/pipelines/cpu.yaml`.

A pipeline file names a `root` directory and a list of stages; each stage entry gives the
verb, an optional `config_file` and inline `config` values. Every string in a stage's config
may use `{root}`, so one override moves the whole run:

    lmlab pipeline configs/pipelines/smoke.yaml root=/tmp/smoke
    lmlab pipeline configs/pipelines/cpu.yaml stages.3.config.train.steps=200 only='[pretrain]'

Stages whose inputs and config did not change are no-ops, so re-running a pipeline after an
interruption continues where it stopped (pretraining resumes from its last checkpoint).
`speedrun.sh` is a thin wrapper around this command.

`expected_minutes` holds measured wall-clock minutes of the whole pipeline per kind of
machine (`runtime.machine_kind`: cpu_bf16, cpu_fp32, cuda); the one for this machine is
printed when the pipeline starts.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmlab.config import Strict, load_config
from lmlab.errors import UserError
from lmlab.stages import STAGES

# every verb but those that are not a pipeline step (interactive, or launching/planning other runs)
NOT_STAGES = ("pipeline", "chat", "slurm", "plan", "sweep")
StageName = Literal[tuple(v for v in STAGES if v not in NOT_STAGES)]  # type: ignore[valid-type]

POSITIONAL = ("--config", "the pipeline YAML file, e.g. configs/pipelines/cpu.yaml")
PIPELINE_WAIT_S = 6 * 3600  # how long the other ranks wait for a stage rank 0 runs alone


class StageEntry(Strict):
    stage: StageName = Field(description="the verb to run")
    config_file: str | None = Field(None, description="a stage config YAML to start from")
    config: dict[str, Any] = Field(default_factory=dict, description="inline option values (may use {root})")
    needs: list[str] = Field(default_factory=list, description="paths this stage reads that a fresh clone may lack "
                             "(e.g. ../shared/data files): when one is missing the stage is skipped with a note "
                             "(list the same path on the stages that read its output)")


class ExpectedMinutes(Strict):
    cpu_bf16: float | None = Field(None, gt=0, description="on a CPU with native bf16 instructions "
                                   "(AVX512-BF16/AMX; train.dtype=auto trains under bf16 autocast)")
    cpu_fp32: float | None = Field(None, gt=0, description="on a CPU without them (float32 training)")
    cuda: float | None = Field(None, gt=0, description="on a CUDA GPU")


class Config(Strict):
    name: str = Field("pipeline", description="a label printed in logs")
    root: str = Field("runs/default", description="directory that holds every artifact of this pipeline")
    stages: list[StageEntry] = Field(default_factory=list, description="the stages, run in order")
    only: list[str] = Field(default_factory=list, description="run only these verbs (default: all)")
    expected_minutes: ExpectedMinutes = Field(default_factory=ExpectedMinutes, description="measured wall-clock "
                                              "minutes of the whole pipeline per kind of machine, printed at the "
                                              "start for the kind this one is")
    measured_on: str | None = Field(None, description="where expected_minutes were measured, e.g. '2 cores' "
                                    "(printed with them)")


def _substitute(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace("{root}", root)
    if isinstance(value, list):
        return [_substitute(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, root) for k, v in value.items()}
    return value


def training_device(stage_cfgs: list) -> str:
    """The device of the first training stage (`train.device`), which decides the kind of machine."""
    for c in stage_cfgs:
        device = getattr(getattr(c, "train", None), "device", None)
        if isinstance(device, str):
            return device
    return "auto"


def expected_line(cfg: Config, device: str = "auto") -> str | None:
    """What the pipeline is expected to take on this machine, or None when no figure is given."""
    from lmlab.runtime import machine_kind

    measured = {k: v for k, v in cfg.expected_minutes.model_dump().items() if v is not None}
    if not measured:
        return None
    kind, what = machine_kind(device)
    where = f", measured on {cfg.measured_on}" if cfg.measured_on else ""
    part = f"; only={cfg.only} runs part of it" if cfg.only else ""
    if kind not in measured:
        known = ", ".join(f"{k} {v:g} min" for k, v in measured.items())
        return f"[{cfg.name}] no expected duration for this kind of machine ({what}); measured: {known}{where}"
    return f"[{cfg.name}] expected about {measured[kind]:g} min on this machine ({what}){where}{part}"


def _join_processes(device: str) -> bool:
    """Under torchrun/srun: join the process group now, with a timeout long enough for the other
    ranks to wait out a stage that rank 0 runs alone (a corpus, a tokenizer). True if joined."""
    from lmlab import dist as lmdist
    from lmlab.runtime import pick_device

    if lmdist.read_env().world <= 1:
        return False
    lmdist.init(pick_device(device).type, timeout_s=PIPELINE_WAIT_S)
    return True


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


def run(cfg: Config) -> Path | None:
    from lmlab.stages import training_verbs

    if not cfg.stages:
        raise UserError("the pipeline has no stages; list them under `stages:` (see configs/pipelines/cpu.yaml)")
    unknown = [s for s in cfg.only if s not in STAGES]
    if unknown:
        raise UserError(f"only= names unknown verbs {unknown}; valid: {', '.join(s.stage for s in cfg.stages)}")
    root = Path(cfg.root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"root={root} is (or is below) a file, not a directory; choose another root") from None
    # Validate every stage's config before running any, so a typo in the last stage does
    # not surface after twenty minutes of training.
    plan = []
    for i, entry in enumerate(cfg.stages):
        missing = [p for p in entry.needs if not Path(_substitute(p, cfg.root)).exists()]
        if missing:
            print(f"[{cfg.name}] skipping stage {i + 1} ({entry.stage}): {', '.join(missing)} not found", flush=True)
            continue
        module = importlib.import_module(STAGES[entry.stage][0])
        try:
            stage_cfg = load_config(module.Config, entry.config_file, base=_substitute(entry.config, cfg.root))
        except UserError as e:
            raise UserError(f"pipeline stage {i} ({entry.stage}): {e}") from None
        plan.append((entry.stage, module, stage_cfg))

    device = training_device([c for _, _, c in plan])
    distributed = _join_processes(device)
    line = expected_line(cfg, device)
    if line:
        print(line, flush=True)
    timings: list[tuple[str, float]] = []
    last_report: Path | None = None
    t_all = time.perf_counter()
    for i, (name, module, stage_cfg) in enumerate(plan):
        if cfg.only and name not in cfg.only:
            continue
        print(f"\n=== [{cfg.name}] stage {i + 1}/{len(plan)}: {name} ===", flush=True)
        t0 = time.perf_counter()
        if distributed and name not in training_verbs():
            from lmlab import dist as lmdist

            # Only the training stages run on every process; rank 0 runs the others (their outputs
            # are one artifact), the rest wait for it.
            result = module.run(stage_cfg) if lmdist.is_main() else None
            lmdist.barrier()
        else:
            result = module.run(stage_cfg)
        timings.append((name, time.perf_counter() - t0))
        if name == "report" and result is not None:
            last_report = Path(result)
    total = time.perf_counter() - t_all
    print(f"\n=== [{cfg.name}] done in {_fmt_s(total)}: " + ", ".join(f"{n} {_fmt_s(t)}" for n, t in timings))
    if last_report is not None:
        print(f"report: {last_report}")
    return last_report
