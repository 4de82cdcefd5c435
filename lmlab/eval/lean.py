"""Checking model-written Lean 4 proofs: the share of generated proofs that Lean accepts.

    from lmlab.eval.lean import LeanConfig, LeanVerifier
    cfg = LeanConfig(project="~/lean/mathproj")                 # a Lean project with Mathlib built
    with LeanVerifier(cfg) as lean:
        v = lean.verify("import Mathlib", "theorem t : 1 + 1 = 2 := by norm_num")
        v.ok, v.reason, v.messages, v.error, v.time_s
        vs = lean.verify_many([(header, body), ...])             # in the order given

Two backends behind one interface (`LeanConfig.backend`):
  repl  a pool of `workers` REPL processes (leanprover-community/repl, started as
        `lake env repl` in `project`), one thread each. The REPL reads one JSON command
        followed by a blank line on stdin and answers one JSON object followed by a blank line
        on stdout. Each process elaborates a header (`import Mathlib` ...) once, with
        `{"cmd": header}`, and runs every proof with that header on top of the environment it
        returned, `{"cmd": body, "env": N}`, because importing Mathlib takes seconds to
        minutes while a proof usually takes well under one. A proof that times out, crashes
        the process or gets output that is not JSON counts as failed with the reason in
        words; the process is killed (its whole process group) and restarted for the next
        proof, which elaborates the header again.
  http  a Kimina Lean Server (project-numina/kimina-lean-server): `POST {url}/verify` with
        `{"codes": [{"custom_id", "proof"}], "timeout", "infotree_type", "disable_cache"}`,
        answered `{"results": [{"custom_id", "error", "response"}]}` where `response` is the
        REPL's own answer, so both backends are judged by the same `judge`.

A proof is valid only when Lean's answer has no message of severity "error", no `sorries`
entry and no "declaration uses 'sorry'" warning (`judge`). Accepting means only that: Lean does
not look for `axiom` declarations or other tricks in the proof text, and neither does this.

Problems the user can fix (no Lean installed, a wrong `project`, a header that does not
elaborate, a server that cannot be reached) raise `UserError` with the fix. The real REPL was
not run on lmlab's development machines: tests/test_lean.py drives tests/lean_standin.py, a
program that speaks the same protocol (docs/lean.md).
"""

from __future__ import annotations

import collections
import json
import math
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence

from pydantic import Field

from lmlab.config import Strict
from lmlab.errors import UserError

try:  # imported here, not in the child after fork, so preexec_fn runs no import machinery
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None

_DOCS = "see docs/lean.md"
# Both spellings: Lean before v4.28 wrote 'sorry' in straight quotes, later ones in backticks.
_SORRY_WARNING = re.compile(r"declaration uses ['`]sorry['`]")


class LeanConfig(Strict):
    """Where Lean runs and how long a proof may take."""

    backend: Literal["repl", "http"] = Field("repl", description="repl = local REPL processes; http = a Kimina Lean Server")
    project: Optional[str] = Field(None, description="repl: the Lean project (with Mathlib built) the REPL runs in, as its cwd")
    command: list[str] = Field(default_factory=lambda: ["lake", "env", "repl"],
                               description="repl: how to start one REPL, run in `project` (e.g. "
                                           "[lake, env, /path/to/repl/.lake/build/bin/repl])")
    workers: int = Field(4, ge=1, description="repl: REPL processes run at once; http: requests in flight at once")
    timeout_s: float = Field(60.0, gt=0, description="seconds one proof may take before it counts as failed")
    memory_mb: int = Field(8192, ge=0, description="repl: address-space cap (RLIMIT_AS) per REPL process, MiB (0 = none)")
    header_timeout_s: float = Field(600.0, gt=0, description="repl: seconds to elaborate a header such as `import Mathlib`")
    url: str = Field("http://localhost:8000", description="http: the Kimina Lean Server (its /verify endpoint is used)")
    api_key: Optional[str] = Field(None, description="http: sent as `Authorization: Bearer KEY`")
    batch_size: int = Field(8, ge=1, description="http: proofs per request")


