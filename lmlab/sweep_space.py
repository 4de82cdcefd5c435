"""The search space of `lmlab sweep`: a YAML mapping from dotted config keys to ranges.

    train.lr:         {type: float, low: 1.0e-4, high: 3.0e-3, log: true}   # log-uniform
    train.min_lr_ratio: {type: float, low: 0.0, high: 0.5}                  # uniform
    model.n_layer:    {type: int, low: 2, high: 6}                          # every integer
    train.warmup_steps: {type: int, low: 0, high: 20, step: 5}              # 0, 5, 10, 15, 20
    train.schedule:   {type: categorical, choices: [cosine, wsd]}

`load_space` checks the file and every key against the stage's Config before anything runs:
each bound and each choice is applied as an override to the stage's config and validated, so
an unknown key, a value of the wrong type or a bound outside what the field accepts is one
`UserError` naming the key. A trial's values go to the stage as `key=value` overrides
(`as_override` writes them so that YAML reads back exactly the same value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmlab.config import load_config, read_yaml
from lmlab.errors import UserError

FIELDS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
          "categorical": {"type", "choices"}}
# Keys the sweep itself sets for every trial.
RESERVED = {"out": "the sweep gives each trial its own run directory (OUT/trial_NNNN); set --out instead"}


@dataclass(frozen=True)
class Param:
    """One dimension of the space: a float or int range (optionally log or stepped) or a list of choices."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def distribution(self):
        """The Optuna distribution (passed to `study.ask`, so a trial gets every value when it is created)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type == "float":
            return FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return CategoricalDistribution(list(self.choices))

    def examples(self) -> list:
        """The values validated against the Config up front: both bounds, or every choice."""
        return [self.low, self.high] if self.type != "categorical" else list(self.choices)

    def as_dict(self) -> dict:
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        d = {"type": self.type, "low": self.low, "high": self.high}
        if self.log:
            d["log"] = True
        if self.step is not None:
            d["step"] = self.step
        return d


def as_override(key: str, value: Any) -> str:
    """`key=value` with the value in YAML flow style, so parse_override reads back the same value
    (a bare `1e-05` would be a string to YAML; `yes` a boolean)."""
    text = yaml.safe_dump([value], default_flow_style=True, width=10**9).strip()
    return f"{key}={text[1:-1]}"


def _number(key: str, name: str, value: Any, integer: bool) -> float | int:
    """A bound from YAML: PyYAML reads `1e-4` (no dot) as a string, so such strings are accepted too."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"search space: '{key}': {name} must be a finite number, got {value!r}")
    if integer:
        if value != int(value):
            raise UserError(f"search space: '{key}' is type int but {name}={value!r} is not a whole number; "
                            f"use whole bounds or type: float")
        return int(value)
    return float(value)


def parse_param(key: str, spec: Any) -> Param:
    """One entry of the space file, checked for its own consistency (not yet against the Config)."""
    if key in RESERVED:
        raise UserError(f"search space: '{key}' cannot be searched: {RESERVED[key]}")
    if not isinstance(spec, dict) or spec.get("type") not in FIELDS:
        raise UserError(f"search space: '{key}' needs a mapping with type: float, int or categorical, e.g. "
                        f"{key}: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}; got {spec!r}")
    kind = spec["type"]
    unknown = sorted(set(spec) - FIELDS[kind])
    if unknown:
        raise UserError(f"search space: '{key}' (type {kind}) has unknown field(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(sorted(FIELDS[kind]))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"search space: '{key}' needs a non-empty list of choices, e.g. choices: [a, b]")
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            raise UserError(f"search space: '{key}': choices must be numbers, strings, booleans or null, "
                            f"got {bad[0]!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise UserError(f"search space: '{key}' lists a choice twice: {choices}")
        return Param(key, kind, choices=tuple(choices))
    for name in ("low", "high"):
        if name not in spec:
            raise UserError(f"search space: '{key}' (type {kind}) needs low and high, e.g. "
                            f"{key}: {{type: {kind}, low: 1, high: 8}}")
    integer = kind == "int"
    low, high = _number(key, "low", spec["low"], integer), _number(key, "high", spec["high"], integer)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"search space: '{key}': log must be true or false, got {log!r}")
    step = _number(key, "step", spec["step"], integer) if spec.get("step") is not None else None
    if not low < high:
        raise UserError(f"search space: '{key}' has low={low!r} >= high={high!r}; make low smaller than high")
    if log and low <= 0:
        raise UserError(f"search space: '{key}' is log-scaled but low={low!r}; a log range needs low > 0")
    if step is not None and step <= 0:
        raise UserError(f"search space: '{key}' has step={step!r}; step must be positive")
    # Optuna samples a log range continuously: a step on it has no meaning (an int log range steps by 1).
    if log and step is not None and not (integer and step == 1):
        raise UserError(f"search space: '{key}' sets both log and step; use one of them")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def load_space(space: str | Path | dict, config_cls, config_file: str | None, overrides: list[str]) -> list[Param]:
    """Parse the space (a YAML file or a mapping) and check every key and bound against `config_cls`."""
    source = "the inline space" if isinstance(space, dict) else str(space)
    if not isinstance(space, dict) and not Path(space).is_file():
        raise UserError(f"search space file not found: {space} (check the path passed to --space)")
    data = space if isinstance(space, dict) else read_yaml(space)
    if not data:
        raise UserError(f"search space {source} is empty; map dotted config keys to ranges, e.g. "
                        f"train.lr: {{type: float, low: 1.0e-4, high: 3.0e-3, log: true}}")
    try:
        params = [parse_param(str(key), spec) for key, spec in data.items()]
    except UserError as e:
        raise UserError(f"{e} (in {source})") from None
    load_config(config_cls, config_file, overrides)  # the base config's own errors are reported as such
    for p in params:
        for value in p.examples():
            try:
                load_config(config_cls, config_file, [*overrides, as_override(p.key, value)])
            except UserError as e:
                detail = str(e).split(": ", 1)[-1]  # drop "config error in ...:"
                raise UserError(f"search space {source}: '{p.key}' = {value!r} is not a valid value of the stage's "
                                f"config ({detail}); fix the key or its range") from None
    return params
