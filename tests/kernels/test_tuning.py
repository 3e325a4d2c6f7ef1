"""Kernel-variant choice: timed on CUDA, fixed under torch's deterministic mode."""

import pytest
import torch

from hf_nvfp4.kernels import _tuning


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _candidates(calls):
    def make():
        return {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    return make


def test_deterministic_mode_takes_the_fixed_choice_without_timing(deterministic):
    calls = []
    cuda = torch.device("cuda")  # nothing runs on it: no candidate is timed
    assert _tuning.pick(("t", 1), _candidates(calls), cuda, fixed="b") == "b"
    assert _tuning.pick(("t", 2), _candidates(calls), cuda) == "a"
    assert _tuning.pick(("t", 3), _candidates(calls), cuda, fixed="missing") == "a"
    assert calls == []
    assert _tuning.pick(("t", 1), _candidates(calls), cuda, fixed="c") == "b"  # cached


def test_off_cuda_nothing_is_timed():
    calls = []
    assert _tuning.pick(("t", 4), _candidates(calls), torch.device("cpu")) == "a"
    assert _tuning.pick(("t", 5), _candidates(calls), torch.device("cpu"), fixed="c") == "c"
    assert calls == []


def test_deterministic_mode_ignores_a_choice_timed_before_it(monkeypatch, deterministic):
    calls = []
    cuda = torch.device("cuda")
    monkeypatch.setitem(_tuning._CHOICES, ("u", 6), "c")  # as if timed before the switch
    assert _tuning.pick(("u", 6), _candidates(calls), cuda, fixed="b") == "b"
    assert _tuning.choices()["u:fixed"]["choice"] == "b"
    assert calls == []


def test_shape_buckets_share_one_choice():
    assert [_tuning.shape_bucket(n) for n in (0, 1, 16, 17, 32, 33, 1000, 1024, 1025)] == [
        16, 16, 16, 32, 32, 64, 1024, 1024, 2048]
    from hf_nvfp4.kernels.gemm import gemm_scaled

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    before = set(_tuning.choices())
    one = torch.ones((), dtype=torch.float32, device=dev)
    for m in (40, 50, 64):  # one bucket: tuned (on CUDA timed, else fixed) once
        a = torch.ones(m, 32, dtype=torch.bfloat16, device=dev)
        b = torch.ones(48, 32, dtype=torch.bfloat16, device=dev)
        out = gemm_scaled(a, b, one, one, torch.float32)
        assert torch.equal(out, torch.full((m, 48), 32.0, device=dev))
    new = [k for k in _tuning.choices() if k not in before and k.startswith("gemm_scaled:64:")]
    assert len(new) == 1
