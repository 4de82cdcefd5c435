"""The reward functions GRPO and best-of-N score completions with, and how a list of them is applied.

    from lmlab.rewards.functions import RewardSpec, Rewards
    rewards = Rewards([RewardSpec(name="exact"), RewardSpec(name="format", weight=0.1)])
    per_fn, total = rewards.score(prompts, completions, {"answer": [...], "task": [...]})
    fn = build_reward(RewardSpec(name="verifier", path="runs/x/verifier"))   # one function

A reward function is a plain function `f(prompts, completions, **problem_fields) -> list[float |
None]` (TRL's signature): `prompts[i]` is the question completion i answers, every problem
field (`answer`, `task`, `difficulty`, a code problem's `tests`, ...) is a list aligned with
the completions, and None means "does not apply to this completion" (it then adds nothing to
the total, as TRL's nansum). Built in (`name`):

  exact         1 when the completion's answer is the reference, by the evaluation's own strict
                extraction (lmlab.tasks.problems.answer_rules: `#### N`; a `sort` answer as its
                list), else 0; None for a problem without a reference answer
  format        1 when the completion states an answer the strict extraction can read, else 0
  verifier      the outcome verifier's P(correct) (`path`: a `lmlab verifier` directory)
  reward_model  a reward model's score (`path`: a `lmlab reward` directory)
  code          1 when the program in the completion passes the problem's tests in the sandbox
                (lmlab.rewards.code; `params` go to its limits), else 0
  MODULE:FUNC   any importable function with the signature above, e.g. `mypkg.rewards:brevity`;
                `params` are passed as keyword arguments

Totals are Σ weight × reward over the functions that gave a number. A function that raises
or returns the wrong number of rewards is named in a UserError (`on_error="fail"`), or its
rewards for that batch become None with one warning (`on_error="none"`).
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Callable, Literal, Optional, Sequence

import numpy as np
from pydantic import Field

from lmlab.config import Strict
from lmlab.errors import UserError

RewardFn = Callable[..., list]
OnError = Literal["fail", "none"]


class RewardSpec(Strict):
    name: str = Field("exact", description="exact | format | verifier | reward_model | code | MODULE:FUNCTION")
    weight: float = Field(1.0, description="weight of this reward in the total")
    path: Optional[str] = Field(None, description="verifier / reward_model: the scorer directory")
    label: Optional[str] = Field(None, description="name in the metrics (rewards/<label>/mean); default: name")
    params: dict = Field(default_factory=dict, description="keyword arguments for the function (code: sandbox "
                         "limits such as timeout_s, memory_mb; MODULE:FUNCTION: anything)")

    def key(self) -> str:
        return self.label or self.name.rsplit(":", 1)[-1]


# ----------------------------------------------------------------------------- built-in rewards

def exact_answer(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Optional[str]] = (),
                 task: Sequence[Optional[str]] = (), **_) -> list[Optional[float]]:
    """1.0 when the strict extraction of the completion equals the reference answer, else 0.0."""
    from lmlab.tasks.problems import answer_rules

    out: list[Optional[float]] = []
    for i, text in enumerate(completions):
        ref_text = answer[i] if i < len(answer) else None
        if not isinstance(ref_text, str):
            out.append(None)
            continue
        strict, _, ref_fn = answer_rules(task[i] if i < len(task) else None)
        ref = ref_fn(ref_text)
        got = strict(text)
        out.append(1.0 if ref is not None and got is not None and got == ref else 0.0)
    return out


def answer_format(prompts: Sequence[str], completions: Sequence[str], task: Sequence[Optional[str]] = (),
                  **_) -> list[float]:
    """1.0 when the completion states an answer the strict extraction reads (`#### N`), else 0.0."""
    from lmlab.tasks.problems import answer_rules

    return [1.0 if answer_rules(task[i] if i < len(task) else None)[0](text) is not None else 0.0
            for i, text in enumerate(completions)]


@functools.lru_cache(maxsize=8)
def _scorer(path: str, kind: str, device: str):
    from lmlab.infer.scorer import Scorer

    scorer = Scorer.load(path, device=device)
    if scorer.kind != kind:
        raise UserError(f"{path} is a {scorer.kind} directory, not a {kind}; use name: "
                        f"{'verifier' if scorer.kind == 'verifier' else 'reward_model'} for it")
    return scorer


def scorer_reward(path: str, kind: str, device: str = "cpu", batch_size: int = 32) -> RewardFn:
    """A verifier's P(correct) or a reward model's score as a reward function."""
    scorer = _scorer(path, kind, device)

    def reward(prompts, completions, **_):
        return [float(s) for s in scorer.score(list(prompts), list(completions), batch_size=batch_size)]

    reward.scorer = scorer  # the caller checks its tokenizer against the policy's
    return reward


def _import(spec: str) -> RewardFn:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"reward function {spec!r} cannot be imported ({e}); give MODULE:FUNCTION of an "
                        f"importable module (on PYTHONPATH) or one of exact, format, verifier, reward_model, "
                        f"code") from None
    if not callable(fn):
        raise UserError(f"reward function {spec!r} is not callable")
    return fn


def build_reward(spec: RewardSpec, device: str = "cpu") -> RewardFn:
    """The function a spec names, ready to call."""
    if spec.name == "exact":
        return exact_answer
    if spec.name == "format":
        return answer_format
    if spec.name in ("verifier", "reward_model"):
        if not spec.path:
            raise UserError(f"reward {spec.name} needs path=DIR (a `lmlab {'verifier' if spec.name == 'verifier' else 'reward'}` "
                            f"output directory)")
        return scorer_reward(spec.path, "verifier" if spec.name == "verifier" else "reward", device,
                             **{k: v for k, v in spec.params.items() if k == "batch_size"})
    if spec.name == "code":
        from lmlab.rewards.code import code_reward
        from lmlab.rewards.sandbox import SandboxLimits

        try:
            limits = SandboxLimits(**spec.params)
        except TypeError as e:
            raise UserError(f"reward code: bad params {spec.params} ({e}); the sandbox limits are the fields of "
                            f"lmlab.rewards.sandbox.SandboxLimits") from None
        return functools.partial(code_reward, limits=limits)
    if ":" in spec.name:
        fn = _import(spec.name)
        return functools.partial(fn, **spec.params) if spec.params else fn
    raise UserError(f"unknown reward {spec.name!r}; use exact, format, verifier, reward_model, code or "
                    f"MODULE:FUNCTION")


class Rewards:
    """A list of reward functions with their weights and metric names."""

    def __init__(self, specs: Sequence[RewardSpec], device: str = "cpu") -> None:
        if not specs:
            raise UserError("no reward functions: give rewards=[{name: exact}] or another list")
        self.specs = list(specs)
        self.keys = [s.key() for s in self.specs]
        dup = sorted({k for k in self.keys if self.keys.count(k) > 1})
        if dup:
            raise UserError(f"two rewards are named {dup[0]!r}; give each a distinct `label`")
        self.weights = np.array([s.weight for s in self.specs], dtype=np.float64)
        self.fns = [build_reward(s, device) for s in self.specs]
        self._warned: set[str] = set()

    def scorers(self) -> list:
        """The verifier / reward-model scorers among the functions (for tokenizer checks)."""
        return [fn.scorer for fn in self.fns if hasattr(fn, "scorer")]

    def score(self, prompts: Sequence[str], completions: Sequence[str], fields: dict[str, Sequence],
              on_error: OnError = "fail") -> tuple[np.ndarray, np.ndarray]:
        """(per-function rewards (N, F) with NaN for None, weighted totals (N,))."""
        n = len(completions)
        per = np.full((n, len(self.fns)), np.nan, dtype=np.float64)
        for j, (key, fn) in enumerate(zip(self.keys, self.fns)):
            try:
                got = fn(list(prompts), list(completions), **fields)
                if got is None or len(got) != n:
                    raise _WrongLength(f"returned {'None' if got is None else len(got)} rewards for {n} completions")
                col = np.array([np.nan if v is None else float(v) for v in got], dtype=np.float64)
            except Exception as e:  # noqa: BLE001 - a user's function may raise anything; name it
                what = str(e) if isinstance(e, _WrongLength) else f"raised {type(e).__name__}: {e}"
                if on_error == "fail":
                    raise UserError(f"reward function {key!r} {what}; fix it, or set reward_errors=none to mark "
                                    f"its rewards None for such batches") from None
                if key not in self._warned:
                    print(f"warning: reward function {key!r} {what}; its rewards are None for this batch "
                          f"(reward_errors=none; warned once)", file=sys.stderr)
                    self._warned.add(key)
                continue
            per[:, j] = col
        total = np.nansum(per * self.weights[None, :], axis=1)
        return per, total


class _WrongLength(Exception):
    pass
