"""Multi-step arithmetic word problems in GSM8K form, with graded difficulty.

    from lmlab.tasks import arithmetic
    p = arithmetic.problems("train", 1, seed=0, difficulty=[2])[0]
    # p.question: "Tom has 7 apples. He buys 5 more. Then he gives away 3. How many apples does Tom have now?"
    # p.solution: "Tom starts with 7 apples.\n7 + 5 = 12\n12 - 3 = 9\n#### 9"

Difficulty levels (chosen so a ~5M-parameter model can learn levels 1-2 in minutes: short,
regular solutions, small numbers, one line per operation, digits split by the tokenizer):
  1  one addition or subtraction, numbers below 20
  2  two steps (addition / subtraction), numbers below 20
  3  three or four steps, starting number 10-99, operands up to 50, may double or triple

The canonical key is the arithmetic alone ("7+5-3"), so names and objects vary freely
within a split while no test computation is ever seen in training. The answer is checked
with GSM8K's strict extraction (`#### N`), the same code that scores real GSM8K.
"""

from __future__ import annotations

import random

from lmlab.tasks import Problem, gsm8k, sample_problems

NAME = "arithmetic"

NAMES = [("Tom", "he"), ("Anna", "she"), ("Sam", "he"), ("Mia", "she"), ("Leo", "he"), ("Zoe", "she"),
         ("Ben", "he"), ("Lily", "she"), ("Max", "he"), ("Emma", "she"), ("Jack", "he"), ("Nora", "she")]
OBJECTS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies"]
FRIENDS = ["a friend", "a cousin", "a classmate", "a neighbor", "the teacher"]
ADD_PHRASES = ["buys {n} more", "finds {n} more", "gets {n} more from {friend}", "is given {n} more"]
SUB_PHRASES = ["gives away {n}", "loses {n}", "sells {n}", "gives {n} to {friend}"]
MUL_PHRASES = {2: "doubles the number of {obj}", 3: "triples the number of {obj}"}
SYMBOL = {"+": "+", "-": "-", "*": "*"}


def _apply(value: int, op: str, n: int) -> int:
    return value + n if op == "+" else value - n if op == "-" else value * n


def _steps(rng: random.Random, level: int) -> tuple[int, list[tuple[str, int]]]:
    """(start, [(op, operand), ...]) with every intermediate value >= 0."""
    if level <= 2:
        n_steps, hi = level, 19
        start = rng.randint(1, hi)
    else:
        n_steps, hi = rng.choice([3, 4]), 50
        start = rng.randint(10, 99)
    ops: list[tuple[str, int]] = []
    value = start
    for _ in range(n_steps):
        choices = ["+", "-"] + (["*"] if level >= 3 and value <= 300 else [])
        op = rng.choice(choices)
        if op == "-" and value < 1:
            op = "+"
        if op == "*":
            n = rng.choice([2, 3])
        elif op == "-":
            n = rng.randint(1, min(hi, value))
        else:
            n = rng.randint(1, hi)
        ops.append((op, n))
        value = _apply(value, op, n)
    return start, ops


def _render(rng: random.Random, start: int, ops: list[tuple[str, int]], level: int,
            values: list[int] | None = None) -> tuple[str, str, str]:
    """(question, solution, answer). `values` overrides the computed results (wrong solutions)."""
    name, pron = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    sentences = [f"{name} has {start} {obj}."]
    for i, (op, n) in enumerate(ops):
        friend = rng.choice(FRIENDS)
        phrase = (rng.choice(ADD_PHRASES) if op == "+" else rng.choice(SUB_PHRASES) if op == "-"
                  else MUL_PHRASES[n]).format(n=n, friend=friend, obj=obj)
        lead = pron.capitalize() if i == 0 else f"Then {pron}"
        sentences.append(f"{lead} {phrase}.")
    sentences.append(f"How many {obj} does {name} have now?")
    lines = [f"{name} starts with {start} {obj}."]
    value = start
    for i, (op, n) in enumerate(ops):
        result = _apply(value, op, n) if values is None else values[i]
        lines.append(f"{value} {SYMBOL[op]} {n} = {result}")
        value = result
    lines.append(f"#### {value}")
    return " ".join(sentences), "\n".join(lines), str(value)


def key_of(start: int, ops: list[tuple[str, int]]) -> str:
    return str(start) + "".join(f"{op}{n}" for op, n in ops)


def make(rng: random.Random, level: int) -> Problem:
    start, ops = _steps(rng, level)
    # The surface (names, objects, phrasing) gets its own seed drawn from rng, so the same
    # problem can be re-rendered identically (wrong_solution re-renders it with a slip).
    surface_seed = rng.getrandbits(32)
    q, sol, ans = _render(random.Random(surface_seed), start, ops, level)
    return Problem(NAME, q, sol, ans, level, key_of(start, ops),
                   meta={"start": start, "ops": [list(o) for o in ops], "surface_seed": surface_seed})


def problems(split: str, n: int, seed: int = 0, difficulty: list[int] | tuple = (1, 2),
             weights: list[float] | None = None) -> list[Problem]:
    """`n` problems of `split` ('train' | 'test'), deterministic for (split, seed, difficulty)."""
    bad = [d for d in difficulty if d not in (1, 2, 3)]
    if bad:
        from lmlab.errors import UserError
        raise UserError(f"arithmetic difficulty must be 1, 2 or 3, got {bad}")
    return sample_problems(NAME, make, split, n, seed, list(difficulty), weights)


def wrong_solution(problem: Problem, rng: random.Random) -> str:
    """The same worked solution with one arithmetic slip (off by 1-3) carried to a wrong answer.

    Each later step still applies its own operation to the slipped value, so the slip
    propagates (+, - shift it; * scales it) and the final answer is always wrong.
    """
    start, ops = problem.meta["start"], [tuple(o) for o in problem.meta["ops"]]
    at = rng.randrange(len(ops))
    deltas = [d for d in (1, 2, 3, -1, -2, -3)]
    rng.shuffle(deltas)
    for delta in deltas:
        values, value = [], start
        for i, (op, n) in enumerate(ops):
            value = _apply(value, op, n) + (delta if i == at else 0)
            values.append(value)
        if min(values) >= 0:
            break
    _, sol, _ = _render(random.Random(problem.meta["surface_seed"]), start, ops, problem.difficulty, values)
    return sol


def normalize(answer: str | None) -> str | None:
    return gsm8k.normalize_answer(answer)


def extract_strict(text: str) -> str | None:
    return gsm8k.extract_strict(text)


def extract_flexible(text: str) -> str | None:
    return gsm8k.extract_flexible(text)


def check(text: str, problem: Problem) -> bool:
    """True when the `#### N` answer in `text` equals the problem's answer (GSM8K strict rules)."""
    got = normalize(extract_strict(text))
    return got is not None and got == normalize(problem.answer)
