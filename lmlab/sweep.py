"""Hyperparameter search with Optuna: every trial is an ordinary run directory of a stage.

    lmlab sweep pretrain --config configs/stages/pretrain_tiny.yaml data=runs/packed \\
        --space configs/sweeps/pretrain_lr.yaml --trials 20 --out runs/sweeps/lr
    lmlab sweep sft init=runs/model data=runs/tasks/sft_train.jsonl --space sft.yaml --trials 8 \\
        --metric val_loss --pruner none --sampler random --seed 0

The search space (lmlab/sweep_space.py) maps dotted keys of the stage's Config to ranges; it
is checked against that Config before anything runs. Trial k runs the stage in this process
with its values as overrides into OUT/trial_000k, so eval, report and export read it like
any run. Its objective is the last `--metric` in the run's metrics.jsonl (or manifest stats);
after every evaluation the value is reported to Optuna (lmlab.train.loop.EVAL_HOOKS) and the
pruner may stop the trial there (PRUNED; its run directory stays as it is).

Several workers -- a SLURM array running this same command -- share one study through the
storage (default OUT/optuna.journal; or --storage PATH / sqlite:///... / postgresql://...)
until `--trials` trials are finished (complete + pruned). A worker that dies leaves its trial
RUNNING; the next worker to look (or the same command run again) fails it and queues its
parameters again, and the trial that takes them resumes its run directory from the last
checkpoint. A trial the stage rejects (a UserError) is FAIL with its message and the sweep
goes on (it stops after MAX_FAILS_IN_A_ROW failures in a row). Ctrl-C stops cleanly; run
the same command to continue. OUT/sweep.json is rewritten after every trial, OUT/summary.md
(table, plots) at most once a minute and when a worker stops; see docs/sweep.md.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import sys
import time
import traceback
import typing
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field

from lmlab import artifacts
from lmlab.config import Strict, build_config, load_config
from lmlab.errors import Interrupted, UserError
from lmlab.sweep_space import as_override, load_space

MAX_FAILS_IN_A_ROW = 5
SUMMARY_EVERY_S = 60.0  # summary.md and its plots while trials run (sweep.json: after every trial)


class Config(Strict):
    stage: str = Field(..., description="the verb whose runs are the trials: pretrain, sft, dpo, ...")
    config: str | None = Field(None, description="the stage's YAML config (its --config)")
    overrides: list[str] = Field(default_factory=list, description="the stage's key=value overrides, for every trial")
    space: str | dict = Field(..., description="search space: a YAML file (or mapping) of dotted key -> range")
    trials: int = Field(..., ge=1, description="finish this many trials in the study (complete + pruned)")
    out: str = Field("", description="sweep directory: trial_NNNN run dirs, sweep.json, summary.md; "
                     "default runs/sweeps/STUDY (or runs/sweeps/STAGE)")
    storage: str | None = Field(None, description="journal file path or RDB URL; default OUT/optuna.journal")
    study: str = Field("", description="study name in the storage; default: OUT's directory name")
    direction: Literal["minimize", "maximize"] = Field("minimize", description="minimize or maximize the metric")
    metric: str = Field("val_loss", description="the objective: a key of the stage's eval lines in metrics.jsonl")
    pruner: Literal["median", "none"] = Field("median", description="median: Optuna's MedianPruner (defaults: "
                                              "from the 6th trial on, stop a trial whose value is worse than the "
                                              "median of earlier trials at the same step); none: never prune")
    sampler: Literal["tpe", "random"] = Field("tpe", description="tpe (Optuna's TPE: random for the first 10 "
                                              "trials) or random")
    seed: int | None = Field(None, description="sampler seed (trial k uses seed + k, so workers differ); "
                             "default: random")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmlab sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", metavar="VERB", help="the stage whose runs are the trials (pretrain, sft, dpo, ...)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="the stage's overrides, for every trial")
    p.add_argument("--config", metavar="FILE.yaml", help="the stage's YAML config")
    p.add_argument("--space", required=True, metavar="SPACE.yaml", help="search space (see docs/sweep.md)")
    p.add_argument("--trials", required=True, type=int, metavar="N",
                   help="finished trials (complete + pruned) to reach")
    for flag, field in Config.model_fields.items():
        if flag not in ("stage", "config", "overrides", "space", "trials"):
            choices = typing.get_args(field.annotation) if flag in ("direction", "pruner", "sampler") else None
            p.add_argument(f"--{flag}", type=int if flag == "seed" else str, choices=choices,
                           help=f"{field.description} (default: {field.default!r})")
    return p


def main(argv: list[str]) -> Path:
    """`lmlab sweep ...` (the CLI hands a verb with a `main` its whole argv)."""
    args = vars(build_parser().parse_intermixed_args(argv))
    bad = [a for a in args["overrides"] if "=" not in a]
    if bad:
        raise UserError(f"lmlab sweep takes the stage's options as key=value overrides (and --config); "
                        f"got {bad[0]!r}, write it as key=value")
    return run(build_config(Config, {k: v for k, v in args.items() if v is not None}, "lmlab sweep's options"))


def stage_module(verb: str):
    from lmlab.stages import STAGES

    if verb not in STAGES:
        raise UserError(f"unknown verb {verb!r} for lmlab sweep; valid: {', '.join(STAGES)}")
    module = importlib.import_module(STAGES[verb][0])
    cfg_cls = getattr(module, "Config", None)
    if hasattr(module, "main") or cfg_cls is None or "out" not in cfg_cls.model_fields:
        raise UserError(f"`lmlab {verb}` has no run directory (`out`) for each trial to write; sweep a stage "
                        f"like pretrain, sft or dpo")
    return module


def check_sweep_out(out: Path, study: str) -> None:
    """OUT must be free or this study's sweep directory; nothing in it is replaced but trial run dirs."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory for the sweep")
    m = artifacts.read_manifest(out)
    if m is not None:
        raise UserError(f"--out {out} is a {m.get('kind')} artifact, not a sweep directory; choose another --out")
    from lmlab.report.sweep import load

    prev = load(out) or {}
    if prev.get("study") not in (None, study):
        raise UserError(f"--out {out} holds the trials of study '{prev['study']}'; use --study {prev['study']} "
                        f"to continue it, or another --out for study '{study}'")


