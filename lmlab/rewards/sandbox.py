"""Run model-written Python in a throw-away sandbox: the engine of the code reward (GRPO, best-of-N).

    from lmlab.rewards.sandbox import SandboxLimits, isolation, run_python
    r = run_python("print(1)")                      # r.ok, r.stdout == "1\\n", r.reason == "ok"
    r = run_python("import time; time.sleep(9)", limits=SandboxLimits(timeout_s=1))  # r.timed_out, reason "timeout"
    isolation()                                     # which layers this machine gives, probed once

Each program runs as a fresh `python -I -S -B` (no user site, no site-packages, no bytecode
written, environment scrubbed to PATH/LANG/HOME/TMPDIR) in its own session and process group,
in a new `tempfile.mkdtemp` directory that is its cwd, HOME and TMPDIR and is removed
afterwards. Layers, outermost first (docs/sandbox.md has the full account):

  namespaces   where unshare(2) is allowed (root, or a user namespace): new network namespace
               (only a loopback that is down: nothing to connect to), PID namespace (the
               program is its init: when it ends or is killed, the kernel kills every process
               it started), mount namespace in which every mount is read-only except the
               sandbox directory, IPC and UTS namespaces.
  own uid      as real root, the program then drops to a random unprivileged uid (its own
               RLIMIT_NPROC count, no capabilities, no access to root's files; the
               interpreter's stdlib is re-exposed read-only when it lives under /root).
  audit hook   installed before the program starts: refuses sockets, starting programs,
               fork (unless max_processes > 1 and the kernel can count them), signals,
               writes/creates/removes/renames/chmods outside the sandbox directory, ctypes and
               other modules that bypass the hook, raising rlimits. A refusal raises
               PermissionError and marks the run as failed even if the program catches it.
  rlimits      CPU seconds, address space, file size, open files, processes, no core files.
  supervisor   wall-clock timeout (SIGKILL to the namespace's init, or the process group),
               output kept up to `max_output_bytes` per stream and the program killed when it
               writes 4x that, never buffered beyond the cap.

Without namespaces (a user without user namespaces, or LMLAB_SANDBOX_OS_ISOLATION=0) the
program runs with the hook, the rlimits and the supervisor only; `isolation()` says which
layers are active and each `SandboxResult.layers` what that run got. A failure of the sandbox
itself (no ctypes, unshare refused, mkdtemp failing) never raises: the run falls back to the
remaining layers, or returns a failed result whose reason starts with "sandbox error".

This is defence in depth against accidents of model-written code (infinite loops, memory
blow-ups, fork loops, stray writes, network calls), not a security boundary against a
determined attacker; run untrusted code in a container or VM as well.

Overhead per program (`print(1)`, wall clock from call to result, median of 30, on the idle
2-core build machine as root): 26 ms with every layer, 19 ms with the in-process layers only,
against 12 ms for a bare `python -I -S -B -c 'print(1)'`; two threads ran ~37 programs/s.
Under a load of 5 on those 2 cores the medians were ~55 and ~42 ms. The bootstrap is compiled
once per process and loaded with marshal; json, re, signal and the ctypes package are avoided
in the child because each costs milliseconds of import.

This module is the caller's side; what runs inside the sandboxed interpreter is in
sandbox_child.py (bootstrap, namespaces, mounts, uid, rlimits, supervisor) and sandbox_hook.py.
"""

from __future__ import annotations

import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from lmlab.errors import UserError
from lmlab.rewards.sandbox_child import _STUB, _bootstrap_file

# Every sandboxed interpreter carries this word in its argv, so a test (or an operator) can
# find stray sandbox processes with `pgrep -f lmlab-sandbox`.
MARKER = "lmlab-sandbox"

# The program's own output is capped per stream; the status channel (layers, refusals) too.
_STATUS_CAP = 64 * 1024
# A program writing this many times its cap is killed rather than read (and discarded) forever.
_KILL_FACTOR = 4
# Grace for the in-sandbox supervisor to enforce the timeout before the caller kills the group.
_SUPERVISOR_GRACE_S = 0.5

