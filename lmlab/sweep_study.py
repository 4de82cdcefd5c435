"""The Optuna study behind `lmlab sweep`, shared by every worker: storage, lock, dead workers, and
its record (OUT/sweep.json, from which lmlab/report/sweep.py draws summary.md).

Storage is a journal file (default OUT/optuna.journal; appends guarded by Optuna's
`JournalFileOpenLock`, an O_CREAT|O_EXCL lock file, which is atomic on NFSv3+ and local
filesystems, where fcntl locks, and so SQLite, are not to be trusted) or an RDB URL
(`sqlite:///sweep.db`, `postgresql://...`). The sweep's own bookkeeping -- count the
finished trials, take a new one, write sweep.json -- happens under a second lock file,
OUT/.sweep.lock, so that N workers never start more than the trials still missing.

A worker stamps its trial with `worker` (host:pid) and refreshes a `heartbeat` time every
HEARTBEAT_S seconds. A RUNNING trial is stale when its process is gone (same host) or its
heartbeat is older than STALE_S; `reclaim_stale` then marks it FAIL and enqueues its
parameters with its run directory, so the next trial taken continues that run from its
checkpoint instead of losing it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from lmlab import artifacts
from lmlab.errors import UserError

HEARTBEAT_S = 20.0
STALE_S = 120.0  # well above HEARTBEAT_S: a slow shared filesystem may delay a heartbeat or two
LOCK_GRACE_S = 60  # a sweep lock held this long belongs to a dead process (held for ~1 s normally)
DONE = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts toward --trials


def open_storage(storage: str | None, out: Path):
    """An Optuna storage: a journal file (default OUT/optuna.journal, or any path) or an RDB URL."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if storage and "://" in storage:
        try:
            return RDBStorage(storage)
        except ImportError as e:
            raise UserError(f"storage {hide_password(storage)} needs a database driver that is not installed "
                            f"({e}); pip install it (e.g. psycopg2-binary for postgresql)") from None
        except Exception as e:  # sqlalchemy's errors: a bad URL, an unreachable server
            raise UserError(f"cannot open storage {hide_password(storage)}: {str(e).splitlines()[0]}") from None
    path = Path(storage) if storage else out / "optuna.journal"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    except OSError as e:
        raise UserError(f"cannot open the journal {path}: {e.strerror}; choose another --storage") from None


