"""Launching multi-process workers so that a hang fails its test instead of stalling the suite.

``subprocess.run(..., capture_output=True, timeout=...)`` kills only the launcher on timeout and
then waits for its pipes, which the rank processes still hold: a hung rank stalls the whole
pytest run. The ``launch`` fixture writes the command's output to files and, on timeout, kills
the launcher and every process under it (torchrun starts each rank in a session of its own, so
killing its process group is not enough) and fails with what the ranks printed.
"""

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

Launch = Callable[..., subprocess.CompletedProcess]


def _descendants(pid: int) -> list[int]:
    """The processes under ``pid``, children first (from /proc; none where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _launch(tmp_path: Path, args: list, nproc: int | None = 2, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node N *args``, or
    ``python *args`` when ``nproc`` is None, with the repository on ``PYTHONPATH``. Fails the
    test, after killing every process the command started, when it runs past ``timeout``
    seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable]
    if nproc is not None:
        # --standalone: a free rendezvous port per launch (a fixed one can be held by a
        # process an earlier run left behind, and then the ranks wait on its store)
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += [str(a) for a in args]
    logs = tmp_path / f"launch_{len(list(tmp_path.glob('launch_*.out')))}"
    with open(f"{logs}.out", "w") as out, open(f"{logs}.err", "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            for pid in [*_descendants(proc.pid), proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
    stdout, stderr = Path(f"{logs}.out").read_text(), Path(f"{logs}.err").read_text()
    if code is None:
        pytest.fail(f"{' '.join(cmd[1:])} ran past {timeout:.0f} s and was killed; its "
                    f"stderr ends:\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(cmd, code, stdout, stderr)


@pytest.fixture
def launch(tmp_path: Path) -> Launch:
    """``launch(args, nproc=2, timeout=300, env=None)``: see :func:`_launch`."""
    return lambda args, **kw: _launch(tmp_path, args, **kw)
