"""The time budget (`train.time_budget`): when a run fixes its length, and to what.

The first PROBE_SKIP steps after each (re)start are not timed (allocation, caches,
torch.compile); the steps after them up to the resolution point are (the loop times them
with `loop.clock`), and their mean gives the length: the steps that fit the budget, at most
the maximum the other settings give. See docs/training.md, "Time budget".
"""

from __future__ import annotations

import math

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
