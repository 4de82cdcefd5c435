"""Artifact directories and their manifests.

A stage reads artifact directories and writes one. Each holds `manifest.json`:

    kind              corpus | tokenizer | packed | model | eval | report | hf_export | tasks | pairs
    verb              the `lmlab VERB` that made it (pretrain, sft and dpo all make a `model`)
    fingerprint       sha256 over (kind, resolved config, input fingerprints): same inputs and
                      config -> same fingerprint -> the stage is a no-op
    config            the resolved config
    inputs            {name: {"path", "fingerprint"}}
    tokenizer_sha256  the tokenizer's fingerprint where one is involved
    lmlab_version, git_commit, created, timings, stats

Writes are atomic: a stage builds its output in a temporary sibling directory and swaps it
into place only when complete, so a crash, Ctrl-C or a full disk never replaces a good
artifact with half of one. Before any work, `check_out` makes sure that what `out` holds may
be replaced at all: nothing, an empty directory, or an artifact of the same kind made by the
same verb; anything else (a user's files, a regular file, another stage's artifact) is
refused untouched. Training stages mark a run directory with `run.json` (kind, verb) before
they write into it, so an unfinished run is recognised before its manifest exists.
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
from typing import Any, Callable, Iterator

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


def stat_fingerprint(path: str | Path) -> str:
    """A cheap fingerprint of a file, or of a directory's files: names, sizes and mtimes (for
    multi-GB checkpoints, where hashing every byte on each run would cost more than the stage)."""
    p = Path(path)
    files = [f for f in p.iterdir() if f.is_file()] if p.is_dir() else [p]
    # the "hf" key is what sft's HF init fingerprinted before lmlab import shared this: kept, so
    # runs made then stay up to date
    return fingerprint({"hf": str(p.resolve()),
                        "files": sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files)})


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


def packed_inputs(manifest: dict, follow_init: bool = False) -> list[str]:
    """The packed artifacts that still exist among a model manifest's `data_*` inputs; with
    `follow_init`, a model trained on none (an SFT run on conversations) gives its init's, and so on."""
    for _ in range(8 if follow_init else 1):
        inputs = manifest.get("inputs") or {}
        paths = [v.get("path") for k, v in sorted(inputs.items()) if k.startswith("data") and isinstance(v, dict)]
        # Only packed artifacts: an SFT/DPO run's data (conversation files, tasks) has no val rows.
        found = [p for p in paths if p and Path(p).is_dir() and (read_manifest(p) or {}).get("kind") == "packed"]
        init = (inputs.get("init") or {}).get("path")
        if found or not follow_init or not init:
            return found
        manifest = read_manifest(init) or {}
    return []


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


