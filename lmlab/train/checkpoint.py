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

A run on several processes (`torchrun`, DDP or FSDP2), or FSDP2 on one, writes `dcp/` instead of
`model.safetensors` + `optimizer.pt`: a torch.distributed.checkpoint of the model and
optimizer state, each rank writing its own shards (a sharded 2B model never gathers on one
rank); replicated DDP state is written once; extra states holding sharded tensors (FSDP's
EMA) are written there too, the others as NAME.pt. trainer.json, the extra states and meta.json
come from rank 0. DCP reshards on load, so a checkpoint saved on 4 processes resumes on 2
or on 1 (a plain process reads it without a process group). A one-process checkpoint
resumes on several DDP processes; under FSDP it does not (it would need gathering on load).

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
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from lmlab import dist as lmdist
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
    the objective's state and the EMA weights, verified and loaded with the rest. In a
    process group every rank must call it (the sharded `dcp/` format, see the module doc).
    """
    # FSDP on one process (torchrun --nproc_per_node 1) holds DTensors too: sharded, like 2 or more
    if lmdist.world() > 1 or any(lmdist.is_dtensor(p) for p in model.parameters()):
        return _save_sharded(run_dir, step, model, optimizer, trainer_state, keep, extra)
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
        _seal(tmp, final, step, names)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(e, final) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep)
    return final


def _seal(tmp: Path, final: Path, step: int, names: list[str]) -> None:
    """fsync and hash every file, write meta.json last, rename the directory into place."""
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


def _save_sharded(run_dir, step, model, optimizer, trainer_state, keep, extra) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = checkpoint_dir(run_dir, step)
    # One temporary name for all ranks (rank 0's pid), on the shared filesystem DCP needs.
    tmp = final.with_name(f".{final.name}.tmp-{lmdist.broadcast_object(os.getpid())}")
    main = lmdist.is_main()
    ok = True
    try:
        if main:
            final.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        lmdist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        # Extra states holding sharded tensors (FSDP's EMA) go with the model's shards.
        sharded = {k: v for k, v in (extra or {}).items() if _has_dtensor(v)}
        dcp.save({"model": model_sd, "optim": optim_sd, **{f"extra.{k}": v for k, v in sharded.items()}},
                 checkpoint_id=str(tmp / "dcp"))
        lmdist.barrier()  # every rank's shards are written
        if main:
            (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step,
                                                          "dcp_extra": sorted(sharded)}))
            names = ["trainer.json"]
            for key, state in (extra or {}).items():
                if key in sharded:
                    continue
                torch.save(state, tmp / f"{key}.pt")
                names.append(f"{key}.pt")
            names += sorted(str(p.relative_to(tmp)) for p in (tmp / "dcp").rglob("*") if p.is_file())
            _seal(tmp, final, step, names)
    except OSError as e:
        ok = False
        error = disk_error(e, final)
    finally:
        if main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    flags = lmdist.all_reduce_(torch.tensor([0 if ok else 1]), "max")
    if not ok:
        raise error from None
    if flags.item():
        raise UserError(f"another rank could not write its part of checkpoint {final}; see that rank's error")
    if main:
        prune_checkpoints(run_dir, keep)
    lmdist.barrier()
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


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    extra_into: dict | None = None) -> dict:
    """Load weights (and optimizer state) in place; return the trainer state (with 'step').

    The `extra` states it holds come back under `state["extra_states"]` ({name: state})."""
    extra = {}
    if (path / "dcp").is_dir():
        extra.update(_load_sharded(path, model, optimizer, extra_into))
    else:
        _load_full(path, model, optimizer)
    trainer = json.loads((path / "trainer.json").read_text())
    for f in sorted(path.glob("*.pt")):
        if f.name != "optimizer.pt":
            extra[f.stem] = torch.load(f, map_location="cpu", weights_only=True)
    trainer["extra_states"] = extra
    return trainer


def _has_dtensor(state) -> bool:
    if isinstance(state, dict):
        return any(_has_dtensor(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return any(_has_dtensor(v) for v in state)
    return lmdist.is_dtensor(state)


def _load_sharded(path: Path, model, optimizer, extra_into: dict | None = None) -> dict:
    """Load model and optimizer shards in place; extra states saved in dcp/ are read into the
    matching templates of `extra_into` ({name: state_dict with the destination tensors})."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # DCP reads whatever shards it needs for this process's parameters: resharding is free.
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_sd, **({"optim": optim_sd} if optimizer is not None else {})}
    saved_extra = json.loads((path / "trainer.json").read_text()).get("dcp_extra", [])
    state.update({f"extra.{k}": v for k, v in (extra_into or {}).items() if k in saved_extra})
    with warnings.catch_warnings():  # a one-process resume of a sharded checkpoint is what we mean
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))
    return {k[len("extra."):]: v for k, v in state.items() if k.startswith("extra.")}


def _load_full(path: Path, model, optimizer) -> None:
    if any(lmdist.is_dtensor(p) for p in model.parameters()):
        raise UserError(f"{path} was saved by a one-process run; it resumes on one process or under "
                        f"parallel.strategy=ddp, not fsdp (use ddp to continue it, or resume=never)")
    st_load_model(model, str(path / "model.safetensors"), strict=True)
    if optimizer is not None:
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        # load_state_dict casts moment tensors to each parameter's device and dtype.
        optimizer.load_state_dict(state)


def find_resumable(run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                   warn=lambda msg: print(msg, file=sys.stderr), extra_into: dict | None = None
                   ) -> tuple[Path, dict] | None:
    """Load the newest checkpoint that verifies and loads; warn about each one that does not.

    Returns (path, trainer_state), or None when the run has no checkpoints. Raises UserError
    when checkpoints exist but none is usable.
    """
    candidates = lmdist.broadcast_object(list_checkpoints(run_dir))
    bad = []
    for step, path in reversed(candidates):
        # Rank 0 hashes the files (once, not once per rank); every rank then loads its part, and
        # all fall back together when any rank's load fails.
        reason = lmdist.broadcast_object(verify_checkpoint(path) if lmdist.is_main() else None)
        if reason is None:
            try:
                state = load_checkpoint(path, model, optimizer, extra_into)
                error = None
            except UserError:
                raise
            except Exception as e:  # a file that hashes right but does not load (e.g. wrong shapes)
                state, error = None, f"{path} could not be loaded: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            reason = next((r for r in lmdist.gather_objects(error) if r is not None), None)
            if reason is None:
                return path, state
        bad.append(reason)
        warn(f"warning: checkpoint step {step} is unusable: {reason}; trying an older one")
    if bad:
        raise UserError(
            f"no usable checkpoint in {Path(run_dir) / CHECKPOINTS} ({'; '.join(bad)}). Refusing to start over "
            f"silently: delete {Path(run_dir) / CHECKPOINTS} (or pass resume=never) to train from scratch")
    return None
