"""Typed configuration: pydantic models, YAML files and `key.sub=value` overrides.

Every stage declares a `Config` class built from `Strict` models. A stage's effective config
is: the class defaults, then the YAML file given with `--config`, then the command-line
overrides in order. Unknown keys and wrong types are rejected with a message that names the
dotted key and, where there is a fixed set, the valid choices. `describe` renders every
option with its type, default and meaning for `--help`.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lmlab.errors import UserError


class Strict(BaseModel):
    """Base for all config models: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p} (check the path passed to --config)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {e}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], parsed value). Values are read as YAML scalars/lists."""
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} has an empty key; write it as key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # `title=Run 2: more steps` is text with a colon, not a one-key block mapping: a mapping given
    # on the command line is written in flow style, `{a: 1}`
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw
    return key.split("."), value


def set_dotted(data: dict, keys: list[str], value: Any) -> None:
    node: Any = data
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(k)]
            continue
        if k not in node or not isinstance(node[k], (dict, list)):
            node[k] = {}
        node = node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _valid_keys(cls: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at `loc` (a pydantic error location) inside `cls`."""
    model: Any = cls
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        model = _model_of(model.model_fields[part].annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(model.model_fields)
    return []


def _model_of(annotation: Any) -> Any:
    """Unwrap Optional[...] / list[...] to the BaseModel inside, if there is one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        m = _model_of(arg)
        if m is not None:
            return m
    return None


def format_validation_error(cls: type[BaseModel], err: ValidationError, source: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(cls, e["loc"])
            lines.append(f"unknown config key '{loc}'" + (f" (valid keys here: {', '.join(valid)})" if valid else ""))
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f", got {got!r}"
            lines.append(f"invalid value for '{loc}': {e['msg']}{got_s}")
    where = f" in {source}" if source else ""
    return f"config error{where}: " + "; ".join(lines)


def build_config(cls: type[BaseModel], data: dict, source: str = "") -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(cls, e, source)) from None


def load_config(cls: type[BaseModel], config_file: str | Path | None = None,
                overrides: list[str] | tuple = (), base: dict | None = None) -> Any:
    """Defaults <- base dict <- YAML file <- overrides, validated into `cls`."""
    data: dict = dict(base or {})
    sources = []
    if config_file:
        data = _deep_merge(data, read_yaml(config_file))
        sources.append(str(config_file))
    # Overrides apply on top of the full default tree so that list indices resolve; then only
    # what the file and the overrides name is validated, so that pydantic's `model_fields_set`
    # tells a user's value from a default (a hardware preset fills only the defaults).
    if overrides:
        given = data
        data = _deep_merge(build_config(cls, data, " and ".join(sources)).model_dump(mode="json"), data)
        paths = []
        for o in overrides:
            keys, value = parse_override(o)
            try:
                set_dotted(data, keys, value)
            except (IndexError, ValueError, TypeError):
                raise UserError(f"override {o!r}: '{'.'.join(keys)}' does not name an existing list element") from None
            paths.append(keys)
        data = _user_part(data, given, paths)
        sources.append("command-line overrides")
    return build_config(cls, data, " and ".join(sources))


def _user_part(full: dict, given: dict, paths: list[list[str]]) -> dict:
    """The part of `full` the user wrote: keys in `given` (file, base) or on an override's path."""
    out = {}
    for k, v in full.items():
        below = [p[1:] for p in paths if p[0] == k]
        g = given.get(k)
        if any(not p for p in below) or (k in given and not isinstance(g, dict)) or (below and not isinstance(v, dict)):
            out[k] = v  # named whole: a value or a list, by the file or an override
        elif isinstance(v, dict) and (k in given or below):
            out[k] = _user_part(v, g if isinstance(g, dict) else {}, below)
    return out


def _type_name(annotation: Any) -> str:
    """A short human type name: `list[StdlibSource | FilesSource]`, `int | None`, `'a' | 'b'`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def describe(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per option: `key.sub  type  (default: X)  description`."""
    out = []
    for name, f in cls.model_fields.items():
        key = prefix + name
        members = [a for a in typing.get_args(f.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if typing.get_origin(f.annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
                and len(members) > 1 and "family" in members[0].model_fields:
            # one of several model families: each family's fields, under its name
            if f.description:
                out.append(f"  {key}.*  {f.description}")
            names = [m.model_fields["family"].default for m in members]
            out.append(f"  {key}.family  [{' | '.join(repr(n) for n in names)}] (default: {names[0]!r})")
            for m in members:
                out.append(f"  {key}.* with {key}.family={m.model_fields['family'].default}:")
                out.extend(line for line in describe(m, key + ".") if not line.lstrip().startswith(key + ".family "))
            continue
        sub = _model_of(f.annotation)
        if sub is not None and typing.get_origin(f.annotation) not in (list, typing.Union) and f.annotation is sub:
            if f.description:
                out.append(f"  {key}.*  {f.description}")
            out.extend(describe(sub, key + "."))
            continue
        default = f.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        elif isinstance(default, list):
            default = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in default]
        out.append(f"  {key}  [{_type_name(f.annotation)}] (default: {default!r})  {f.description or ''}".rstrip())
    return out


def stage_arguments(verb: str, module, args: list[str], hint: str = "") -> tuple[str | None, list[str]]:
    """The config file and overrides in `lmlab VERB args` (the CLI's reading, which `lmlab slurm VERB args` shares).

    In any order: `--config F.yaml` (or `--config=F.yaml`), the module's FLAGS, `key=value`
    overrides (applied in order), and one bare argument for the module's POSITIONAL field (the
    config file when that field is "--config"), e.g. `lmlab eval RUN --config F.yaml key=value`.
    """
    config_file, overrides, bare = None, [], None
    positional = getattr(module, "POSITIONAL", None)
    flags = getattr(module, "FLAGS", {})
    rest = iter(args)
    for a in rest:
        if a == "--config" or a.startswith("--config="):
            value = a.split("=", 1)[1] if "=" in a else next(rest, None)
            if not value:
                raise UserError("--config needs a file: --config FILE.yaml")
            if config_file:
                raise UserError("give the config either as an argument or with --config, not both")
            config_file = value
        elif a in flags:
            overrides.append(f"{flags[a][0]}={flags[a][1]}")
        elif a.startswith("-"):
            raise UserError(f"unknown option {a}: {hint}{verb}'s options are key=value overrides and "
                            f"--config FILE.yaml (`lmlab {verb} --help` lists them)")
        elif "=" in a:
            overrides.append(a)
        elif positional and bare is None:
            bare = a
        else:
            raise UserError(f"unexpected argument {a!r}: after `lmlab {verb}` come "
                            f"{f'one {positional[0].lstrip(chr(45)).upper()}, ' if positional else ''}"
                            f"--config FILE.yaml and key=value overrides")
    if bare is not None:
        if positional[0] == "--config":
            if config_file:
                raise UserError("give the config either as an argument or with --config, not both")
            config_file = bare
        else:
            overrides.insert(0, f"{positional[0]}={bare}")
    return config_file, overrides


class OneLineParser(argparse.ArgumentParser):
    """argparse for verbs with their own options (`lmlab slurm`, `lmlab tpu`): a bad option is one
    UserError line through the CLI (exit 2), naming where the options are listed, instead of
    argparse's usage block."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (the options are listed by `{self.prog} --help`)")