@dataclass
class Verdict:
    """One proof's outcome.

    `ok`: Lean accepted it. `messages`: Lean's messages, as the REPL gave them (positions are
    relative to the body for the repl backend, to header + blank line + body for http).
    `error`: why no judgement was possible (timeout, crash, malformed output, REPL error,
    HTTP error), in words; None when Lean answered. `reason`: the judgement in words ("ok",
    the first error, "uses sorry") or the error. `time_s`: seconds the proof took (the header
    is not counted).
    """

    ok: bool
    messages: list[dict] = field(default_factory=list)
    error: Optional[str] = None
    time_s: float = 0.0
    reason: str = ""


def judge(response: dict) -> tuple[bool, str]:
    """(valid, reason) for one REPL answer to a command.

    Valid means: no message of severity "error", no `sorries` entry and no warning saying the
    declaration uses sorry. The warning is checked as well as `sorries` because the REPL lists
    sorries from the info trees, and a sorry reached in a way it does not see still gets the
    warning. Info messages and other warnings (linters) do not matter.
    """
    if not isinstance(response, dict):
        return False, f"malformed response: expected a JSON object, got {type(response).__name__}"
    if "message" in response and "env" not in response:  # the REPL's own error, e.g. "Unknown environment."
        return False, f"REPL error: {_one_line(str(response['message']))}"
    messages = response.get("messages") or []
    if not isinstance(messages, list):
        return False, "malformed response: `messages` is not a list"
    for m in messages:
        if isinstance(m, dict) and m.get("severity") == "error":
            return False, f"Lean error{_where(m)}: {_one_line(str(m.get('data', '')))}"
    sorries = response.get("sorries") or []
    if sorries:
        return False, f"the proof uses sorry ({len(sorries)} sorr{'y' if len(sorries) == 1 else 'ies'})"
    for m in messages:
        if isinstance(m, dict) and _SORRY_WARNING.search(str(m.get("data", ""))):
            return False, f"the proof uses sorry ({_one_line(str(m.get('data')))}{_where(m)})"
    return True, "ok"


def _where(m: dict) -> str:
    pos = m.get("pos")
    if isinstance(pos, dict) and "line" in pos:
        return f" at line {pos.get('line')}, column {pos.get('column')}"
    return ""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _verdict(response: dict, time_s: float) -> Verdict:
    ok, reason = judge(response)
    if reason.startswith(("REPL error", "malformed")):  # no judgement of the proof was possible
        return Verdict(False, [], reason, time_s, reason)
    messages = [m for m in response.get("messages") or [] if isinstance(m, dict)]
    return Verdict(ok, messages, None, time_s, reason)


def _failed(error: str, time_s: float) -> Verdict:
    return Verdict(False, [], error, time_s, error)


# ---------------------------------------------------------------------------------------------
# One REPL process
# ---------------------------------------------------------------------------------------------


class ReplFailure(Exception):
    """The process did not answer a command: timeout, crash or output that is not JSON. The
    process has been killed; the next request starts a fresh one."""


def memory_limit(memory_mb: int) -> Optional[Callable[[], None]]:
    """A preexec_fn capping the child's address space at `memory_mb` MiB (None for no cap).

    The limit is computed here, in the parent, so the function run in the forked child is one
    C call: between fork and exec only that is safe while other threads run. It is clamped to
    the hard limit the parent already has, which an unprivileged child could not raise.
    """
    if memory_mb <= 0 or resource is None:
        return None
    limit = memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return preexec


def check_command(command: Sequence[str], project: str) -> None:
    """UserError unless `command` can be started in `project` (checked before any process)."""
    if not command:
        raise UserError("LeanConfig.command is empty: set it to how one Lean REPL is started, "
                        f"e.g. [lake, env, repl] ({_DOCS})")
    exe = command[0]
    if os.sep in exe or (os.altsep and os.altsep in exe):
        # A relative path is resolved against the project, which is the child's cwd.
        path = exe if os.path.isabs(exe) else os.path.join(project, exe)
        found = os.path.isfile(path) and os.access(path, os.X_OK)
    else:
        found = shutil.which(exe) is not None
    if not found:
        raise UserError(
            f"the Lean REPL command {exe!r} was not found (LeanConfig.command = {list(command)}): Lean 4 and the "
            "REPL must be installed. Install Lean with elan (https://github.com/leanprover/elan), build "
            "https://github.com/leanprover-community/repl with `lake build`, and set LeanConfig.command to start "
            f"it, e.g. [lake, env, /path/to/repl/.lake/build/bin/repl] ({_DOCS})")


