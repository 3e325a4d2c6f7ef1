"""Shared fixtures of the kernel tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def untimed_picks():
    """Every kernel runs its first config (no timing of all candidates on a GPU)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture
def count_op_calls(monkeypatch):
    """``count_op_calls(*names)``: a dict counting the calls TritonBackend makes to those
    ``hf_nvfp4.kernels.ops`` entries during the test."""
    from hf_nvfp4.kernels import ops

    def count(*names: str) -> dict[str, int]:
        calls = dict.fromkeys(names, 0)
        for name in names:
            op = getattr(ops, name)

            def counted(*args, _op=op, _name=name):
                calls[_name] += 1
                return _op(*args)

            monkeypatch.setattr(ops, name, counted)
        return calls

    return count
