"""Hardware presets: configs/hardware/NAME.yaml holds the settings that suit one kind of device.

    lmlab pretrain ... hardware=rtx4090-24gb        # a preset by name
    lmlab pretrain ... hardware=auto                # the preset of the detected device
    lmlab pretrain ... hardware=my_cluster.yaml     # your own preset file

    from lmlab.train.hardware import apply_hardware, describe_record
    cfg, record = apply_hardware(cfg)       # record: {"preset", "detected", "applied", "kept"} or None
    print(describe_record(record))          # hardware rtx4090-24gb (detected): train.micro_batch=16, ...

A preset holds config overrides in the stage configs' own structure (`train: {micro_batch,
dtype, compile}`, `parallel: {strategy, activation_checkpointing}`) and a `match:` block that
describes the device: `device` (cpu | cuda), `names` (substrings of the CUDA device name),
`memory_gib` (the range of total memory that identifies it) and `total_gib` (the memory
`lmlab plan --gpu NAME` plans for). A preset value fills a key only where the user left it
unset: anything given in the YAML file or on the command line wins (pydantic's
`model_fields_set`, walked down the sections). docs/hardware.md has the rules and the presets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.config import build_config, read_yaml, set_dotted
from lmlab.errors import UserError

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "hardware"
AUTO = "auto"
GIB = 2 ** 30


def list_presets() -> list[str]:
    """The preset names in configs/hardware/, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    """A preset name (configs/hardware/NAME.yaml) or a YAML file path -> the file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:
        if not p.is_file():
            raise UserError(f"hardware preset file not found: {p}; give a file path or one of: "
                            f"{', '.join(list_presets())}, auto")
        return p
    path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"unknown hardware preset '{name_or_path}'; available presets: "
                        f"{', '.join(list_presets())}, or auto (detect), or a YAML file path")
    return path


def load_preset(name_or_path: str) -> dict:
    """The preset's content: {"match": {...}, "train": {...}, "parallel": {...}}."""
    path = preset_path(name_or_path)
    data = read_yaml(path)
    for key, value in data.items():
        if not isinstance(value, dict):
            raise UserError(f"hardware preset {path}: '{key}' must be a mapping (e.g. train: {{micro_batch: 8}}), "
                            f"got {value!r}")
    return data


def preset_overrides(preset: dict) -> dict[str, Any]:
    """The preset's config values as {dotted_key: value}; `match` describes the device, it sets nothing."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk({k: v for k, v in preset.items() if k != "match"}, "")
    return out


# ----------------------------------------------------------------------------- detection

def match_preset(device_type: str, name: str = "", memory_gib: float = 0.0) -> str:
    """The preset for a device of this type, CUDA name and total memory (GiB); pure, for tests.

    An exact match needs a name substring and the memory inside the preset's range. Otherwise
    a preset of a matching name (else any GPU preset) with the most memory that the device
    still has: a bigger card than the preset assumes runs its settings safely. A GPU smaller
    than every preset gets the smallest.
    """
    presets = {n: load_preset(n).get("match", {}) for n in list_presets()}
    if device_type != "cuda":
        return next((n for n, m in presets.items() if m.get("device") == device_type), "cpu")
    gpus = {n: m for n, m in presets.items() if m.get("device") == "cuda"}
    named = {n: m for n, m in gpus.items() if any(s.lower() in name.lower() for s in m.get("names", []))}
    for n, m in named.items():
        lo, hi = m.get("memory_gib", [0, float("inf")])
        if lo <= memory_gib <= hi:
            return n
    for pool in (named, gpus):
        fitting = [n for n, m in pool.items() if m.get("total_gib", 0) <= memory_gib + 0.5]
        if fitting:
            return max(fitting, key=lambda n: pool[n].get("total_gib", 0))
    return min(gpus, key=lambda n: gpus[n].get("total_gib", 0))


def detect_preset(device: str | None = None) -> str:
    """The preset for `device` (None / auto: cuda:0 when torch sees CUDA, else the CPU)."""
    import torch

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return match_preset(dev.type if dev.type != "cuda" else "cpu")
    props = torch.cuda.get_device_properties(dev)
    return match_preset("cuda", props.name, props.total_memory / GIB)


# ----------------------------------------------------------------------------- applying

def _user_set(cfg, dotted: str) -> tuple[bool, Any]:
    """(whether the user gave `dotted` in the file or on the command line, its current value)."""
    node = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = getattr(type(node), "model_fields", None)
        if fields is None or part not in fields:
            where = ".".join(parts[:i + 1])
            raise UserError(f"hardware preset key '{dotted}' is not a config key here ('{where}' unknown); "
                            f"presets may set train.* and parallel.* keys only")
        is_set = part in node.model_fields_set
        node = getattr(node, part)
        if not is_set:
            return False, node
    return True, node


def apply_hardware(cfg) -> tuple[Any, dict | None]:
    """Fill the keys the user left unset from `cfg.hardware`'s preset. -> (new cfg, record or None).

    The record, for the manifest and the report: {"preset": name or path, "detected": bool
    (auto), "applied": {dotted_key: preset value}, "kept": {dotted_key: the user's value}}.
    `cfg` itself is not changed; the new config counts the applied keys as set, so applying
    twice changes nothing more.
    """
    name = getattr(cfg, "hardware", None)
    if not name:
        return cfg, None
    detected = name == AUTO
    if detected:
        device = getattr(getattr(cfg, "train", None), "device", None)
        name = detect_preset(device)
    preset = load_preset(name)
    applied, kept = {}, {}
    data = cfg.model_dump(exclude_unset=True)
    for key, value in preset_overrides(preset).items():
        is_set, current = _user_set(cfg, key)
        if is_set:
            kept[key] = current
        else:
            applied[key] = value
            set_dotted(data, key.split("."), value)
    new = build_config(type(cfg), data, f"hardware preset {preset_path(name)}") if applied else cfg
    return new, {"preset": name, "detected": detected, "applied": applied, "kept": kept}


def describe_record(record: dict | None) -> str:
    """One line for logs and the report: what the preset set and what the user's config kept."""
    if not record:
        return "hardware: no preset"
    how = " (detected)" if record.get("detected") else ""
    applied = ", ".join(f"{k}={_show(v)}" for k, v in record.get("applied", {}).items()) or "nothing"
    line = f"hardware {record['preset']}{how}: set {applied}"
    if record.get("kept"):
        line += "; kept your " + ", ".join(f"{k}={_show(v)}" for k, v in record["kept"].items())
    return line


def _show(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
