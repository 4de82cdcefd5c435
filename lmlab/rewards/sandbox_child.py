"""The sandboxed interpreter's side of lmlab.rewards.sandbox, and how it gets there.

`_bootstrap` runs first in every program's fresh `python -I -S -B`: it unshares the
namespaces and forks the in-namespace supervisor (`_supervise`), remounts the filesystem
read-only (`_unescape` reads mountinfo), re-exposes the stdlib to the sandbox uid
(`_expose_stdlib`) and drops to it, sets the rlimits, installs the audit hook
(sandbox_hook.py) and hands the program to `exec`. `_libc` reaches unshare, prctl and mount.

None of these functions runs in the caller. `_bootstrap_source` takes their source with
inspect.getsource, `_bootstrap_file` compiles it once per caller process into a marshal file,
and `_STUB` (the interpreter's -c program) loads and runs it. So each function must stay
self-contained: stdlib only, imported inside its own body, and no globals of this module or
of lmlab other than the other bootstrap functions, which it calls by name. The module-level
code below is the caller's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from typing import Optional

from lmlab.rewards.sandbox_hook import _install_hook

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
        try:
            os.kill(child, signal.SIGKILL)  # the init of the pid namespace: the kernel kills the rest
        except ProcessLookupError:  # wait4 reaped it just before the alarm (its CPU limit, same second)
            return
        fired.append(True)

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