def hide_password(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


@contextlib.contextmanager
def sweep_lock(out: Path):
    """Exclusive across processes and hosts that share OUT (the same lock file scheme as the journal)."""
    from optuna.storages.journal import JournalFileOpenLock

    lock = JournalFileOpenLock(str(out / ".sweep"), grace_period=LOCK_GRACE_S)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def open_study(storage, name: str, direction: str, definition: dict, where: str) -> optuna.Study:
    """Create the study or load it; a loaded one must have been started with the same definition."""
    try:  # loading first: create_study(load_if_exists) appends a journal line on every start
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        study = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise UserError(f"study '{name}' in {where} is to {study.direction.name.lower()}; pass --direction "
                        f"{study.direction.name.lower()}, or start a new sweep with another --study and --out")
    stored = study.user_attrs.get("lmlab_sweep")
    if stored is None:
        study.set_user_attr("lmlab_sweep", definition)
        return study
    changed = sorted(k for k in set(stored) | set(definition) if stored.get(k) != definition.get(k))
    if changed:
        raise UserError(f"study '{name}' in {where} was started with other settings ({', '.join(changed)} differ); "
                        f"re-run with the original ones, or start a new sweep with another --study and --out")
    return study


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_stale(t: optuna.trial.FrozenTrial, now: float) -> bool:
    """A RUNNING trial whose worker is gone. Called under the sweep lock, when this process runs
    no trial, so a trial stamped with this very pid is a leftover too."""
    host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
        return True
    started = t.datetime_start.timestamp() if t.datetime_start else now
    return now - max(float(t.user_attrs.get("heartbeat", 0.0)), started) > STALE_S


def requeue(study: optuna.Study, t: optuna.trial.FrozenTrial, why: str) -> None:
    """End a RUNNING trial as FAIL and enqueue its parameters with its run directory: the trial
    that takes them resumes that run from its checkpoint (the stage resumes exactly)."""
    study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    run_dir = t.user_attrs.get("run_dir")
    if run_dir:
        study.enqueue_trial(t.params, user_attrs={"run_dir": run_dir, "resumes": t.number, "resume_reason": why})
    print(f"sweep: trial {t.number} {why}" + (f"; its parameters are queued again to continue {run_dir}"
                                              if run_dir else ""), file=sys.stderr)


def reclaim_stale(study: optuna.Study) -> None:
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if is_stale(t, now):
            requeue(study, t, f"left running by worker {t.user_attrs.get('worker', '?')}, which stopped")


class Heartbeat:
    """Stamps `trial` with this worker and the time now, then every HEARTBEAT_S seconds from a
    thread until close()."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial, self.stop = trial, threading.Event()
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("heartbeat", time.time())
        self.thread = threading.Thread(target=self._beat, name="sweep-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.trial.set_user_attr("heartbeat", time.time())
            except Exception:  # the trial was reclaimed (finished) by another worker, or a storage hiccup
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def counts(trials) -> dict[str, int]:
    out = {s.name: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
                               TrialState.WAITING)}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def importance(study: optuna.Study, n_complete: int) -> tuple[dict | None, str]:
    """Optuna's parameter importance (PED-ANOVA, pure numpy) over the complete trials, or why not."""
    if n_complete < 2:
        return None, "parameter importance needs at least 2 complete trials"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # PED-ANOVA explicitly: Optuna 4's default (fANOVA) needs scikit-learn
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), ""
    except Exception as e:  # too few distinct values, a single-parameter space, ...
        return None, f"parameter importance not available: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def record(study: optuna.Study, header: dict) -> dict:
    """Everything sweep.json holds: the header (definition, target), counts, best, importance, trials."""
    trials = study.get_trials(deepcopy=False)
    n = counts(trials)
    successor = {t.user_attrs["resumes"]: t for t in trials if "resumes" in t.user_attrs}
    rows = []
    for t in trials:
        row = {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "run_dir": t.user_attrs.get("run_dir"),
               "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
               "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None,
               "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())}}
        after = successor.get(t.number)
        note = t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason") or ""
        if t.state == TrialState.FAIL and not note:
            note = after.user_attrs.get("resume_reason", "") if after else "its worker stopped"
        if after:
            note = (note + "; " if note else "") + f"continued by trial {after.number}"
        if "resumes" in t.user_attrs:
            note = (note + "; " if note else "") + f"continues trial {t.user_attrs['resumes']}"
        row["note"] = note
        rows.append(row)
    best = None
    if n["COMPLETE"]:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params, "run_dir": b.user_attrs.get("run_dir")}
    imp, imp_note = importance(study, n["COMPLETE"])
    return {**header, "counts": n, "finished": n["COMPLETE"] + n["PRUNED"], "best": best,
            "importance": imp, "importance_note": imp_note, "trials": rows}


def write_outputs(study, header: dict, out: Path, summary: bool = True) -> dict:
    """sweep.json when the study changed; with `summary`, summary.md and its plots when they are
    not those of the current sweep.json (it names its sha256), so a no-op re-run writes nothing."""
    from lmlab.report.sweep import write_summary

    rec = record(study, header)
    path = out / "sweep.json"
    text = json.dumps(rec, indent=2, default=str) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        artifacts.write_json_atomic(path, rec)
    sha = artifacts.sha256_bytes(text.encode("utf-8"))
    md = out / "summary.md"
    if summary and (not md.is_file() or sha not in md.read_text(encoding="utf-8")):
        write_summary(rec, out, source_sha256=sha)
    return rec
