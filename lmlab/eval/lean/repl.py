"""The repl backend: one Lean REPL subprocess (`ReplProcess`) and a pool of them (`ReplPool`).

leanprover-community/repl, started as `lake env repl` in the Lean project, reads one JSON
command followed by a blank line on stdin and answers one JSON object followed by a blank line
on stdout. Each process elaborates a header (`import Mathlib` ...) once, with `{"cmd":
header}`, and runs every proof with that header on top of the environment it returned,
`{"cmd": body, "env": N}`, because importing Mathlib takes seconds to minutes while a proof
usually takes well under one. A proof that times out, crashes the process or gets output that
is not JSON counts as failed with the reason in words; the process is killed (its whole
process group) and restarted for the next proof, which elaborates the header again.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from typing import Callable, Optional, Sequence

from lmlab.errors import UserError
from lmlab.eval.lean.verdict import DOCS, LeanConfig, Progress, Verdict, failed, one_line, verdict_of, where

try:  # imported here, not in the child after fork, so preexec_fn runs no import machinery
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None


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
                        f"e.g. [lake, env, repl] ({DOCS})")
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
            f"it, e.g. [lake, env, /path/to/repl/.lake/build/bin/repl] ({DOCS})")


def check_project(project: Optional[str]) -> str:
    if not project:
        raise UserError("LeanConfig.project is not set: set it to a Lean 4 project with Mathlib built "
                        f"(`lake exe cache get && lake build` in it), where the REPL will run ({DOCS})")
    path = os.path.abspath(os.path.expanduser(project))
    if not os.path.isdir(path):
        raise UserError(f"the Lean project directory {path} does not exist: set LeanConfig.project to a Lean 4 "
                        f"project with Mathlib built, e.g. one made by `lake new myproj math` ({DOCS})")
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
            raise UserError(f"the Lean REPL command {self.command[0]!r} was not found; set LeanConfig.command ({DOCS})")
        except PermissionError as e:
            raise UserError(f"the Lean REPL command {self.command[0]!r} cannot be run ({e}): make it executable or fix "
                            f"LeanConfig.command ({DOCS})") from None
        except (OSError, subprocess.SubprocessError) as e:
            raise UserError(f"the Lean REPL {self.command} could not be started ({e}); check LeanConfig.command "
                            f"and LeanConfig.memory_mb ({DOCS})") from None
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
            raise ReplFailure(f"malformed output: the REPL answered {one_line(text, 200)!r}, which is not a JSON "
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
                           f"{' (stderr: ' + one_line(err, 400) + ')' if err else ''}{hint}")

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
            raise UserError(f"the Lean header {one_line(header, 80)!r} could not be elaborated: {e}. Check that "
                            "LeanConfig.command starts the REPL in LeanConfig.project, that Mathlib is built there "
                            "(`lake exe cache get && lake build`), and LeanConfig.header_timeout_s / memory_mb "
                            f"({DOCS})") from None
        errors = [m for m in answer.get("messages") or [] if isinstance(m, dict) and m.get("severity") == "error"]
        if "message" in answer and "env" not in answer:
            errors = [{"data": answer["message"]}]
        if errors:
            raise UserError(f"the Lean header {one_line(header, 80)!r} does not elaborate: "
                            f"{one_line(str(errors[0].get('data', '')))}{where(errors[0])}. Fix the header, or "
                            f"make its imports available in LeanConfig.project (e.g. build Mathlib) ({DOCS})")
        env = answer.get("env")
        if not isinstance(env, int):
            self.kill()
            raise UserError(f"the Lean REPL answered the header without an `env` ({one_line(json.dumps(answer), 200)}): "
                            f"LeanConfig.command does not start leanprover-community/repl? ({DOCS})")
        self._headers[header] = env
        return env

    def check(self, header: str, body: str, timeout: float, header_timeout: float) -> Verdict:
        """Run `body` on top of `header` and judge Lean's answer; never raises for a bad proof."""
        env = self.header_env(header, header_timeout)
        start = time.monotonic()
        try:
            answer = self.request({"cmd": body} if env is None else {"cmd": body, "env": env}, timeout)
        except ReplFailure as e:
            return failed(str(e), time.monotonic() - start)
        verdict = verdict_of(answer, time.monotonic() - start)
        if verdict.error and "Unknown environment" in verdict.error:
            self._headers.pop(header, None)  # elaborate it again for the next proof
        return verdict




class ReplPool:
    """`workers` REPL processes, one thread each; each proof goes to whichever process is free."""

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