_OS_LAYERS = ("network_namespace", "pid_namespace", "mount_namespace", "ipc_namespace", "uts_namespace",
              "user_namespace", "readonly_filesystem", "separate_uid", "no_new_privs")


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use. `cpu_s` defaults to ceil(timeout_s)."""

    timeout_s: float = 5.0  # wall clock, from start to kill
    cpu_s: Optional[int] = None  # RLIMIT_CPU seconds
    memory_mb: int = 512  # RLIMIT_AS: address space, so the interpreter's own ~30 MB count too
    max_output_bytes: int = 64 * 1024  # kept of stdout and of stderr each; the rest is discarded
    max_processes: int = 1  # processes, the program itself included (1 = fork refused)
    max_threads: int = 8  # threads besides each process's main one; with an own uid the kernel caps
    #                       processes + threads at max_processes + max_threads (RLIMIT_NPROC)
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file the program may write
    max_open_files: int = 64  # RLIMIT_NOFILE
    network: bool = False  # True: no network namespace and sockets allowed

    def __post_init__(self) -> None:
        def bad(name, value, want):
            raise UserError(f"sandbox limit {name}={value!r} is invalid; it must be {want}")

        if not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            bad("timeout_s", self.timeout_s, "a positive number of seconds")
        if self.cpu_s is None:
            object.__setattr__(self, "cpu_s", max(1, math.ceil(self.timeout_s)))
        for name, low in (("cpu_s", 1), ("memory_mb", 16), ("max_output_bytes", 0), ("max_processes", 1),
                          ("max_threads", 0), ("file_size_mb", 0), ("max_open_files", 8)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                bad(name, value, f"an integer >= {low}")
        if not isinstance(self.network, bool):
            bad("network", self.network, "true or false")


@dataclass
class SandboxResult:
    """What happened to one program. `ok`: exit 0, in time, nothing refused, not killed for output."""

    ok: bool
    returncode: Optional[int]  # negative: killed by that signal; None: it never started
    timed_out: bool  # stopped at the wall-clock timeout or at the CPU limit (reason: "timeout" / "cpu")
    stdout: str
    stderr: str
    reason: str  # ok | timeout | memory | cpu | output cap | refused: ... | exit N | signal NAME | sandbox error: ...
    duration_s: float
    truncated: bool = False  # stdout or stderr was longer than max_output_bytes
    refused: list = field(default_factory=list)  # what the audit hook refused, in order
    layers: dict = field(default_factory=dict)  # the isolation this run actually got



# ----------------------------------------------------------------------------- the caller's side

def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _rmtree(path: str) -> None:
    """Remove the sandbox directory even where the program chmod-ed things unreadable."""
    def unlock(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=unlock)
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def _failed(reason: str, start: float) -> SandboxResult:
    return SandboxResult(ok=False, returncode=None, timed_out=False, stdout="", stderr="", reason=reason,
                         duration_s=time.monotonic() - start)


def _run(source: str, stdin: str, limits: SandboxLimits, os_isolation: bool, audit_hook: bool = True) -> SandboxResult:
    """One program through the sandbox; `os_isolation` asks for namespaces and the own uid."""
    start = time.monotonic()
    try:
        work = os.path.realpath(tempfile.mkdtemp(prefix="lmlab-sbx-"))
    except OSError as e:
        return _failed(f"sandbox error: no temporary directory ({e})", start)
    stdin_file = None
    status_r = status_w = -1
    try:
        try:
            with open(os.path.join(work, "main.py"), "w", encoding="utf-8", errors="replace") as f:
                f.write(source)
            os.chmod(os.path.join(work, "main.py"), 0o644)  # readable to the program's own uid
            if stdin:
                stdin_file = tempfile.TemporaryFile()  # a file, not a pipe: no writer thread, no deadlock
                stdin_file.write(stdin.encode("utf-8", "replace"))
                stdin_file.seek(0)
            status_r, status_w = os.pipe()
            uid = 0
            if os_isolation and os.geteuid() == 0:
                import random

                uid = random.SystemRandom().randrange(1 << 30, (1 << 31) - 2)  # unused by anyone else
            mib = 1024 * 1024
            argv = [sys.executable or "python3", "-I", "-S", "-B", "-c", _STUB, MARKER, _bootstrap_file(),
                    f"work={work}", f"status={status_w}", f"timeout={limits.timeout_s}", f"cpu={limits.cpu_s}",
                    f"mem={limits.memory_mb * mib}", f"fsize={limits.file_size_mb * mib}",
                    f"nofile={limits.max_open_files}", f"nproc={limits.max_processes}",
                    f"nthreads={limits.max_threads}", f"uid={uid}",
                    f"os={int(os_isolation)}", f"hook={int(audit_hook)}", f"network={int(limits.network)}"]
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": work, "TMPDIR": work}
            proc = subprocess.Popen(argv, stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,),
                                    close_fds=True, start_new_session=True, env=env, cwd=work)
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            return _failed(f"sandbox error: the program could not be started ({e})", start)
        finally:
            if status_w >= 0:
                os.close(status_w)
            if stdin_file is not None:
                stdin_file.close()
        try:
            return _supervise_from_outside(proc, status_r, limits, start, os_isolation)
        finally:
            os.close(status_r)
    finally:
        _rmtree(work)


def _supervise_from_outside(proc: subprocess.Popen, status_r: int, limits: SandboxLimits, start: float,
                            namespaced: bool) -> SandboxResult:
    """Read the output under its caps, enforce the deadline, kill the group, build the result."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    cap = limits.max_output_bytes
    kill_bytes = max(_KILL_FACTOR * cap, 64 * 1024)
    keep = {out_fd: bytearray(), err_fd: bytearray(), status_r: bytearray()}
    caps = {out_fd: cap, err_fd: cap, status_r: _STATUS_CAP}
    total = {out_fd: 0, err_fd: 0, status_r: 0}
    err_tail = b""
    poller = select.poll()
    for fd in keep:
        poller.register(fd, select.POLLIN)
    try:
        pidfd = os.pidfd_open(proc.pid)  # readable when the program exits; it does not reap
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):
        pidfd = -1
    # With namespaces the in-sandbox supervisor kills at the deadline (and tears the namespace
    # down before it exits); the caller's kill is the backstop.
    kill_at = start + limits.timeout_s + (_SUPERVISOR_GRACE_S if namespaced else 0.0)
    killed = None
    exited = False
    open_fds = set(keep)

    def read(fd: int) -> None:
        nonlocal err_tail, killed
        chunk = os.read(fd, 65536)
        if not chunk:
            poller.unregister(fd)
            open_fds.discard(fd)
            return
        total[fd] += len(chunk)
        room = caps[fd] - len(keep[fd])
        if room > 0:
            keep[fd] += chunk[:room]
        if fd == err_fd:
            err_tail = (err_tail + chunk)[-2048:]
        if fd != status_r and total[fd] > kill_bytes and killed is None:
            _kill_group(proc.pid)
            killed = "output cap"

    try:
        while not exited:
            now = time.monotonic()
            if killed is None and now >= kill_at:
                _kill_group(proc.pid)
                killed = "timeout"
            wait_ms = 50 if killed else max(1, int((kill_at - now) * 1000) + 1)
            if pidfd < 0:
                wait_ms = min(wait_ms, 10)
            for fd, _ev in poller.poll(wait_ms):
                if fd == pidfd:
                    exited = True
                    poller.unregister(pidfd)
                elif fd in open_fds:
                    read(fd)
            if pidfd < 0:
                if hasattr(os, "waitid"):  # exited, but left unreaped so its group id stays ours
                    exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
                else:  # macOS: no waitid; reaping early leaves a tiny window for pid reuse
                    exited = proc.poll() is not None
        # The leader has exited but is not reaped yet, so its group id cannot be reused: kill
        # whatever is left in the group (a fork that outlived its parent without namespaces).
        _kill_group(proc.pid)
        drain_until = time.monotonic() + 1.0
        while open_fds and time.monotonic() < drain_until:
            for fd, _ev in poller.poll(50):
                if fd in open_fds:
                    read(fd)
        proc.wait()
    finally:
        if pidfd >= 0:
            os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
        if proc.returncode is None:
            _kill_group(proc.pid)
            proc.kill()
            proc.wait()

    layers: dict = {}
    refused: list = []
    in_timeout = cpu_killed = False
    for line in bytes(keep[status_r]).decode("utf-8", "replace").splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "L" and not layers:  # written before the program runs; later ones are forgeries
            for item in rest.split():
                k, _, v = item.partition("=")
                layers[k] = v == "1"
        elif kind == "N":
            layers.setdefault("notes", []).append(rest)
        elif kind == "R":
            refused.append(rest)
        elif kind == "T":
            in_timeout = True
        elif kind == "C":
            cpu_killed = True
    if layers:
        layers["output_cap"] = True
        layers["process_group"] = True
    rc = proc.returncode
    # Out of time is out of time, by the wall clock or by the CPU limit (with cpu_s =
    # ceil(timeout_s) a busy loop meets both at once; `reason` says which one won).
    cpu_out = rc is not None and rc != 0 and (cpu_killed or rc == -signal.SIGXCPU)
    timed_out = killed == "timeout" or in_timeout or cpu_out
    if killed == "timeout" or in_timeout:
        reason = "timeout"
    elif cpu_out:
        reason = "cpu"
    elif killed == "output cap":
        reason = "output cap"
    elif refused:
        reason = "refused: " + refused[0]
    elif rc == 0:
        reason = "ok"
    elif rc < 0:
        reason = "file size" if rc == -signal.SIGXFSZ else f"signal {_signal_name(-rc)}"
    elif b"MemoryError" in err_tail:
        reason = "memory"
    elif b"File too large" in err_tail:
        reason = "file size"
    else:
        reason = f"exit {rc}"
    return SandboxResult(
        ok=rc == 0 and not timed_out and killed is None and not refused, returncode=rc, timed_out=timed_out,
        stdout=bytes(keep[out_fd]).decode("utf-8", "replace"), stderr=bytes(keep[err_fd]).decode("utf-8", "replace"),
        reason=reason, duration_s=time.monotonic() - start, truncated=total[out_fd] > cap or total[err_fd] > cap,
        refused=refused, layers=layers)


