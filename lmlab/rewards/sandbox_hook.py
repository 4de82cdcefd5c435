"""The audit hook (PEP 578) a sandboxed program runs under: what it refuses, and how it keeps
the program from changing its decisions.

`_install_hook` runs only inside the sandboxed interpreter, just before the program starts:
sandbox_child.py ships its source with the bootstrap (inspect.getsource, compiled and
marshalled), so it must stay self-contained, stdlib only and imported inside its body. A
refusal raises PermissionError("sandbox: ...") and is also written to the status channel, so
the caller (lmlab.rewards.sandbox) fails the run even if the program catches the error.
"""


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