def check_project(project: Optional[str]) -> str:
    if not project:
        raise UserError("LeanConfig.project is not set: set it to a Lean 4 project with Mathlib built "
                        f"(`lake exe cache get && lake build` in it), where the REPL will run ({_DOCS})")
    path = os.path.abspath(os.path.expanduser(project))
    if not os.path.isdir(path):
        raise UserError(f"the Lean project directory {path} does not exist: set LeanConfig.project to a Lean 4 "
                        f"project with Mathlib built, e.g. one made by `lake new myproj math` ({_DOCS})")
    return path


def _describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "closed its output"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _kill_group(proc: subprocess.Popen) -> None:
    # The whole session: `lake env repl` runs the REPL as a child of lake, and killing only
    # lake would leave Lean running, holding gigabytes and the stdout pipe.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.stdin.close()
    except (OSError, ValueError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered
        pass


class ReplProcess:
    """One REPL subprocess and the header environments elaborated in it.

    A reader thread turns stdout into a queue of lines so a command can wait for its answer
    with a deadline (a hung Lean never blocks the caller); another keeps the tail of stderr,
    which is where a crashing REPL or `lake` says why. The child gets its own session, so a
    kill reaches the REPL that `lake env` started as well as `lake` itself.

    Not thread-safe for concurrent requests: the pool gives each process to one thread at a
    time. `kill` may come from another thread (closing the pool).
    """

    def __init__(self, command: Sequence[str], project: str, memory_mb: int = 0):
        self.command = list(command)
        self.project = str(project)
        self.memory_mb = memory_mb
        self.starts = 0  # processes started so far (1 + restarts)
        self._proc: Optional[subprocess.Popen] = None
        self._lines: Optional[queue.SimpleQueue] = None
        self._stderr: collections.deque = collections.deque(maxlen=40)
        self._stderr_thread: Optional[threading.Thread] = None
        self._headers: dict[str, int] = {}  # header text -> env id, valid for the current process only
        self._lock = threading.Lock()
        self._closed = False

    @property
    def alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        if self._closed:  # a worker still running when its pool was closed must not start another
            raise RuntimeError("this ReplProcess was closed")
        if self.alive:
            return
        self.kill()  # what is left of an earlier process
        lines: queue.SimpleQueue = queue.SimpleQueue()
        tail: collections.deque = collections.deque(maxlen=40)
        try:
            proc = subprocess.Popen(
                self.command, cwd=self.project, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                start_new_session=True, preexec_fn=memory_limit(self.memory_mb))
        except FileNotFoundError:
            if not os.path.isdir(self.project):
                check_project(self.project)
            check_command(self.command, self.project)
            raise UserError(f"the Lean REPL command {self.command[0]!r} was not found; set LeanConfig.command ({_DOCS})")
        except PermissionError as e:
            raise UserError(f"the Lean REPL command {self.command[0]!r} cannot be run ({e}): make it executable or fix "
                            f"LeanConfig.command ({_DOCS})") from None
        except (OSError, subprocess.SubprocessError) as e:
            raise UserError(f"the Lean REPL {self.command} could not be started ({e}); check LeanConfig.command "
                            f"and LeanConfig.memory_mb ({_DOCS})") from None
        # Threads bound to this process's pipes and queue: after a restart, a stale reader can
        # only ever write into the old, discarded queue.
        threading.Thread(target=self._read_stdout, args=(proc.stdout, lines), daemon=True,
                         name="lean-repl-stdout").start()
        err = threading.Thread(target=self._read_stderr, args=(proc.stderr, tail), daemon=True,
                               name="lean-repl-stderr")
        err.start()
        with self._lock:
            closed = self._closed
            if not closed:
                self._proc, self._lines, self._stderr, self._stderr_thread = proc, lines, tail, err
                self._headers = {}
                self.starts += 1
        if closed:  # closed while this one was starting: it must not outlive the pool
            _kill_group(proc)
            raise RuntimeError("this ReplProcess was closed")

    @staticmethod
    def _read_stdout(stream, lines: queue.SimpleQueue) -> None:
        try:
            for line in stream:
                lines.put(line)
        except (OSError, ValueError):
            pass
        finally:
            lines.put(None)  # end of output: the process exited or closed stdout

    @staticmethod
    def _read_stderr(stream, tail: collections.deque) -> None:
        # Drained continuously so a chatty process never blocks on a full pipe.
        try:
            for line in stream:
                tail.append(line.rstrip("\n"))
        except (OSError, ValueError):
            pass

    def stderr_tail(self, n: int = 10) -> str:
        return " | ".join(list(self._stderr)[-n:])

    def kill(self) -> None:
        """Kill the process group and forget its environments."""
        with self._lock:
            proc, self._proc = self._proc, None
            self._headers = {}
        if proc is not None:
            _kill_group(proc)

    def close(self) -> None:
        """Kill the process for good (nothing to save: the REPL's state lives only in memory)."""
        self._closed = True
        self.kill()

    def request(self, payload: dict, timeout: float) -> dict:
        """Send one command and return the REPL's JSON answer; ReplFailure (process killed) when
        it times out, exits or prints something that is not a JSON object."""
        if not self.alive:
            self.start()
        proc, lines = self._proc, self._lines
        if proc is None or lines is None:  # closed from another thread just now
            raise RuntimeError("this ReplProcess was closed")
        try:
            # One line of JSON (json.dumps escapes newlines) and the blank line ending the command.
            proc.stdin.write(json.dumps(payload, ensure_ascii=False) + "\n\n")
            proc.stdin.flush()
        except (OSError, ValueError):
            raise self._crashed(proc) from None
        deadline = time.monotonic() + timeout
        got: list[str] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ReplFailure(f"timeout: Lean gave no answer within {timeout:g} s (the REPL was killed "
                                  "and is restarted for the next proof)")
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise self._crashed(proc)
            if not line.strip():
                if got:
                    break
                continue  # blank lines before an answer
            got.append(line)
        text = "".join(got)
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            self.kill()
            raise ReplFailure(f"malformed output: the REPL answered {_one_line(text, 200)!r}, which is not a JSON "
                              "object (the REPL was killed and is restarted for the next proof)")
        return answer

    def _crashed(self, proc: subprocess.Popen) -> ReplFailure:
        try:
            code = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = None
        self.kill()
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=1)  # let the last words reach the tail
        err = self.stderr_tail()
        hint = ""
        if self.memory_mb and (re.search(r"memory|bad_alloc", err, re.I) or (code is not None and code < 0)):
            hint = f"; it may have hit the memory cap, LeanConfig.memory_mb = {self.memory_mb}"
        return ReplFailure(f"crash: the REPL {_describe_exit(code)} without answering"
                           f"{' (stderr: ' + _one_line(err, 400) + ')' if err else ''}{hint}")

    def header_env(self, header: str, timeout: float) -> Optional[int]:
        """The env id of `header` in this process, elaborating it on first use; None for no header.

        A header that does not elaborate is the user's to fix (a missing import, Mathlib not
        built, too little memory) and would fail every proof, so it raises UserError."""
        if not header.strip():
            return None
        env = self._headers.get(header)
        if env is not None and self.alive:
            return env
        try:
            answer = self.request({"cmd": header}, timeout)
        except ReplFailure as e:
            raise UserError(f"the Lean header {_one_line(header, 80)!r} could not be elaborated: {e}. Check that "
                            "LeanConfig.command starts the REPL in LeanConfig.project, that Mathlib is built there "
                            "(`lake exe cache get && lake build`), and LeanConfig.header_timeout_s / memory_mb "
                            f"({_DOCS})") from None
        errors = [m for m in answer.get("messages") or [] if isinstance(m, dict) and m.get("severity") == "error"]
        if "message" in answer and "env" not in answer:
            errors = [{"data": answer["message"]}]
        if errors:
            raise UserError(f"the Lean header {_one_line(header, 80)!r} does not elaborate: "
                            f"{_one_line(str(errors[0].get('data', '')))}{_where(errors[0])}. Fix the header, or "
                            f"make its imports available in LeanConfig.project (e.g. build Mathlib) ({_DOCS})")
        env = answer.get("env")
        if not isinstance(env, int):
            self.kill()
            raise UserError(f"the Lean REPL answered the header without an `env` ({_one_line(json.dumps(answer), 200)}): "
                            f"LeanConfig.command does not start leanprover-community/repl? ({_DOCS})")
        self._headers[header] = env
        return env

    def check(self, header: str, body: str, timeout: float, header_timeout: float) -> Verdict:
        """Run `body` on top of `header` and judge Lean's answer; never raises for a bad proof."""
        env = self.header_env(header, header_timeout)
        start = time.monotonic()
        try:
            answer = self.request({"cmd": body} if env is None else {"cmd": body, "env": env}, timeout)
        except ReplFailure as e:
            return _failed(str(e), time.monotonic() - start)
        verdict = _verdict(answer, time.monotonic() - start)
        if verdict.error and "Unknown environment" in verdict.error:
            self._headers.pop(header, None)  # elaborate it again for the next proof
        return verdict


