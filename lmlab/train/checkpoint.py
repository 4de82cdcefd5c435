"""Training checkpoints: atomic to write, verified before they are trusted.

    save_checkpoint(run_dir, step, model, optimizer, trainer_state, keep=3)
    ckpt = find_resumable(run_dir)            # newest checkpoint that verifies, or None
    trainer_state = load_checkpoint(ckpt, model, optimizer)

Layout of `RUN/checkpoints/step_000123/`:

    model.safetensors   model weights (tied weights stored once)
    optimizer.pt        optimizer.state_dict() (AdamW moments and step counts), torch.save
    trainer.json        step, tokens seen, RNG states, anything the loop wants back
    NAME.pt             optional extra states (`objective.pt`: the objective's state_dict;
                        `ema.pt`: the EMA of the weights), torch.save
    meta.json           {"step", "files": {name: sha256}} -- written last

A checkpoint is built in a hidden temporary sibling (`.step_000123.tmp-PID`), every file is
fsynced, then the directory is renamed into place: a crash, `kill -9` or a full disk
mid-write leaves the previous checkpoints untouched. On resume each candidate is checked
against the sha256 in its meta.json and actually loaded; a bad one is reported by file name
and the next older one is tried. If none is good the run refuses to start rather than
silently throwing away the training done so far (see docs/training.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from lmlab.artifacts import disk_error, sha256_file
from lmlab.errors import UserError

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished-looking checkpoint directory, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def remove_stale_temps(run_dir: str | Path) -> None:
    """Delete temporary checkpoint directories left behind by a killed process."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, keep: int = 3, extra: dict[str, object] | None = None) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`.

    `extra` ({name: state}) adds `NAME.pt` files (torch.save; tensors, numbers, lists, dicts):
    the objective's state and the EMA weights, verified and loaded with the rest.
    """
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        st_save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step}))
        names = ["model.safetensors", "optimizer.pt", "trainer.json"]
        for key, state in (extra or {}).items():
            torch.save(state, tmp / f"{key}.pt")
            names.append(f"{key}.pt")
        files = {}
        for name in names:
            _fsync_file(tmp / name)
            files[name] = sha256_file(tmp / name)
        with open(tmp / "meta.json", "w") as f:
            json.dump({"step": step, "files": files}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # e.g. a corrupt checkpoint of this step that resume skipped
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(e, final) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    for _, path in list_checkpoints(run_dir)[:-max(1, keep)]:
        shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is intact, else a reason that names the bad file."""
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{meta_path} is missing or unreadable"
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if sha256_file(f) != digest:
            return f"{f} does not match its sha256 in meta.json (truncated or corrupted)"
    return None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load weights (and optimizer state) in place; return the trainer state (with 'step').

    The `extra` states it holds come back under `state["extra_states"]` ({name: state})."""
    st_load_model(model, str(path / "model.safetensors"), strict=True)
    if optimizer is not None:
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        # load_state_dict casts moment tensors to each parameter's device and dtype.
        optimizer.load_state_dict(state)
    trainer = json.loads((path / "trainer.json").read_text())
    extra = {}
    for f in sorted(path.glob("*.pt")):
        if f.name != "optimizer.pt":
            extra[f.stem] = torch.load(f, map_location="cpu", weights_only=True)
    trainer["extra_states"] = extra
    return trainer


def find_resumable(run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                   warn=lambda msg: print(msg, file=sys.stderr)) -> tuple[Path, dict] | None:
    """Load the newest checkpoint that verifies and loads; warn about each one that does not.

    Returns (path, trainer_state), or None when the run has no checkpoints. Raises UserError
    when checkpoints exist but none is usable.
    """
    candidates = list_checkpoints(run_dir)
    bad = []
    for step, path in reversed(candidates):
        reason = verify_checkpoint(path)
        if reason is None:
            try:
                return path, load_checkpoint(path, model, optimizer)
            except Exception as e:  # a file that hashes right but does not load (e.g. wrong shapes)
                reason = f"{path} could not be loaded: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        bad.append(reason)
        warn(f"warning: checkpoint step {step} is unusable: {reason}; trying an older one")
    if bad:
        raise UserError(
            f"no usable checkpoint in {Path(run_dir) / CHECKPOINTS} ({'; '.join(bad)}). Refusing to start over "
            f"silently: delete {Path(run_dir) / CHECKPOINTS} (or pass resume=never) to train from scratch")
    return None
