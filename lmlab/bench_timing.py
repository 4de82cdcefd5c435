"""Timing both sides of a benchmark alike: interleaved single calls, the median reported.

    times = interleaved({"lmlab": step_ours, "peer": step_peer}, warmup=1, n=6, device=dev)
    median(times["lmlab"])
"""

from __future__ import annotations

import statistics
import time

import torch


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def interleaved(sides: dict, warmup: int, n: int, device) -> dict[str, list[float]]:
    """Run each side `n` times, alternating which goes first, timing every call separately.

    Alternating single calls (A B B A A B ...) spreads a noisy neighbour's load evenly over
    both sides; the caller reports the median call time, which ignores the worst bursts.
    """
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    names = list(sides)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(n):
        for name in (names if i % 2 == 0 else names[::-1]):
            sync(device)
            t = time.perf_counter()
            sides[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