# ---------------------------------------------------------------------------------------------
# Backends and the verifier
# ---------------------------------------------------------------------------------------------


Progress = Callable[[int, int], None]  # (done, total), called in the caller's thread


class _ReplPool:
    def __init__(self, cfg: LeanConfig):
        self.cfg = cfg
        project = check_project(cfg.project)
        check_command(cfg.command, project)
        self.processes = [ReplProcess(cfg.command, project, cfg.memory_mb) for _ in range(cfg.workers)]
        self._idle: queue.SimpleQueue = queue.SimpleQueue()  # processes no thread is using
        for p in self.processes:
            self._idle.put(p)  # started on first use

    def verify_many(self, items: Sequence[tuple[str, str]], progress: Optional[Progress]) -> list[Verdict]:
        n = len(items)
        results: list[Optional[Verdict]] = [None] * n
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(n):
            todo.put(i)
        out: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()
        cfg = self.cfg

        def work() -> None:
            proc = self._idle.get()
            try:
                while not stop.is_set():
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    header, body = items[i]
                    out.put((i, proc.check(header, body, cfg.timeout_s, cfg.header_timeout_s), None))
            except BaseException as e:  # a UserError (bad header) stops the run; handed to the caller
                out.put((None, None, e))
            finally:
                self._idle.put(proc)

        threads = [threading.Thread(target=work, daemon=True, name=f"lean-worker-{k}")
                   for k in range(min(cfg.workers, n))]
        for t in threads:
            t.start()
        done = 0
        try:
            while done < n:
                i, verdict, exc = out.get()
                if exc is not None:
                    raise exc
                results[i] = verdict
                done += 1
                if progress is not None:
                    progress(done, n)
        finally:
            stop.set()  # on an error the other workers stop after their current proof
        for t in threads:
            t.join()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for p in self.processes:
            p.close()


