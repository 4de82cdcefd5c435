"""Chunked, resumable stages: the finished chunks of an unfinished run, kept on disk so that an
interrupted run redoes nothing and duplicates nothing (`lmlab samples`, `lmlab hidden-pairs`).

    store = ChunkStore(out, fp, n_chunks, "samples", kind="samples", suffix=".jsonl", config=config)
    kept = store.open()                    # {chunk: bytes} that state.json vouches for; `out` is now a run dir
    for c in range(n_chunks):
        if c not in kept:
            store.keep(c, make(c), seconds)  # the chunk's bytes first, then state.json naming them
    whole = b"".join(store.data[c] for c in range(n_chunks))   # then the stage writes its artifact

While the run is unfinished `out` is a run directory (`run.json`, as training runs mark theirs)
holding `chunks/chunk_00000{suffix}`, ... (each written atomically when done) and
`chunks/state.json`: the run's fingerprint, the chunk count, each finished chunk's sha256 and
time, and the config. A chunk whose bytes differ from its recorded sha256 (edited, damaged) is
made again. A run with another fingerprint (a changed config, model or input file) either starts
over, saying so (`on_change="restart"`), or is refused with the config fields that changed
(`on_change="refuse"`), so that a resumed run never mixes the chunks of two configurations.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Literal, Optional

from lmlab import artifacts
from lmlab.errors import Interrupted, UserError

CHUNKS = "chunks"
STATE = "state.json"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ChunkStore:
    def __init__(self, out: str | Path, fp: str, n_chunks: int, verb: str, *, kind: str, suffix: str,
                 config: Optional[dict] = None, on_change: Literal["restart", "refuse"] = "restart",
                 chunk_size: Optional[int] = None, done_word: str = "done", outputs: tuple[str, ...] = ()):
        self.out, self.fp, self.n_chunks, self.verb, self.kind = Path(out), fp, n_chunks, verb, kind
        self.suffix, self.config, self.on_change, self.chunk_size = suffix, config or {}, on_change, chunk_size
        self.done_word, self.outputs = done_word, outputs  # the finished artifact's files: gone while unfinished
        self.state: dict = {}
        self.data: dict[int, bytes] = {}

    def path(self, c: int) -> Path:
        return self.out / CHUNKS / f"chunk_{c:05d}{self.suffix}"

    def _read_state(self) -> tuple[dict[int, bytes], Optional[dict]]:
        """(the chunks state.json vouches for, the other run's state when its fingerprint differs)."""
        try:
            state = json.loads((self.out / CHUNKS / STATE).read_text())
        except (OSError, ValueError):
            return {}, None
        if not isinstance(state, dict):
            return {}, None
        if state.get("fingerprint") != self.fp or state.get("chunks") != self.n_chunks:
            return {}, state
        kept: dict[int, bytes] = {}
        finished = state.get("finished") if isinstance(state.get("finished"), dict) else {}
        for key, info in finished.items():
            try:
                c, data = int(key), self.path(int(key)).read_bytes()
            except (OSError, ValueError):
                continue
            if 0 <= c < self.n_chunks and isinstance(info, dict) and info.get("sha256") == artifacts.sha256_bytes(data):
                kept[c] = data
        self.state = {**state, "finished": {str(c): finished[str(c)] for c in sorted(kept)}}
        return kept, None

    def _changed(self, other: dict) -> str:
        old = other.get("config") if isinstance(other.get("config"), dict) else {}
        keys = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
        if keys:
            return ", ".join(f"{k} {old.get(k)!r} -> {self.config.get(k)!r}" for k in keys)
        return "an input's fingerprint (the model or a data file)"

    def open(self) -> dict[int, bytes]:
        """Mark `out` as an unfinished run and return the finished chunks it keeps."""
        kept, other = self._read_state()
        if other is not None and self.on_change == "refuse" and other.get("finished"):
            raise UserError(f"{self.out} holds an unfinished `lmlab {self.verb}` run of another configuration "
                            f"({self._changed(other)}); run it with its own settings to finish it, or give "
                            f"another out= (or delete {self.out}) to start this one")
        artifacts.start_run(self.out, self.kind, self.verb)  # from here on `out` is a run directory
        for name in self.outputs:  # an earlier finished artifact's files must not pass for this run's
            (self.out / name).unlink(missing_ok=True)
        if kept:
            print(f"{self.verb}: continuing {self.out}: {len(kept)} of {self.n_chunks} chunks already {self.done_word}")
            wanted = {self.path(c).name for c in kept} | {STATE}
            for p in (self.out / CHUNKS).iterdir():  # chunks state.json does not vouch for, temporary leftovers
                if p.name not in wanted and p.is_file():
                    p.unlink()
        else:
            if other is not None and other.get("finished"):
                print(f"{self.verb}: the chunks in {self.out / CHUNKS} are from another run ({self._changed(other)}); "
                      f"starting over", file=sys.stderr)
            shutil.rmtree(self.out / CHUNKS, ignore_errors=True)
            self.state = {"fingerprint": self.fp, "chunks": self.n_chunks, "finished": {}}
            if self.chunk_size is not None:
                self.state["chunk_size"] = self.chunk_size
        self.state["config"] = self.config
        (self.out / CHUNKS).mkdir(exist_ok=True)
        artifacts.write_json_atomic(self.out / CHUNKS / STATE, self.state)
        self.data = dict(kept)
        return kept

    def keep(self, c: int, data: bytes, seconds: float) -> None:
        """Chunk c is done: its bytes first, so that state.json never names a missing chunk."""
        write_bytes_atomic(self.path(c), data)
        self.data[c] = data
        self.state["finished"][str(c)] = {"sha256": artifacts.sha256_bytes(data), "time_s": round(seconds, 3)}
        artifacts.write_json_atomic(self.out / CHUNKS / STATE, self.state)

    @contextlib.contextmanager
    def kept_on_stop(self, doing: str):
        """Ctrl-C and a full disk end the run with one line saying the finished chunks are kept and
        what the same command will do (`doing` the other chunks, e.g. "sample", or write the
        artifact); other disk errors name `out`."""
        where = self.out / CHUNKS
        try:
            yield
        except KeyboardInterrupt:
            left = self.n_chunks - self.finished
            rest = f"{doing} the other {left}" if left else f"write {self.outputs[0] if self.outputs else 'the result'}"
            raise Interrupted(f"stopped with {self.finished} of {self.n_chunks} chunks finished, kept in {where}; "
                              f"run the same command again to {rest}") from None
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise artifacts.disk_error(e, self.out) from None
            raise UserError(f"out of disk space while writing {self.out}; {self.finished} of {self.n_chunks} "
                            f"finished chunks are kept in {where}: free space and run the same command "
                            f"again") from None

    @property
    def finished(self) -> int:
        return len(self.state.get("finished", {}))

    def time_s(self) -> float:
        """Seconds over every finished chunk, whichever run made it."""
        return sum(float(info.get("time_s", 0.0)) for info in self.state.get("finished", {}).values())
