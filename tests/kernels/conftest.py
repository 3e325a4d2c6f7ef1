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