class _HttpBackend:
    def __init__(self, cfg: LeanConfig):
        self.cfg = cfg
        url = cfg.url.rstrip("/")
        self.endpoint = url if url.endswith("/verify") else url + "/verify"

    def verify_many(self, items: Sequence[tuple[str, str]], progress: Optional[Progress]) -> list[Verdict]:
        n = len(items)
        results: list[Optional[Verdict]] = [None] * n
        size = self.cfg.batch_size
        batches = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
        done = 0
        with ThreadPoolExecutor(max_workers=max(1, min(self.cfg.workers, len(batches)))) as pool:
            futures = [pool.submit(self._batch, [(i, items[i]) for i in b]) for b in batches]
            try:
                for fut in futures:  # in order; progress comes per finished batch
                    verdicts = fut.result()
                    for i, verdict in verdicts:
                        results[i] = verdict
                    done += len(verdicts)
                    if progress is not None:
                        progress(done, n)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return results  # type: ignore[return-value]

    def _batch(self, batch: list[tuple[int, tuple[str, str]]]) -> list[tuple[int, Verdict]]:
        # The server splits the imports off the code itself and reuses REPLs that have the same
        # header, so header and body travel as one file.
        codes = [{"custom_id": str(i), "proof": (h + "\n\n" + b) if h.strip() else b} for i, (h, b) in batch]
        start = time.monotonic()
        answer, error = self._post(codes)
        wall = time.monotonic() - start
        if error is not None:
            return [(i, _failed(error, wall)) for i, _ in batch]
        by_id = {}
        for r in answer.get("results") or []:
            if isinstance(r, dict):
                by_id[str(r.get("custom_id"))] = r
        out = []
        for i, _ in batch:
            r = by_id.get(str(i))
            out.append((i, self._verdict(r, wall)))
        return out

    @staticmethod
    def _verdict(result: Optional[dict], wall: float) -> Verdict:
        if result is None:
            return _failed("malformed output: the server returned no result for this proof", wall)
        response = result.get("response")
        t = response.get("time") if isinstance(response, dict) else None
        time_s = float(t) if isinstance(t, (int, float)) else wall
        if result.get("error"):
            err = str(result["error"])
            kind = "timeout" if "timed out" in err else "server error"
            return _failed(f"{kind}: {_one_line(err)}", time_s)
        if not isinstance(response, dict):
            return _failed("malformed output: the server's result has neither `response` nor `error`", time_s)
        return _verdict(response, time_s)

    def _post(self, codes: list[dict]) -> tuple[dict, Optional[str]]:
        """(answer, None), or ({}, error in words) for a failure that costs only this batch."""
        cfg = self.cfg
        body = json.dumps({"codes": codes, "timeout": max(1, math.ceil(cfg.timeout_s)),
                           "infotree_type": None, "disable_cache": False}).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"  # what kimina-lean-server's auth reads
        req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        # A socket timeout, not a deadline for the whole request: the server may run the batch
        # one proof at a time, so allow each proof its timeout, plus slack for the transfer.
        wait = cfg.timeout_s * len(codes) + 30
        try:
            with urllib.request.urlopen(req, timeout=wait) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = _one_line(e.read().decode("utf-8", "replace"), 200)
            if e.code in (401, 403):
                raise UserError(f"the Lean server at {self.endpoint} refused the API key (HTTP {e.code}: {detail}): "
                                f"set LeanConfig.api_key to the server's LEAN_SERVER_API_KEY ({_DOCS})") from None
            if e.code in (404, 405):
                raise UserError(f"{self.endpoint} has no POST /verify (HTTP {e.code}): LeanConfig.url must point at a "
                                f"Kimina Lean Server ({_DOCS})") from None
            return {}, f"http error {e.code}: {detail}"
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                return {}, f"timeout: the Lean server gave no answer within {wait:g} s"
            raise UserError(f"cannot reach the Lean server at {self.endpoint} ({e.reason}): start kimina-lean-server "
                            f"there or fix LeanConfig.url ({_DOCS})") from None
        except (TimeoutError, socket.timeout):
            return {}, f"timeout: the Lean server gave no answer within {wait:g} s"
        except (ConnectionError, OSError) as e:
            return {}, f"http error: the connection to the Lean server failed ({e})"
        try:
            answer = json.loads(raw.decode("utf-8"))
        except ValueError:
            return {}, f"malformed output: the server answered {_one_line(raw.decode('utf-8', 'replace'), 200)!r}"
        if not isinstance(answer, dict):
            return {}, "malformed output: the server's answer is not a JSON object"
        return answer, None

    def close(self) -> None:
        pass


