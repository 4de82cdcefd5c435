"""The time budget (`train.time_budget`): when a run fixes its length, and to what.

The first PROBE_SKIP steps after each (re)start are not timed (allocation, caches,
torch.compile); the steps after them up to the resolution point are (the loop times them
with `loop.clock`), and their mean gives the length: the steps that fit the budget, at most
the maximum the other settings give. See docs/training.md, "Time budget". `Budget` keeps that
state through a run (the timed steps, the record, what a checkpoint holds); `Length` is the
run's length and LR schedule around it, which the torch loop and the JAX trainers share.
"""

from __future__ import annotations

import math
import sys

PROBE_SKIP = 2
PROBE_STEPS = 20
PROBE_MIN_TIMED = 3


def budget_resolve_at(warmup_steps: int, max_steps: int) -> int:
    """After how many steps a time-budgeted run fixes its length.

    At the end of the warmup when that comes before PROBE_STEPS and leaves PROBE_MIN_TIMED
    timed steps, else at PROBE_STEPS; never past the maximum length. Until then the LR follows
    the schedule of the maximum length. Warmup LRs do not depend on the length, so a probe
    inside the warmup makes the run identical to a `train.steps=N` run (N = the resolved
    length, N >= the warmup); a probe past a short warmup is still deterministic given N.
    """
    end = PROBE_STEPS
    if PROBE_SKIP + PROBE_MIN_TIMED <= warmup_steps < end:
        end = warmup_steps
    return max(1, min(end, max_steps))


def resolve_budget(budget_min: float, step_times: dict[int, float], max_steps: int, resolve_at: int) -> dict:
    """The run length that fits `budget_min` minutes at the mean of `step_times` ({step: seconds}).

    At least `resolve_at` (the steps already taken), at most `max_steps`. The returned record
    goes into every later checkpoint (trainer.json) and the manifest stats.
    """
    step_s = sum(step_times.values()) / len(step_times)
    fits = math.floor(budget_min * 60 / step_s) if step_s > 0 else max_steps
    return {"time_budget_min": budget_min, "max_steps": max_steps,
            "resolved_steps": max(resolve_at, min(max_steps, fits)),
            "measured_step_s": round(step_s, 4), "probe_steps": [min(step_times), max(step_times)],
            "timed_steps": len(step_times)}


def budget_line(budget: dict) -> str:
    """The one line that says what the budget resolved to."""
    lo, hi = budget["probe_steps"]
    span = f"steps {lo}-{hi}" if budget["timed_steps"] == hi - lo + 1 else f"{budget['timed_steps']} of steps {lo}-{hi}"
    return (f"time budget {budget['time_budget_min']:g} min: measured {budget['measured_step_s']:.3g} s/step over "
            f"{span} -> {budget['resolved_steps']} of {budget['max_steps']} steps")


class Budget:
    """train.time_budget through a run: which steps are timed, when and to what the length
    resolves, and what a checkpoint keeps (Length drives it).

        budget = Budget(t.time_budget, max_steps, warmup)
        total = budget.restore(saved, start, run_dir)   # saved: budget.state() of the checkpoint, or {}
        ...after each step: if budget.probing and budget.observe(done, step_s): total = budget.steps
    """

    def __init__(self, minutes: float | None, max_steps: int, warmup: int) -> None:
        self.minutes, self.max_steps = minutes, max_steps
        self.resolve_at = budget_resolve_at(warmup, max_steps) if minutes else None
        self.record: dict | None = None  # resolve_budget's, once the length is fixed
        self.probe: dict[int, float] = {}  # {step: seconds} of the timed steps before the resolution
        self.seen: dict[int, float] = {}  # every step this process ran before the resolution
        self.start = 0

    @property
    def probing(self) -> bool:
        return bool(self.minutes) and self.record is None

    @property
    def steps(self) -> int:
        """The run's length: the resolved one, else the maximum."""
        return self.record["resolved_steps"] if self.record else self.max_steps

    def restore(self, saved: dict, start: int, where) -> int:
        """After resuming at `start` from a checkpoint whose meta held `saved` (state()); -> the length."""
        from lmlab.errors import UserError

        self.start = start
        if not self.minutes:
            return self.steps
        self.record = saved.get("budget")
        self.probe = {int(k): float(v) for k, v in saved.get("probe_times", [])}
        if self.record is not None:  # resolved before the checkpoint: keep that length, never re-measure
            print(f"{budget_line(self.record)} (resolved before the checkpoint)", file=sys.stderr)
        elif start >= self.resolve_at:
            raise UserError(f"{where} has a checkpoint at step {start} without a resolved time budget (written by a "
                            f"run without train.time_budget); use another `out` or resume=never")
        return self.steps

    def observe(self, done: int, step_s: float, agree=lambda record: record) -> bool:
        """Step `done` took `step_s`; True when it resolves the length (`agree`: every process takes
        process 0's record, e.g. lmlab.dist.broadcast_object). The PROBE_SKIP steps after each
        (re)start (a JAX loop compiles there) are not timed unless nothing else is."""
        self.seen[done] = step_s
        if done > self.start + PROBE_SKIP:
            self.probe[done] = step_s
        if done < self.resolve_at:
            return False
        self.record = agree(resolve_budget(self.minutes, self.probe or self.seen, self.max_steps, self.resolve_at))
        return True

    def state(self) -> dict:
        """What a checkpoint keeps: the record once resolved, else the timed steps so far."""
        if self.record is not None:
            return {"budget": self.record}
        return {"probe_times": sorted(self.probe.items())} if self.minutes else {}


class Length:
    """A run's length and LR schedule (the torch loop's and the JAX trainers'). With
    `train.time_budget` the length given is a maximum: the loop times its first steps and hands
    each to `after_step` while `budget.probing`; at the resolution the length, the schedule and the
    progress bar shrink once, every rank taking rank 0's measurement. Before it, the steps follow
    the maximum's schedule (inside the warmup: the same as any length's)."""

    def __init__(self, t, max_steps: int) -> None:
        from lmlab.train.optim import Schedule, resolve_warmup

        self.warmup = resolve_warmup(t.warmup_steps, max_steps)
        self.budget = Budget(getattr(t, "time_budget", None), max_steps, self.warmup)
        self._schedule = lambda n: Schedule(t.schedule, t.lr, n, self.warmup, t.min_lr_ratio, t.decay_frac)  # noqa: E731
        self.total = max_steps
        self.schedule = self._schedule(max_steps)

    def resumed(self, meta: dict, start: int, where) -> None:
        """After resuming at `start` from a checkpoint whose state held `meta` ({} without one): a
        budget resolved before the checkpoint keeps its length."""
        self.total = self.budget.restore(meta, start, where)
        self.schedule = self._schedule(self.total)

    def after_step(self, done: int, step_s: float, bar) -> None:
        from lmlab import dist as lmdist

        if not self.budget.probing or not self.budget.observe(done, step_s, lmdist.broadcast_object):
            return
        self.total = self.budget.steps
        self.schedule = self._schedule(self.total)
        bar.total = self.total
        bar.refresh()
        note = f"; it ends inside the {self.warmup}-step warmup" if self.total < self.warmup else ""
        bar.write(budget_line(self.budget.record) + note, file=sys.stderr)

    def meta(self) -> dict:
        """What a checkpoint keeps of the budget."""
        return self.budget.state()

    def stats(self) -> dict:
        """For the manifest: the budget's record, when there is one."""
        return {"budget": self.budget.record} if self.budget.record else {}
