"""What the JAX trainers (lmlab.train.trm_jax, sft_jax) share around their steps: the metrics
log on process 0, the eval and checkpoint cadence, Ctrl-C, and the summary TrainingRun.finish
takes. Their steps differ (TRM's ACT carry and puzzle table, SFT's masked rows); this does not.

    log = open_log(cfg, run_dir, start, main)
    with steps(ck, save, log, bar, total, start) as at:   # Ctrl-C: checkpoint, then Interrupted
        for step in ...:
            ...
            at.done = step + 1
            if due(cfg.eval.every, at.done, total): evaluate(...)
            if due(cfg.checkpoint.every, at.done, total): save(at.done)
    return summary(run_dir, main, ..., model=torch_model)
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path


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
def steps(ck, save, log, bar, total: int, start: int):
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
        raise Interrupted(f"stopped after step {at.done} of {total}; checkpoint saved in {ck.dir}. Run the same "
                          f"command to continue.") from None
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