def write_manifest(out: str | Path, kind: str, config: dict, fp: str, inputs: dict[str, dict] | None = None, *,
                   verb: str, tokenizer_sha256: str | None = None, timings: dict | None = None,
                   stats: dict | None = None, complete: bool = True) -> dict:
    """Write `out/manifest.json`; `verb` is the stage that made it, which `check_out` compares."""
    m = {
        "kind": kind,
        "verb": verb,
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
    is removed and the previous `out`, if any, is left untouched. On success whatever was at
    `out` is gone, so the stage must have called `check_out` first.
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


# ----------------------------------------------------------------------------- what `out` may be

RUN_MARKER = "run.json"
# The directory name a verb's output usually has, for the example in a refusal.
_OUT_NAME = {"pack": "packed", "pretrain": "model", "export": "hf"}


def _legacy_model_verb(config: dict) -> str:
    """The verb of a model made before manifests recorded one, from its config (the report's rule)."""
    return "dpo" if "beta" in config else "sft" if "init" in config else "pretrain"


def manifest_verb(m: dict) -> str | None:
    """The verb that made the artifact of manifest `m`: its `verb` field, or, for a model whose
    manifest predates that field, the verb its config implies. None for other old manifests."""
    verb = m.get("verb")
    # A manifest older than the `verb` field: every kind but `model` has one verb, so the same
    # kind is accepted as before (verb None). Three verbs make a model, and accepting any of
    # them would let `lmlab sft` overwrite an old pretrain run, so its config tells which.
    if verb is None and m.get("kind") == "model":
        verb = _legacy_model_verb(m.get("config") or {})
    return verb


def _legacy_run_verb(path: Path) -> str | None:
    """The verb of an unfinished run made before run.json existed, from its newest checkpoint's settings."""
    for trainer in sorted(path.glob("checkpoints/step_*/trainer.json"), reverse=True):
        try:
            saved = json.loads(trainer.read_text()).get("resume_config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(saved, dict):
            return _legacy_model_verb(saved)
    return None


def made_by(path: str | Path) -> tuple[str, str | None, bool] | None:
    """(kind, verb, finished) of the artifact or training run in directory `path`; None if it is neither.

    `verb` is None only where it cannot be known (a run older than run.json without checkpoints).
    """
    path = Path(path)
    m = read_manifest(path)
    if m is not None:
        return str(m.get("kind")), manifest_verb(m), True
    try:
        marker = json.loads((path / RUN_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict) and marker.get("kind"):
        return str(marker["kind"]), marker.get("verb"), False
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        return "model", _legacy_run_verb(path), False  # an unfinished run from before run.json
    return None


def _file_above(out: Path) -> Path | None:
    """The nearest existing ancestor of `out` when it is not a directory (so `out` cannot be made)."""
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


def _what(path: Path, kind: str, verb: str) -> tuple[str, str] | None:
    """(what is at `path` that `lmlab verb` must not replace, an extra hint) or None when it may replace it."""
    if not (path.exists() or path.is_symlink()):
        return None
    if not path.is_dir():
        kind_of = "broken symlink" if not path.exists() else "file" if path.is_file() else "special file"
        return f"is a {kind_of}, not a directory", ""
    found = made_by(path)
    if found is not None:
        k, v, finished = found
        if k == kind and (v is None or v == verb):
            return None  # the same stage's own output: replaced atomically, or a run continued
        by = f" made by `lmlab {v}`" if v else ""
        if finished:
            return f"holds {'an' if k[:1] in 'aeiou' else 'a'} '{k}' artifact{by}", ""
        return (f"holds an unfinished '{k}' run{by} (checkpoints, no manifest yet)",
                " (or finish that run by re-running the command that started it)")
    entries = sum(1 for _ in path.iterdir())
    if entries == 0:
        return None
    return (f"is a directory with {entries} entr{'y' if entries == 1 else 'ies'} but no readable {MANIFEST} "
            f"(not an lmlab artifact)", " (or empty that directory yourself)")


def _suggest(out: Path, kind: str, verb: str, inputs: list[Path], suggest: Path | None) -> Path | None:
    """A nearby free out (absent or empty): `suggest`, or the verb's usual name next to `out`, made unique.

    Free, not merely allowed: an existing artifact of the same stage could be replaced, but a
    refusal should not point the user at something else they would lose."""
    above = _file_above(out)
    base = suggest or (above or out).parent / _OUT_NAME.get(verb, verb)
    for i in range(1, 10):
        cand = base if i == 1 else base.with_name(f"{base.name}-{i}")
        r = cand.resolve()
        free = not (cand.exists() or cand.is_symlink()) or (cand.is_dir() and not any(cand.iterdir()))
        if (r != out.resolve() and _file_above(cand) is None and free
                and not any(r == p or p.is_relative_to(r) for p in inputs)):
            return cand
    return None


def check_out(out: str | Path, kind: str, verb: str, *, inputs: dict[str, str | Path | None] | None = None,
              suggest: str | Path | None = None) -> None:
    """Refuse (UserError, nothing touched) an `out` that `lmlab verb` must not replace.

    `out` may be absent, an empty directory, or an artifact of `kind` made by `verb` (which
    the stage replaces atomically, or continues when it is a training run, finished or not).
    A regular file, a directory of someone's files, another kind's artifact, a model made by
    another training verb, a path below a file, or one of the stage's own `inputs` ({name:
    path}) is refused with one line that says what is there and which out to use instead.
    Call it first in `run`, before any expensive work and before anything is written.
    """
    out = Path(out)
    given = [(name, Path(p)) for name, p in (inputs or {}).items() if p]
    resolved = [p.resolve() for _, p in given]

    def refuse(problem: str, hint: str = "") -> UserError:
        sug = _suggest(out, kind, verb, resolved, Path(suggest) if suggest else None)
        return UserError(f"out={out} {problem}; choose another out" + (f", e.g. out={sug}" if sug else "") + hint)

    above = _file_above(out)
    if above is not None:
        raise refuse(f"is below {above}, which is a file, not a directory, so `lmlab {verb}` cannot create it")
    for (name, p), r in zip(given, resolved):
        if r == out.resolve():
            raise refuse(f"is the {name} itself, which `lmlab {verb}` would replace")
        if r.is_relative_to(out.resolve()):
            raise refuse(f"contains the {name} {p}, which `lmlab {verb}` would replace")
    what = _what(out, kind, verb)
    if what is not None:
        raise refuse(f"{what[0]}, which `lmlab {verb}` would replace", what[1])


def start_run(out: str | Path, kind: str, verb: str) -> None:
    """Mark `out` as an unfinished `verb` run before training writes into it (after `check_out`).

    The marker is written before the manifest is removed, so at every moment the directory says
    which stage owns it; a re-run then continues it and every other stage refuses it.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RUN_MARKER, {"kind": kind, "verb": verb, "lmlab_version": __version__,
                                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    (out / MANIFEST).unlink(missing_ok=True)  # the run is not complete until training finishes


def check_out_file(out: str | Path, verb: str, ours: Callable[[Path], bool], example: str) -> None:
    """The guard for a stage whose `out` is one file (generate, bench), like `check_out` for directories.

    `out` may be absent or a file this verb wrote (`ours(path)` says so; it is then replaced);
    a directory, a path below a file, or any other file is refused. `example` is a file name
    for the suggestion.
    """
    out = Path(out)
    above = _file_above(out)
    if above is not None:
        raise UserError(f"out={out} is below {above}, which is a file, not a directory, so `lmlab {verb}` cannot "
                        f"create it; choose another out, e.g. out={above.parent / example}")
    if out.is_dir():
        raise UserError(f"out={out} is a directory, and `lmlab {verb}` writes one file; choose another out, "
                        f"e.g. out={out / example}")
    if (out.exists() or out.is_symlink()) and not ours(out):
        free = out.with_name(example if out.name != example else f"{verb}-{example}")
        raise UserError(f"out={out} is a file that `lmlab {verb}` did not write, which it would replace; "
                        f"choose another out, e.g. out={free}")


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
    above = _file_above(Path(out)) if e.errno in (errno.EEXIST, errno.ENOTDIR) else None
    if above is not None:  # mkdir says only "File exists" when a parent is a file
        return UserError(f"could not write {out}: its parent {above} is a file, not a directory; "
                         f"choose another out")
    return UserError(f"could not write {out}: {e.strerror or e}")
