"""What the JAX trainers (lmlab.train.trm_jax, sft_jax) share around their steps: the metrics
log on process 0, the eval and checkpoint cadence, Ctrl-C, and the summary TrainingRun.finish
takes. Their steps differ (TRM's ACT carry and puzzle table, SFT's masked rows); this does not.

    length = Length(cfg.train, max_steps)                 # the schedule, and train.time_budget
    state, start, ..., meta = ck.resume(...); length.resumed(meta, start, ck.dir)
    log = open_log(cfg, run_dir, start, main)
    with steps(ck, save, log, bar, length, start) as at:  # Ctrl-C: checkpoint, then Interrupted
        step = start
        while step < length.total:                        # a time budget may shorten it once
            t0 = clock(); lr = length.schedule(step) ...
            step = at.done = step + 1
            step_s = probe(length, at.done, t0, bar, state)   # (None unless a time budget is measured)
            if due(cfg.eval.every, at.done, length.total): evaluate(...)
            if due(cfg.checkpoint.every, at.done, length.total): save(at.done)   # meta: length.meta()
    return summary(run_dir, main, ..., model=torch_model)
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lmlab.train.budget import Length

clock = time.perf_counter  # times the optimizer steps (tests replace it to inject a step time)


def probe(length: Length, done: int, t0: float, bar, outputs) -> float | None:
    """While a time budget is being measured: wait for the step's `outputs` (the devices' work,
    not its dispatch), time the step from `t0` (a `clock()`) and maybe fix the length
    (Length.after_step); -> its seconds, or None when not measuring."""
    if not length.budget.probing:
        return None
    import jax

    jax.block_until_ready(outputs)
    step_s = clock() - t0
    length.after_step(done, step_s, bar)
    return step_s


def check_finite(loss: float, done: int, total: int, lr: float) -> None:
    """Diverged (the run stops, its last checkpoint kept) when a logged loss is not finite."""
    import math

    from lmlab.errors import Diverged

    if not math.isfinite(loss):
        raise Diverged(f"training diverged: the loss was {loss:g} at step {done} of {total}; lower train.lr (now "
                       f"{lr:g}) or set train.grad_clip, and run again")


def open_log(cfg, run_dir: Path, start: int, main: bool):
    """metrics.jsonl (and tensorboard / wandb) on process 0; a sink elsewhere."""
    from lmlab.train.logging import MetricsLogger
    from lmlab.train.loop import _NoLog

    if not main:
        return _NoLog()
    return MetricsLogger(run_dir, resume_step=start, tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                         wandb_mode=cfg.log.wandb_mode, wandb_project=cfg.log.wandb_project,
                         config=cfg.model_dump(mode="json"))


def due(every: int, done: int, total: int) -> bool:
    """Every `every` steps (0: never) and at the last."""
    return bool(every and done % every == 0) or done == total


@dataclass
class Progress:
    done: int


@contextlib.contextmanager
def steps(ck, save, log, bar, length: Length, start: int):
    """Around the step loop: on Ctrl-C a checkpoint of the last finished step, then
    Interrupted (exit 130: the same command continues); the bar and log closed either way; the
    checkpoint writer drained at the end."""
    from lmlab.errors import Interrupted

    at = Progress(start)
    try:
        yield at
    except KeyboardInterrupt:
        save(at.done)
        ck.close()
        raise Interrupted(f"stopped after step {at.done} of {length.total}; checkpoint saved in {ck.dir}. Run the "
                          f"same command to continue.") from None
    finally:
        bar.close()
        log.close()
    ck.close()


def summary(run_dir: Path, main: bool, verb: str, total: int, tokens: int, train_time: float, precision: str,
            mesh, params, hosts: int, compile_s, eval_key: str, **extra) -> dict:
    """What TrainingRun.finish takes (the final train and eval lines from metrics.jsonl), and
    the line saying where it ran and what the first step's compile took."""
    import jax

    from lmlab.jax_backend.mesh import describe, stats
    from lmlab.train.logging import read_metrics

    lines = read_metrics(run_dir) if main else []
    train_lines = [r for r in lines if "loss" in r]
    eval_lines = [r for r in lines if eval_key in r and r.get("step") == total]
    if compile_s is not None:
        print(f"{verb} (jax): {mesh.devices.size} device(s) ({jax.devices()[0].platform}) on {hosts} host(s), "
              f"{describe(mesh, params)}; first step (compiling) {compile_s:.1f} s", file=sys.stderr)
    return {
        "steps": total, "tokens": tokens, "train_time_s": round(train_time, 2),
        "tokens_per_s": round(tokens / train_time, 1) if train_time > 0 else None, "precision": precision,
        "final_loss": train_lines[-1]["loss"] if train_lines else None,
        "final_train": {k: v for k, v in train_lines[-1].items() if k != "step"} if train_lines else {},
        "final_eval": {k: v for k, v in eval_lines[-1].items() if k != "step"} if eval_lines else {},
        "parallel": stats(mesh, hosts), "first_step_s": round(compile_s or 0.0, 2), **extra,
    }