class LeanVerifier:
    """Checks (header, body) proofs with the backend `cfg.backend` names; a context manager.

    `verify(header, body)` checks one proof; `verify_many(items, progress)` checks many at
    once (up to `cfg.workers` in flight) and returns verdicts in the order of `items`;
    `progress(done, total)` is called in the caller's thread after each result (repl) or
    batch (http). A proof that fails for any reason is a Verdict with ok=False; only problems
    the user must fix (see the module docstring) raise UserError.
    """

    def __init__(self, cfg: LeanConfig | dict | None = None):
        if cfg is None:
            cfg = LeanConfig()
        elif isinstance(cfg, dict):
            cfg = LeanConfig(**cfg)
        self.cfg = cfg
        self._backend = _HttpBackend(cfg) if cfg.backend == "http" else _ReplPool(cfg)
        self._closed = False

    @property
    def processes(self) -> list[ReplProcess]:
        """The repl backend's processes (empty for http), for diagnostics."""
        return list(getattr(self._backend, "processes", []))

    def verify(self, header: str, body: str) -> Verdict:
        return self.verify_many([(header, body)])[0]

    def verify_many(self, items: Sequence[tuple[str, str]], progress: Optional[Progress] = None) -> list[Verdict]:
        if self._closed:
            raise RuntimeError("LeanVerifier is closed")
        checked = []
        for k, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
                raise TypeError(f"item {k} must be a (header, body) pair of strings, got {item!r:.80}")
            checked.append((item[0], item[1]))
        if not checked:
            return []
        return self._backend.verify_many(checked, progress)

    def close(self) -> None:
        self._closed = True
        self._backend.close()

    def __enter__(self) -> "LeanVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten verifier must not leave REPLs holding gigabytes
        try:
            if not self._closed:
                self._backend.close()
        except Exception:
            pass
