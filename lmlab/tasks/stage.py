"""Write the embedded verifiable tasks as SFT, DPO, test and few-shot data files.

    lmlab tasks out=runs/x/tasks
    lmlab tasks out=runs/x/tasks seed=0 \
        tasks='[{name: arithmetic, difficulty: [1,2], n_train: 4000, n_test: 200}, {name: sort, n_train: 1000, n_test: 100}]'

Files in `out` (one JSON object per line):
  sft_train.jsonl  {"messages": [{"role": "user", "content": question},
                                 {"role": "assistant", "content": solution}], "task", "difficulty"}
                   with thinking=true the reply thinks first: {"role": "assistant", "thinking": the
                   worked steps, "content": "#### N"} (for `lmlab sft template=think`)
  dpo_train.jsonl  {"prompt": question, "chosen": solution, "rejected": a wrong solution, "task", "difficulty"}
  test.jsonl       {"question", "answer": solution ending "#### N", "task", "difficulty"}  (GSM8K format)
  fewshot.jsonl    the same format as test.jsonl, drawn from the train split, for few-shot prompting
  train.jsonl      the DPO problems in the test.jsonl format, line i the problem of dpo_train.jsonl's
                   line i: to sample a model on (`lmlab pairs` builds on-policy pairs from them)

Train, DPO and few-shot problems come from the train split, test problems from the test
split; the split is decided by a hash of each problem's content (lmlab/tasks/__init__.py),
so test problems never appear in any training file. DPO problems are a separate seeded draw
from the train split: they may share content with SFT problems (both are training data),
never with test ones. Everything is a pure function of the config: the same config gives
byte-identical files, and re-running it is a no-op.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

from pydantic import Field, field_validator

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.errors import UserError

POSITIONAL = ("out", "output directory for the task data files")
FILES = ("sft_train", "dpo_train", "test", "fewshot", "train")


class TaskSpec(Strict):
    name: str = Field(description="task name: arithmetic | sort")
    difficulty: list[int] = Field(default_factory=lambda: [1, 2], description="difficulty levels to mix (1, 2, 3)")
    weights: Optional[list[float]] = Field(None, description="relative weight of each level in `difficulty` (default: equal)")
    n_train: int = Field(2000, ge=0, description="SFT conversations (train split)")
    n_test: int = Field(200, ge=0, description="held-out test problems (test split, distinct content)")
    n_dpo: Optional[int] = Field(None, ge=0, description="DPO pairs (train split; default: n_train // 4)")
    n_fewshot: int = Field(8, ge=0, description="train problems written to fewshot.jsonl for few-shot prompting")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from lmlab.tasks import TASKS

        if v not in TASKS:
            raise ValueError(f"unknown task {v!r}; known tasks: {', '.join(sorted(TASKS))}")
        return v


def _default_tasks() -> list[TaskSpec]:
    return [TaskSpec(name="arithmetic", difficulty=[1, 2], n_train=4000, n_test=200),
            TaskSpec(name="sort", difficulty=[1, 2], n_train=1000, n_test=100)]


class Config(Strict):
    out: str = Field("runs/tasks", description="output directory (kind 'tasks')")
    tasks: list[TaskSpec] = Field(default_factory=_default_tasks, description="the tasks to write and how many problems of each")
    seed: int = Field(0, description="seed of every draw (problems, wrong solutions, shuffling)")
    shuffle: bool = Field(True, description="shuffle sft_train.jsonl and dpo_train.jsonl across tasks (seeded)")
    thinking: bool = Field(False, description="SFT replies think first: the worked steps as the assistant's "
                           "`thinking`, the `#### N` line as its content (train them with template=think)")


def build(cfg: Config) -> dict[str, list[dict]]:
    """The records of each file, deterministic for the config."""
    from lmlab.tasks import TASKS

    names = [t.name for t in cfg.tasks]
    if len(set(names)) != len(names):
        raise UserError(f"task listed twice in `tasks`: {names}; give each task once with its counts")
    files: dict[str, list[dict]] = {name: [] for name in FILES}
    for spec in cfg.tasks:
        task = TASKS[spec.name]
        if spec.weights is not None and len(spec.weights) != len(spec.difficulty):
            raise UserError(f"task {spec.name}: `weights` has {len(spec.weights)} entries but `difficulty` has "
                            f"{len(spec.difficulty)}; give one weight per level")
        n_dpo = spec.n_train // 4 if spec.n_dpo is None else spec.n_dpo
        # One train draw covers SFT, DPO and few-shot with distinct seeds per use, so changing
        # n_dpo never changes the SFT problems.
        draw = lambda split, n, stream: task.problems(split, n, seed=hash_seed(cfg.seed, stream),  # noqa: E731
                                                      difficulty=spec.difficulty, weights=spec.weights)
        for p in draw("train", spec.n_train, "sft"):
            reply = {"role": "assistant", "content": p.solution}
            if cfg.thinking:
                steps, answer = split_solution(p.solution)
                reply = {"role": "assistant", "thinking": steps, "content": answer}
            files["sft_train"].append({"messages": [{"role": "user", "content": p.question}, reply],
                                       "task": p.task, "difficulty": p.difficulty})
        rng = random.Random(f"{spec.name}:wrong:{cfg.seed}")
        for p in draw("train", n_dpo, "dpo"):
            files["dpo_train"].append({"prompt": p.question, "chosen": p.solution,
                                       "rejected": task.wrong_solution(p, rng), "task": p.task, "difficulty": p.difficulty})
            files["train"].append({"question": p.question, "answer": p.solution, "task": p.task, "difficulty": p.difficulty})
        for p in task.problems("test", spec.n_test, seed=cfg.seed, difficulty=spec.difficulty, weights=spec.weights):
            files["test"].append({"question": p.question, "answer": p.solution, "task": p.task, "difficulty": p.difficulty})
        for p in draw("train", spec.n_fewshot, "fewshot"):
            files["fewshot"].append({"question": p.question, "answer": p.solution, "task": p.task, "difficulty": p.difficulty})
    if cfg.shuffle:
        random.Random(f"shuffle:{cfg.seed}").shuffle(files["sft_train"])
        random.Random(f"shuffle-dpo:{cfg.seed}").shuffle(files["dpo_train"])
        # The same seed and length give the same permutation: train.jsonl stays aligned with dpo_train.jsonl.
        random.Random(f"shuffle-dpo:{cfg.seed}").shuffle(files["train"])
    return files


def split_solution(solution: str) -> tuple[str, str]:
    """(the worked steps, the final "#### N" line) of a task solution."""
    steps, _, answer = solution.rpartition("\n")
    return steps, answer


def hash_seed(seed: int, stream: str) -> int:
    """A seed per use (sft / dpo / fewshot) derived from the stage seed, stable across runs."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:4], "big")


