"""Sorting lists of numbers: a non-arithmetic task with a checkable list answer.

    from lmlab.tasks import lists
    p = lists.problems("train", 1, seed=0, difficulty=[1])[0]
    # p.question: "Sort these numbers from smallest to largest: 42, 7, 19."
    # p.solution: "The smallest number is 7.\nNext comes 19.\nNext comes 42.\n#### 7, 19, 42"

Difficulty levels:
  1  three distinct numbers below 50
  2  four or five distinct numbers below 100
  3  six to eight distinct numbers below 1000

The answer is a list, so GSM8K's number regex does not apply (it would read only the first
element). This task's own extraction: strict = the text after the first `#### ` up to the
end of that line, read as a list of integers; flexible = the integers on the last line of
the text that holds any. `normalize` writes a list as "7, 19, 42"; two answers match when
their integer lists are equal. The canonical key is the sorted set of numbers, so no
permutation of a test list is ever generated for training.
"""

from __future__ import annotations

import random
import re

from lmlab.tasks import Problem, sample_problems

NAME = "sort"

_INT = re.compile(r"-?\d+")
_STRICT = re.compile(r"#### ([^\n]*)")


def _numbers(rng: random.Random, level: int) -> list[int]:
    count, hi = {1: (3, 49), 2: (rng.choice([4, 5]), 99), 3: (rng.randint(6, 8), 999)}[level]
    return rng.sample(range(0, hi + 1), count)


def _render(nums: list[int], order: list[int]) -> tuple[str, str, str]:
    question = f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}."
    lines = [f"The smallest number is {order[0]}."] + [f"Next comes {x}." for x in order[1:]]
    answer = ", ".join(map(str, order))
    lines.append(f"#### {answer}")
    return question, "\n".join(lines), answer


def make(rng: random.Random, level: int) -> Problem:
    nums = _numbers(rng, level)
    q, sol, ans = _render(nums, sorted(nums))
    return Problem(NAME, q, sol, ans, level, ",".join(map(str, sorted(nums))), meta={"numbers": nums})


def problems(split: str, n: int, seed: int = 0, difficulty: list[int] | tuple = (1, 2),
             weights: list[float] | None = None) -> list[Problem]:
    """`n` problems of `split` ('train' | 'test'), deterministic for (split, seed, difficulty)."""
    bad = [d for d in difficulty if d not in (1, 2, 3)]
    if bad:
        from lmlab.errors import UserError
        raise UserError(f"sort difficulty must be 1, 2 or 3, got {bad}")
    return sample_problems(NAME, make, split, n, seed, list(difficulty), weights)


def wrong_solution(problem: Problem, rng: random.Random) -> str:
    """The worked solution with one adjacent pair swapped (a plausible slip), so the list is unsorted."""
    order = sorted(problem.meta["numbers"])
    i = rng.randrange(len(order) - 1)
    order[i], order[i + 1] = order[i + 1], order[i]
    return _render(problem.meta["numbers"], order)[1]


def _as_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    nums = [int(x) for x in _INT.findall(text)]
    return nums or None


def normalize(answer: str | None) -> str | None:
    nums = _as_list(answer)
    return None if nums is None else ", ".join(map(str, nums))


def extract_strict(text: str) -> str | None:
    m = _STRICT.search(text)
    return normalize(m.group(1)) if m else None


def extract_flexible(text: str) -> str | None:
    for line in reversed(text.splitlines()):
        if _INT.search(line):
            return normalize(line)
    return None


def check(text: str, problem: Problem) -> bool:
    got = extract_strict(text)
    return got is not None and got == normalize(problem.answer)
