"""Every Python block of README.md runs as written (on the CPU, in a scratch directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    """The blocks share one namespace, top to bottom, as a reader pasting them would."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(BLOCKS):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block that broke
            pytest.fail(f"README python block {i + 1} failed: {type(e).__name__}: {e}\n{block}")