def run(cfg: Config) -> Path:
    out = Path(cfg.out)
    artifacts.check_out(out, "tasks", "tasks")
    config = cfg.model_dump(mode="json")
    # `thinking` off is left out, so task dirs written before it existed keep their fingerprint
    fp = artifacts.stage_fingerprint("tasks", {k: v for k, v in config.items()
                                               if k != "out" and not (k == "thinking" and not v)}, {})
    # A directory written before train.jsonl existed is rewritten (its other files come out identical).
    if artifacts.is_up_to_date(out, fp) and all((out / f"{name}.jsonl").is_file() for name in FILES):
        print(f"tasks: up to date ({out}), nothing to do")
        return out
    timer = artifacts.Timer()
    with timer("generate"):
        files = build(cfg)
    stats: dict = {f"{name}_records": len(recs) for name, recs in files.items()}
    for name in ("sft_train", "test"):
        counts: dict = {}
        for r in files[name]:
            counts[r["task"]] = counts.get(r["task"], 0) + 1
        stats[f"{name}_per_task"] = counts
    try:
        with artifacts.atomic_dir(out) as tmp:
            for name, recs in files.items():
                with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                    for r in recs:
                        f.write(json.dumps(r, ensure_ascii=False) + "\n")
            stats["sha256"] = {f"{name}.jsonl": artifacts.sha256_file(tmp / f"{name}.jsonl") for name in files}
            artifacts.write_manifest(tmp, "tasks", config, fp, verb="tasks", timings=timer.total(), stats=stats)
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    print(f"tasks: wrote {out} (" + ", ".join(f"{n} {len(r)}" for n, r in files.items()) + ")")
    return out