_ISOLATION_LOCK = threading.Lock()
_ISOLATION: Optional[dict] = None


def _os_isolation_allowed() -> bool:
    return os.environ.get("LMLAB_SANDBOX_OS_ISOLATION", "1").strip().lower() not in ("0", "false", "no", "off")


def isolation() -> dict:
    """Which layers this machine gives a program, probed once (one sandboxed `pass`) and cached.

    Keys: network_namespace, pid_namespace, mount_namespace, ipc_namespace, uts_namespace,
    user_namespace, readonly_filesystem, separate_uid, no_new_privs, audit_hooks, rlimits,
    output_cap, process_group (bools) and notes (why a layer is missing).
    """
    global _ISOLATION
    with _ISOLATION_LOCK:
        if _ISOLATION is None:
            found: dict = {}
            notes: list = []
            if _os_isolation_allowed():
                probe = _run("pass", "", SandboxLimits(timeout_s=20), os_isolation=True)
                found = dict(probe.layers)
                if not probe.ok:
                    notes.append(f"probe failed ({probe.reason}): {probe.stderr.strip()[-300:]}")
            else:
                notes.append("namespaces and the own uid are off (LMLAB_SANDBOX_OS_ISOLATION=0)")
            result = {k: bool(found.get(k, False)) for k in _OS_LAYERS}
            result.update(audit_hooks=True, rlimits=bool(found.get("rlimits", True)), output_cap=True,
                          process_group=True, notes=list(found.get("notes", [])) + notes)
            _ISOLATION = result
        return {k: (list(v) if isinstance(v, list) else v) for k, v in _ISOLATION.items()}


def run_python(source: str, *, stdin: str = "", limits: SandboxLimits = SandboxLimits(),
               os_isolation: Optional[bool] = None) -> SandboxResult:
    """Run `source` as a Python program in the sandbox; never raises for anything the program does.

    `os_isolation`: None (default) uses every layer `isolation()` found; False runs with the
    in-process layers only (audit hook, rlimits, supervisor), e.g. to compare, or where
    namespaces misbehave (also LMLAB_SANDBOX_OS_ISOLATION=0).
    """
    if not isinstance(source, str):
        raise UserError(f"run_python needs the program as a string, got {type(source).__name__}")
    use_os = False
    if os_isolation is not False and _os_isolation_allowed():
        use_os = isolation()["pid_namespace"]
    return _run(source, stdin or "", limits, os_isolation=use_os)
