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


# ----------------------------------------------------------------------------- the in-sandbox side

def _bootstrap():
    """Runs inside the fresh interpreter (`python -I -S -B -c _STUB`, which loads it compiled).

    Self-contained and stdlib-only: it sees none of lmlab. It avoids json and re (each costs
    several ms of import per program). The process tree it builds with namespaces:
    supervisor (caller's pid namespace; enforces the timeout, reports the exit) -> program
    (init of a new pid namespace: when it exits every process it started dies with it).
    Without namespaces the first process is the program itself. It returns (code, globals)
    for `exec`, having cleared __main__ so the program sees a fresh module.
    """
    import os
    import resource  # imported before the fork: the supervisor must not import while the
    import sys  # program's side remounts (and briefly hides) the stdlib in their shared namespace

    args = dict(a.split("=", 1) for a in sys.argv[3:])  # ["-c", MARKER, bootstrap file, k=v, ...]
    work = args["work"]
    status_fd = int(args["status"])
    timeout = float(args["timeout"])
    want_os = args["os"] == "1"
    want_hook = args["hook"] == "1"
    network = args["network"] == "1"
    nproc = int(args["nproc"])
    nthreads = int(args["nthreads"])
    sandbox_uid = int(args["uid"])

    def say(line):
        try:
            os.write(status_fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    layers = dict.fromkeys(("network_namespace", "pid_namespace", "mount_namespace", "ipc_namespace",
                            "uts_namespace", "user_namespace", "readonly_filesystem", "separate_uid",
                            "no_new_privs"), False)
    layers["audit_hooks"] = want_hook
    layers["rlimits"] = True
    notes = []
    libc = None
    pid1 = False
    userns = os.geteuid() != 0

    if want_os:
        try:
            libc = _libc()
        except Exception as e:  # a Python without ctypes: the hook and rlimits remain
            notes.append(f"no ctypes ({e})")
            libc = None

    if libc is not None:
        # If the caller dies (crash, SIGKILL), so does this supervisor, and with it the namespace.
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
        flags = 0x00020000 | 0x20000000 | 0x08000000 | 0x04000000  # NEWNS NEWPID NEWIPC NEWUTS
        if not network:
            flags |= 0x40000000  # NEWNET
        if userns:
            flags |= 0x10000000  # NEWUSER: an unprivileged user becomes root of its own namespace
        euid, egid = os.geteuid(), os.getegid()
        if libc.unshare(flags) != 0:
            notes.append(f"unshare refused ({os.strerror(libc.get_errno())}); running without namespaces")
        else:
            if userns:
                try:
                    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {euid} 1"), ("gid_map", f"0 {egid} 1")):
                        with open(f"/proc/self/{name}", "w") as f:
                            f.write(text)
                    layers["user_namespace"] = True
                except OSError as e:
                    notes.append(f"user namespace maps not written ({e})")
            try:
                child = os.fork()
            except OSError as e:
                notes.append(f"fork for the pid namespace failed ({e})")
                child = -1
            if child > 0:
                _supervise(child, timeout, float(args["cpu"]), say)  # never returns
            pid1 = child == 0
            layers.update(pid_namespace=pid1, ipc_namespace=True, uts_namespace=True, mount_namespace=True,
                          network_namespace=not network)

    if pid1:
        libc.prctl(1, 9, 0, 0, 0)  # the supervisor's death kills the namespace's init, hence all of it
        ms_rdonly, ms_nosuid, ms_nodev, ms_noexec, ms_remount, ms_bind, ms_rec, ms_private = (
            1, 2, 4, 8, 32, 4096, 16384, 1 << 18)

        def mount(src, target, fstype, flags, data=None):
            enc = (lambda s: None if s is None else os.fsencode(s))
            if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
                err = libc.get_errno()
                raise OSError(err, os.strerror(err), target)

        try:
            # Private first: no mount made below may ever propagate back to the caller's namespace.
            mount(None, "/", None, ms_rec | ms_private)
            private = True
        except OSError as e:
            notes.append(f"mounts stay shared ({e}); no read-only filesystem")
            private = False
        if private:
            try:  # a /proc that shows only this namespace's processes
                mount("proc", "/proc", "proc", ms_nosuid | ms_nodev | ms_noexec)
            except OSError as e:
                notes.append(f"no private /proc ({e})")
            drop = sandbox_uid > 0 and not userns
            try:
                mount(work, work, None, ms_bind)  # its own mount, so it stays writable below
                if drop:
                    drop = _expose_stdlib(mount, work, notes)
                failed = []
                with open("/proc/self/mountinfo", "rb") as f:
                    points = [_unescape(line.split(b" ")[4]) for line in f.read().splitlines() if line.count(b" ") > 4]
                for point in points:
                    if point == work:
                        continue
                    try:
                        # A bind remount replaces the per-mount flags: keep nodev/noexec (in a user
                        # namespace they are locked); without atime flags the kernel keeps those.
                        keep = os.statvfs(point).f_flag & (ms_nodev | ms_noexec)
                        mount(None, point, None, ms_remount | ms_bind | ms_rdonly | ms_nosuid | keep)
                    except OSError:
                        failed.append(point)
                layers["readonly_filesystem"] = "/" not in failed
                if failed:
                    notes.append("still writable: " + ", ".join(failed[:5]))
            except OSError as e:
                notes.append(f"read-only filesystem not set up ({e})")
                drop = False
            if drop and layers["readonly_filesystem"]:
                try:
                    os.chown(work, sandbox_uid, sandbox_uid)
                    os.setgroups([])
                    os.setgid(sandbox_uid)
                    os.setuid(sandbox_uid)
                    layers["separate_uid"] = os.getuid() == sandbox_uid
                except OSError as e:
                    notes.append(f"uid not dropped ({e})")
        # No exec may gain privileges (setuid binaries, file capabilities) from here on.
        layers["no_new_privs"] = libc.prctl(38, 1, 0, 0, 0) == 0
    elif libc is not None:
        layers["no_new_privs"] = libc.prctl(38, 1, 0, 0, 0) == 0

    # ---- become the program
    os.chdir(work)
    cpu = int(args["cpu"])
    # An init process ignores SIGXCPU, so there the soft and hard limits meet and SIGKILL comes.
    limits = ((resource.RLIMIT_CPU, (cpu, cpu if pid1 else cpu + 1)),
              (resource.RLIMIT_AS, (int(args["mem"]),) * 2),
              (resource.RLIMIT_FSIZE, (int(args["fsize"]),) * 2),
              (resource.RLIMIT_NOFILE, (int(args["nofile"]),) * 2),
              (resource.RLIMIT_CORE, (0, 0)))
    # The kernel counts a uid's processes and threads together, and only its own uid (or user
    # namespace) makes the count the program's alone; root is never counted. Without one,
    # fork stays refused by the hook whatever max_processes says.
    counted = layers["separate_uid"] or layers["user_namespace"]
    if counted:
        limits += ((resource.RLIMIT_NPROC, (nproc + nthreads,) * 2),)
    for res, value in limits:
        try:
            resource.setrlimit(res, value)
        except (ValueError, OSError) as e:
            layers["rlimits"] = False
            notes.append(f"rlimit {res} not set ({e})")
    if not pid1:
        import _signal  # not `signal`: its enum import costs milliseconds

        # Backstop should the caller die: SIGALRM's default action ends the program.
        _signal.setitimer(_signal.ITIMER_REAL, timeout + 1.0)
    say("L " + " ".join(f"{k}={int(v)}" for k, v in layers.items()))
    for note in notes:
        say("N " + note)

    with open(os.path.join(work, "main.py"), encoding="utf-8") as f:
        source = f.read()
    if want_hook:
        _install_hook(work, status_fd, network, nproc > 1 and counted)
    libc = None
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.") or m == "_ctypes"]:
        del sys.modules[name]  # re-importing it is refused; the loaded copy must not linger

    main = sys.modules["__main__"]
    g = main.__dict__
    builtins = g["__builtins__"]
    g.clear()
    g.update(__name__="__main__", __builtins__=builtins, __file__=os.path.join(work, "main.py"),
             __doc__=None, __package__=None, __spec__=None, __loader__=None)
    sys.argv = [g["__file__"]]
    sys.path.insert(0, work)
    try:
        code = compile(source, g["__file__"], "exec", dont_inherit=True)
    except (SyntaxError, ValueError, MemoryError) as e:
        sys.excepthook(type(e), e, None)  # like `python main.py`: the error, no bootstrap frames
        raise SystemExit(1)
    return code, g


def _libc():
    """unshare, prctl and mount from libc, through _ctypes: the ctypes package itself costs ~6 ms
    of import per program, the bare extension ~1 ms."""
    import _ctypes

    class Int(_ctypes._SimpleCData):
        _type_ = "i"

    class ULong(_ctypes._SimpleCData):
        _type_ = "L"

    class CharP(_ctypes._SimpleCData):
        _type_ = "z"

    class VoidP(_ctypes._SimpleCData):
        _type_ = "P"

    class Func(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = Int

    class Lib:
        _handle = _ctypes.dlopen(None, 2)  # the process itself (libc), RTLD_NOW
        get_errno = staticmethod(_ctypes.get_errno)

    for name, argtypes in (("unshare", (Int,)), ("prctl", (Int, ULong, ULong, ULong, ULong)),
                           ("mount", (CharP, CharP, CharP, ULong, VoidP))):
        f = Func((name, Lib))
        f.argtypes = argtypes
        setattr(Lib, name, f)
    return Lib


def _supervise(child, timeout, cpu, say):
    """The supervisor: wait for the namespace's init, kill it at the timeout, exit as it did."""
    import _signal as signal  # already loaded; `signal` would import enum from a stdlib being remounted
    import os
    import resource

    fired = []

    def on_alarm(*_):
        fired.append(True)
        os.kill(child, signal.SIGKILL)  # the init of the pid namespace: the kernel kills the rest

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    _, status, usage = os.wait4(child, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    if fired:
        say("T")
    elif os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and \
            usage.ru_utime + usage.ru_stime >= cpu - 0.05:
        say("C")  # an init gets SIGKILL, not SIGXCPU, at its CPU limit
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), sig)  # die of the same signal, so the caller sees what the program did
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _unescape(raw):
    """A mountinfo path: octal escapes (\\040 for a space) decoded."""
    import os

    parts = raw.split(b"\\")
    out = parts[0]
    for part in parts[1:]:
        out += bytes([int(part[:3], 8)]) + part[3:]
    return os.fsdecode(out)


def _expose_stdlib(mount, work, notes):
    """Make the interpreter's import path readable to another uid (pyenv under /root is 0700).

    A directory on the way that others cannot enter gets a small tmpfs mounted over it, and
    the stdlib directories are bind-mounted back at their own paths: the program can import
    the stdlib but sees nothing else of that tree. False when that cannot be done.
    """
    import os
    import stat
    import sys

    def blocker(path):
        sofar = ""
        for part in path.strip("/").split("/"):
            sofar += "/" + part
            if not os.stat(sofar).st_mode & stat.S_IXOTH:
                return sofar
        return None

    dirs = sorted({os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)})
    dirs = [d for d in dirs if not any(d.startswith(o + "/") for o in dirs)]
    try:
        if blocker(os.path.dirname(work)):
            notes.append(f"uid not dropped: others cannot enter {blocker(os.path.dirname(work))} (set TMPDIR)")
            return False
        todo = [(b, d) for d in dirs for b in [blocker(d)] if b]
        for b, d in todo:
            if b == d or work == b or work.startswith(b + "/"):
                notes.append(f"uid not dropped: {d} is not readable by others")
                return False
            if not os.stat(d).st_mode & stat.S_IROTH:
                notes.append(f"uid not dropped: {d} is not readable by others")
                return False
        fds = [(d, os.open(d, os.O_PATH | os.O_DIRECTORY)) for _, d in todo]
        tops = sorted({b for b, _ in todo})
        for b in [t for t in tops if not any(t.startswith(o + "/") for o in tops)]:
            mount("tmpfs", b, "tmpfs", 2 | 4, "mode=0755,size=64k")  # nosuid, nodev
        for d, fd in fds:
            os.makedirs(d, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", d, None, 4096 | 16384)  # MS_BIND | MS_REC
            os.close(fd)
    except OSError as e:
        notes.append(f"uid not dropped: stdlib not re-exposed ({e})")
        return False
    return True


def _install_hook(work, status_fd, network, fork_ok):
    """The audit hook (PEP 578). It reads nothing mutable after installation: every function and
    constant it uses is bound as a default argument (changing those is itself refused), so a
    program monkeypatching os, posixpath or builtins cannot change its decisions."""
    import os
    import stat
    import sys

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    dev_ok = frozenset(("/dev/null", "/dev/stdout", "/dev/stderr", "/dev/fd/1", "/dev/fd/2", "/proc/self/fd/1",
                        "/proc/self/fd/2"))
    blocked_imports = frozenset(("ctypes", "_ctypes", "_posixshmem", "_multiprocessing", "_dbm", "_gdbm",
                                 # already loaded and stripped below: a fresh copy would be whole again
                                 "posix", "_signal", "_posixsubprocess"))
    blocked_prefixes = ("ctypes.", "_test", "_xx")  # _xxsubinterpreters: a new interpreter has no hook
    start = frozenset(("os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "pty.spawn",
                       "os.startfile"))
    one_path = frozenset(("os.mkdir", "os.rmdir", "os.remove"))  # (path, ..., dir_fd)
    attr_paths = frozenset(("os.chmod", "os.chown", "os.utime", "os.chflags", "os.setxattr", "os.removexattr"))
    watched = (frozenset(("open", "import", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.rename",
                          "os.link", "os.symlink", "os.truncate", "sqlite3.connect", "resource.setrlimit",
                          "resource.prlimit", "object.__setattr__", "gc.get_objects", "gc.get_referrers",
                          "gc.get_referents")) | start | one_path | attr_paths)
    prefixes = frozenset(("ctypes.",) if network else ("ctypes.", "socket."))

    def refuse(what, _write=os.write, _fd=status_fd, _err=PermissionError, _oserror=OSError):
        try:
            _write(_fd, ("R " + what.replace("\n", " ")[:300] + "\n").encode("utf-8", "replace"))
        except _oserror:
            pass
        raise _err("sandbox: " + what)

    def as_text(path, _fspath=os.fspath, _bytes=bytes, _isinstance=isinstance):
        path = _fspath(path)
        return path.decode("utf-8", "surrogateescape") if _isinstance(path, _bytes) else path

    def resolve(path, _lstat=os.lstat, _readlink=os.readlink, _getcwd=os.getcwd, _islnk=stat.S_ISLNK,
                _oserror=OSError):
        """Absolute, '..'-free, symlinks followed: where a write would land (None: a link loop)."""
        if not path.startswith("/"):
            path = _getcwd() + "/" + path
        todo = path.split("/")[::-1]
        out = []
        hops = 0
        while todo:
            part = todo.pop()
            if part == "" or part == ".":
                continue
            if part == "..":
                if out:
                    out.pop()
                continue
            cand = "/" + "/".join(out + [part])
            try:
                st = _lstat(cand)
            except _oserror:
                out.append(part)
                continue
            if _islnk(st.st_mode):
                hops += 1
                if hops > 40:
                    return None
                target = _readlink(cand)
                if target.startswith("/"):
                    out = []
                todo.extend(target.split("/")[::-1])
            else:
                out.append(part)
        return "/" + "/".join(out)

    def check_write(path, dir_fd, what, _work=work, _inside=work + "/", _resolve=resolve, _text=as_text,
                    _int=int, _isinstance=isinstance, refuse=refuse):
        """Refuse a change at `path` unless it lands inside the sandbox directory."""
        if _isinstance(path, _int):
            refuse(f"{what} on an open file descriptor")
        p = _text(path)
        relative = not p.startswith("/")
        # '..' in a relative path could climb out of whatever directory a dir_fd names.
        if relative and ".." in p.split("/"):
            refuse(f"{what} {p!r}: a relative path with '..'")
        if relative and dir_fd is not None and dir_fd != -1:
            return  # relative to a directory fd: directories outside can never be opened
        r = _resolve(p)
        if r is None or (r != _work and not r.startswith(_inside)):
            refuse(f"{what} outside the sandbox directory: {p!r}")

    protected = []  # the hook's functions: their __code__ and __defaults__ must stay as they are

    def hook(event, args, _watched=watched, _prefixes=prefixes, _start=start, _one=one_path, _attr=attr_paths,
             _wflags=write_flags, _dev_ok=dev_ok, _bi=blocked_imports, _bp=blocked_prefixes, _fork_ok=fork_ok,
             _check=check_write, _text=as_text, _stat=os.stat, _isdir=stat.S_ISDIR, _work=work,
             _inside=work + "/", _resolve=resolve, _int=int, _str=str, _isinstance=isinstance,
             _oserror=OSError, _refuse=refuse, _protected=protected):
        if event not in _watched:
            if event[:7] in _prefixes:
                _refuse("network access" if event[:7] == "socket." else f"ctypes ({event})")
            return
        if event == "open":
            path, mode, flags = args
            if _isinstance(path, _int):
                return  # wrapping a descriptor the program already holds
            writing = (flags & _wflags) if _isinstance(flags, _int) else (
                _isinstance(mode, _str) and ("w" in mode or "a" in mode or "x" in mode or "+" in mode))
            p = _text(path)
            if writing:
                if p not in _dev_ok:
                    _check(p, None, "opening for writing")
                return
            try:
                st = _stat(p)
            except _oserror:
                return
            if _isdir(st.st_mode):  # a directory fd outside would make every dir_fd check moot
                r = _resolve(p)
                if r is None or (r != _work and not r.startswith(_inside)):
                    _refuse(f"opening a directory outside the sandbox: {p!r}")
        elif event == "import":
            name = args[0]
            if name in _bi or name.startswith(_bp):
                _refuse(f"importing {name}")
        elif event in _start:
            _refuse(f"starting another program ({event})")
        elif event == "os.fork" or event == "os.forkpty":
            if not _fork_ok:
                _refuse("fork (max_processes is 1)")
        elif event == "os.kill" or event == "os.killpg":
            _refuse("sending signals")
        elif event in _one:
            _check(args[0], args[-1], event)
        elif event == "os.rename" or event == "os.link":
            _check(args[0], args[2], event)
            _check(args[1], args[3], event)
        elif event == "os.symlink":
            _check(args[1], args[2], event)
            target = _text(args[0])
            if target.startswith("/") or ".." in target.split("/"):
                _refuse(f"a symlink to {target!r}: only relative links pointing down are allowed")
        elif event in _attr:
            _check(args[0], args[-1] if event in ("os.chmod", "os.chown", "os.utime") else None, event)
        elif event == "os.truncate":
            if not _isinstance(args[0], _int):  # a descriptor was checked when it was opened
                _check(args[0], None, event)
        elif event == "sqlite3.connect":
            db = _text(args[0])
            if db.startswith("file:"):
                _refuse("sqlite3 URI filenames")
            if db not in ("", ":memory:"):
                _check(db, None, "sqlite3.connect")
        elif event == "resource.setrlimit":
            _refuse("changing resource limits")
        elif event == "resource.prlimit":
            if args[2] is not None:
                _refuse("changing resource limits")
        elif event == "object.__setattr__":
            if args[0] in _protected:
                _refuse(f"changing the sandbox's own {args[1]}")
        else:  # gc.get_objects / get_referrers / get_referents: the way to the hook's internals
            _refuse(event)

    # Calls with no audit event, removed before the program starts: FIFOs and device nodes
    # outside the directory, leaving the process group, renicing or signalling other processes.
    import _posixsubprocess
    import _signal
    import posix

    for mod in (os, posix):
        for name in ("mkfifo", "mknod", "setsid", "setpgid", "setpgrp", "setpriority", "pidfd_open", "chroot"):
            if hasattr(mod, name):
                delattr(mod, name)
            if name in getattr(mod, "__all__", ()):
                mod.__all__.remove(name)  # `from os import *` must not trip over the gap
    if hasattr(_signal, "pidfd_send_signal"):
        delattr(_signal, "pidfd_send_signal")

    def fork_exec(*_, _refuse=refuse):
        _refuse("starting another program (_posixsubprocess)")

    _posixsubprocess.fork_exec = fork_exec
    protected.extend((hook, refuse, as_text, resolve, check_write, fork_exec))
    sys.addaudithook(hook)


# ----------------------------------------------------------------------------- the caller's side

_BOOT_LOCK = threading.Lock()
_BOOT_FILE: Optional[str] = None
# The interpreter's -c program: load the compiled bootstrap and run it (compiling its ~20 KB
# of source in every program would cost ~10 ms each).
_STUB = "import marshal, sys\nwith open(sys.argv[2], 'rb') as f:\n    c = marshal.loads(f.read())\nexec(c)\n"


def _bootstrap_source() -> str:
    """The in-sandbox functions' source and the line that runs them."""
    import inspect

    parts = [inspect.getsource(f) for f in (_bootstrap, _libc, _supervise, _unescape, _expose_stdlib, _install_hook)]
    return "\n\n".join(parts) + "\n\nexec(*_bootstrap())\n"


def _bootstrap_file() -> str:
    """The bootstrap compiled once per process (marshal, this interpreter's own format), in a
    private 0700 directory removed at exit."""
    global _BOOT_FILE
    with _BOOT_LOCK:
        if _BOOT_FILE is None or not os.path.isfile(_BOOT_FILE):
            import atexit
            import marshal

            d = tempfile.mkdtemp(prefix="lmlab-sbx-boot-")
            path = os.path.join(d, "bootstrap.marshal")
            with open(path, "wb") as f:
                f.write(marshal.dumps(compile(_bootstrap_source(), "<lmlab-sandbox>", "exec")))
            atexit.register(shutil.rmtree, d, True)
            _BOOT_FILE = path
        return _BOOT_FILE


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