def make_sampler(kind: str, seed: int | None, k: int):
    import optuna

    s = None if seed is None else seed + k  # per trial: workers with one --seed still sample apart
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=s)
    with warnings.catch_warnings():  # constant_liar is "experimental" in Optuna; it is what parallel TPE needs
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=s, constant_liar=True)


def objective_value(run_dir: Path, metric: str) -> float:
    """The run's last `metric` in metrics.jsonl, else its manifest's stats (`metric` or `final_metric`)."""
    from lmlab.train.logging import read_metrics

    lines = [r for r in read_metrics(run_dir) if metric in r]
    if lines:
        v = lines[-1][metric]
    else:
        stats = (artifacts.read_manifest(run_dir) or {}).get("stats") or {}
        if metric not in stats and f"final_{metric}" not in stats:
            raise UserError(f"the run {run_dir} recorded no '{metric}' (in metrics.jsonl or its manifest's stats); "
                            f"set --metric to one it records, e.g. val_loss, and check eval.batches > 0")
        v = stats.get(metric, stats.get(f"final_{metric}"))
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{metric} of {run_dir} is {v!r}, not a finite number: the run diverged")
    return float(v)


def prune_hook(trial, metric: str):
    """An EVAL_HOOKS callable: report the eval's metric to Optuna and stop the trial if pruned."""
    import optuna

    def hook(step: int, metrics: dict) -> None:
        v = metrics.get(metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            trial.report(float(v), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} ({metric} {v:.4f})")
    return hook


def free_memory() -> None:
    """Between trials, in this one process: collect the last trial's objects and return cached CUDA
    memory, so a trial that ran out of memory leaves the next one as much as the first had."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_trial(study, trial, cfg: Config, module, run_dir: Path, beat) -> tuple[str, float | None, str]:
    """Run the stage for `trial` into `run_dir`, stop its heartbeat `beat`, tell Optuna.
    -> (state, value, message)."""
    import optuna
    from optuna.trial import TrialState

    from lmlab.train.loop import EVAL_HOOKS

    overrides = [*cfg.overrides, *(as_override(k, v) for k, v in trial.params.items()),
                 as_override("out", str(run_dir))]
    hook = prune_hook(trial, cfg.metric)
    EVAL_HOOKS.append(hook)
    state, value, message = TrialState.COMPLETE, None, ""
    try:
        try:
            module.run(load_config(module.Config, cfg.config, overrides))
            value = objective_value(run_dir, cfg.metric)
        finally:
            EVAL_HOOKS.remove(hook)
            beat.close()  # before the trial is finished: a heartbeat must not land on a finished trial
    except optuna.TrialPruned as e:
        state, message = TrialState.PRUNED, str(e)
        trial.set_user_attr("prune_reason", message)
    except (KeyboardInterrupt, Interrupted):
        from lmlab.sweep_study import requeue

        trial.set_user_attr("fail_reason", "interrupted")
        requeue(study, next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number), "interrupted")
        raise
    except Exception as e:  # the stage refused the values (UserError), diverged, ran out of memory, ...
        if not isinstance(e, UserError):
            traceback.print_exc()
        state, message = TrialState.FAIL, str(e).splitlines()[0] if str(e) else type(e).__name__
        trial.set_user_attr("fail_reason", message[:500])
    free_memory()
    told = study.tell(trial, value if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True)
    if told.state != state:  # judged dead (no heartbeat for STALE_S) and reclaimed by another worker
        print(f"sweep: trial {trial.number} was taken over by another worker meanwhile; this result is dropped",
              file=sys.stderr)
    return state.name, told.value if state != TrialState.FAIL else None, message


def run(cfg: Config, pruner=None) -> Path:
    """Work on the study until it has `cfg.trials` finished trials (or the rest run elsewhere).
    `pruner` (an Optuna BasePruner) replaces --pruner, for callers with their own rule."""
    import optuna

    from lmlab import sweep_study as ss

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this module prints its own line per trial
    module = stage_module(cfg.stage)
    params = load_space(cfg.space, module.Config, cfg.config, cfg.overrides)  # before anything is written
    out = Path(cfg.out or f"runs/sweeps/{cfg.study or cfg.stage}")
    name = cfg.study or out.resolve().name
    check_sweep_out(out, name)
    out.mkdir(parents=True, exist_ok=True)
    storage = ss.open_storage(cfg.storage, out)
    where = ss.hide_password(cfg.storage) if cfg.storage else str(out / "optuna.journal")
    # What must not change while the study goes on (--trials, the sampler and the pruner may).
    definition = json.loads(json.dumps({
        "stage": cfg.stage, "config": cfg.config, "config_sha256": artifacts.sha256_file(cfg.config) if cfg.config
        else None, "overrides": cfg.overrides, "space": {p.key: p.as_dict() for p in params}, "metric": cfg.metric,
        "direction": cfg.direction}))
    header = {"study": name, "storage": where, "verb": cfg.stage, "trials_target": cfg.trials,
              **{k: definition[k] for k in ("config", "overrides", "space", "metric", "direction")}}
    with ss.sweep_lock(out):
        study = ss.open_study(storage, name, cfg.direction, definition, where)
    if pruner is None:
        pruner = optuna.pruners.MedianPruner() if cfg.pruner == "median" else optuna.pruners.NopPruner()
    study.pruner = pruner
    print(f"sweep '{name}' ({where}): lmlab {cfg.stage}, {cfg.direction} {cfg.metric} over "
          f"{', '.join(p.key for p in params)}; {cfg.trials} trials, sampler {cfg.sampler}, "
          f"pruner {type(pruner).__name__}", file=sys.stderr)
    try:
        rec, did = work(study, cfg, module, params, out, header)
    except (KeyboardInterrupt, UserError):  # Ctrl-C (the trial is FAIL, its parameters queued again), too many fails
        with ss.sweep_lock(out):
            ss.write_outputs(study, header, out)
        raise
    if not did:
        left = "nothing to do" if rec["finished"] >= cfg.trials else "the remaining trials are running elsewhere"
        print(f"sweep '{name}': {rec['finished']} of {cfg.trials} trials finished; {left}", file=sys.stderr)
    from lmlab.report.sweep import console_summary

    print(console_summary(rec, out))
    return out


def work(study, cfg: Config, module, params, out: Path, header: dict) -> tuple[dict, int]:
    """Take trials one at a time until none is missing. -> (the last record, trials run here)."""
    from lmlab import sweep_study as ss

    fails, did, summary_at = 0, 0, time.monotonic()
    while True:
        with ss.sweep_lock(out):
            ss.reclaim_stale(study)
            trials = study.get_trials(deepcopy=False)
            n = ss.counts(trials)
            finished = n["COMPLETE"] + n["PRUNED"]
            if finished + n["RUNNING"] >= cfg.trials:  # done, or the rest is being run by live workers
                return ss.write_outputs(study, header, out), did
            study.sampler = make_sampler(cfg.sampler, cfg.seed, len(trials))
            trial = study.ask({p.key: p.distribution() for p in params})  # a queued trial first, if any
            run_name = trial.user_attrs.get("run_dir") or f"trial_{trial.number:04d}"
            trial.set_user_attr("run_dir", run_name)
            beat = ss.Heartbeat(trial)  # stamped before the lock is released, so it never looks dead
        values = " ".join(as_override(k, v) for k, v in trial.params.items())
        resumes = f" (continues trial {trial.user_attrs['resumes']})" if "resumes" in trial.user_attrs else ""
        print(f"\nsweep: trial {trial.number} [{finished + 1}/{cfg.trials}] {values} -> {out / run_name}{resumes}",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            state, value, message = run_trial(study, trial, cfg, module, out / run_name, beat)
        finally:
            beat.close()
        did += 1
        shown = f" {cfg.metric} {value:.4f}" if value is not None else ""
        print(f"sweep: trial {trial.number} {state.lower()}{shown} in {time.perf_counter() - t0:.1f}s"
              + (f": {message}" if message and state != "COMPLETE" else ""), file=sys.stderr, flush=True)
        # Plots cost about a second: with short trials, redraw them at most once a SUMMARY_EVERY_S.
        summary = time.monotonic() - summary_at >= SUMMARY_EVERY_S
        summary_at = time.monotonic() if summary else summary_at
        with ss.sweep_lock(out):
            ss.write_outputs(study, header, out, summary=summary)
        fails = fails + 1 if state == "FAIL" else 0
        if fails >= MAX_FAILS_IN_A_ROW:
            raise UserError(f"{fails} trials in a row failed (the last: {message}); fix the config or the search "
                            f"space, then run the same command again")
