"""Artifact directories and their manifests.

A stage reads artifact directories and writes one. Each holds `manifest.json`:

    kind              corpus | tokenizer | packed | model | eval | report | export
    fingerprint       sha256 over (kind, resolved config, input fingerprints): same inputs and
                      config -> same fingerprint -> the stage is a no-op
    config            the resolved config
    inputs            {name: {"path", "fingerprint"}}
    tokenizer_sha256  the tokenizer's fingerprint where one is involved
    lmlab_version, git_commit, created, timings, stats

Writes are atomic: a stage builds its output in a temporary sibling directory and swaps it
into place only when complete, so a crash, Ctrl-C or a full disk never replaces a good
artifact with half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from lmlab import __version__
from lmlab.errors import UserError

MANIFEST = "manifest.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode())


_GIT_COMMIT: str | None = None


def git_commit() -> str:
    global _GIT_COMMIT
    if _GIT_COMMIT is None:
        try:
            root = Path(__file__).resolve().parent.parent
            _GIT_COMMIT = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                capture_output=True, text=True, timeout=5,
            ).stdout.strip() or "unknown"
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            if dirty and _GIT_COMMIT != "unknown":
                _GIT_COMMIT += "-dirty"
        except (OSError, subprocess.SubprocessError):
            _GIT_COMMIT = "unknown"
    return _GIT_COMMIT


def read_manifest(path: str | Path) -> dict | None:
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


_VERB_OF_KIND = {"packed": "pack", "model": "pretrain", "hf_export": "export"}


def require_artifact(path: str | Path, kind: str | tuple[str, ...], what: str = "input") -> dict:
    """Load the manifest of an input artifact, or stop with a message saying what to run."""
    kinds = (kind,) if isinstance(kind, str) else kind
    p = Path(path)
    if not p.exists():
        verb = _VERB_OF_KIND.get(kinds[0], kinds[0])
        raise UserError(f"{what} not found: {p} (run `lmlab {verb}` first, or fix the path)")
    m = read_manifest(p)
    if m is None:
        raise UserError(f"{what} {p} has no readable {MANIFEST}; it is not an lmlab {kinds[0]} artifact (or it is incomplete)")
    if m.get("kind") not in kinds:
        raise UserError(f"{what} {p} is a '{m.get('kind')}' artifact, expected {' or '.join(repr(k) for k in kinds)}")
    return m


def stage_fingerprint(kind: str, config: dict, inputs: dict[str, str]) -> str:
    return fingerprint({"kind": kind, "config": config, "inputs": inputs})


def is_up_to_date(out: str | Path, fp: str) -> bool:
    m = read_manifest(out)
    return bool(m and m.get("fingerprint") == fp and m.get("complete", True))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(out: str | Path, kind: str, config: dict, fp: str, inputs: dict[str, dict] | None = None,
                   tokenizer_sha256: str | None = None, timings: dict | None = None,
                   stats: dict | None = None, complete: bool = True) -> dict:
    m = {
        "kind": kind,
        "fingerprint": fp,
        "complete": complete,
        "config": config,
        "inputs": inputs or {},
        "tokenizer_sha256": tokenizer_sha256,
        "lmlab_version": __version__,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "timings": timings or {},
        "stats": stats or {},
    }
    write_json_atomic(Path(out) / MANIFEST, m)
    return m


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it replaces `out` in one rename.

    On any exception (including KeyboardInterrupt and a full disk) the temporary directory
    is removed and the previous `out`, if any, is left untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


class Timer:
    """Collects named wall-clock timings for a manifest: `with timer("tokenize"): ...`."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t, 3)

    def total(self) -> dict[str, float]:
        return {**self.timings, "total_s": round(time.perf_counter() - self._t0, 3)}


def disk_error(e: OSError, out: str | Path) -> UserError:
    """Translate ENOSPC and friends into a user message that says the old artifact survived."""
    import errno
    if e.errno == errno.ENOSPC:
        return UserError(f"out of disk space while writing {out}; nothing was replaced "
                         f"(the previous artifact, if any, is intact). Free space and re-run.")
    return UserError(f"could not write {out}: {e.strerror or e}")
