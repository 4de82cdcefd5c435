"""Embedded verifiable tasks: seeded generators of problems whose answers a program checks.

    from lmlab.tasks import TASKS
    task = TASKS["arithmetic"]
    probs = task.problems("train", n=100, seed=0, difficulty=[1, 2])
    p = probs[0]; print(p.question); print(p.solution)        # worked steps ending "#### N"
    task.check(p.solution, p)                                  # True
    task.check(task.wrong_solution(p, random.Random(0)), p)   # False (one slip, for DPO)

Each task module (arithmetic.py, lists.py) provides `NAME`, `problems(split, n, seed,
difficulty)`, `check(text, problem)`, `wrong_solution(problem, rng)`, `extract_strict(text)`,
`extract_flexible(text)` and `normalize(answer)`; the last three let the generative
evaluation score a task whose answer is not a single number (see docs/tasks.md).

Train/test disjointness is structural: `split_of(task, key)` hashes a problem's canonical
key (its arithmetic, or its set of numbers) and the hash alone decides the split, so a test
problem's content can never be generated for training, whatever the seed or count.
The `tasks` stage (lmlab/tasks/stage.py) writes them as SFT / DPO / test / few-shot files;
the `pairs` stage (lmlab/tasks/pairs.py) turns a chat model's own samples into DPO pairs.
lmlab/tasks/problems.py reads GSM8K-format problem files and holds each record's answer
rules and the prompt that asks a model one, for `lmlab eval` and `lmlab pairs` alike.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field

# Share of canonical problems that belong to the test split.
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Problem:
    task: str
    question: str
    solution: str          # worked steps, last line "#### <answer>"
    answer: str            # the final answer as written after "#### "
    difficulty: int
    key: str               # canonical content; decides the split
    meta: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return asdict(self)


def split_of(task: str, key: str) -> str:
    """'test' or 'train', from a hash of the task name and the problem's canonical key."""
    h = int.from_bytes(hashlib.sha256(f"{task}:{key}".encode()).digest()[:8], "big")
    return "test" if (h % 10_000) < TEST_FRACTION * 10_000 else "train"


def sample_problems(task: str, make, split: str, n: int, seed: int, difficulty: list[int],
                    weights: list[float] | None = None, unique: bool | None = None) -> list[Problem]:
    """Draw `n` problems of `split` by rejection: `make(rng, level)` proposes one problem.

    Test problems are unique by key (each distinct piece of arithmetic is scored once); train
    problems may repeat a key with different names and objects. The rng is seeded by
    (task, split, seed), so the same call always returns the same problems.
    """
    from lmlab.errors import UserError

    if split not in ("train", "test"):
        raise UserError(f"split must be 'train' or 'test', got {split!r}")
    if not difficulty:
        raise UserError(f"task {task}: `difficulty` is empty; give levels, e.g. difficulty: [1, 2]")
    unique = (split == "test") if unique is None else unique
    rng = random.Random(f"{task}:{split}:{seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    misses = 0  # proposals rejected since the last accepted one
    while len(out) < n:
        if misses > 20_000:  # the pool of distinct problems for these levels is exhausted
            raise UserError(f"task {task}: could only make {len(out)} distinct {split} problems of difficulty "
                            f"{difficulty} (asked for {n}); ask for fewer or add a harder level")
        level = rng.choices(difficulty, weights=weights)[0] if weights else rng.choice(difficulty)
        p = make(rng, level)
        if split_of(task, p.key) != split or (unique and p.key in seen):
            misses += 1
            continue
        seen.add(p.key)
        misses = 0
        out.append(p)
    return out


def _registry() -> dict:
    from lmlab.tasks import arithmetic, lists

    return {arithmetic.NAME: arithmetic, lists.NAME: lists}


TASKS = _registry()
