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


def _linear_step_pair(recipe, k: int, n: int, tokens: tuple[int, ...], dtype, device, **kwargs):
    """One training step of an NVFP4Linear on the triton and the reference backends, with the
    same weights (seed 0), input and output gradient: ``[(y, dx, dw, db) triton, (...)
    reference]``."""
    from hf_nvfp4.nn import NVFP4Linear

    torch.manual_seed(0)
    layers = [NVFP4Linear(k, n, recipe=recipe, backend=b, device=device, dtype=dtype, **kwargs)
              for b in ("triton", "reference")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(*tokens, k, device=device, dtype=dtype)
    dy = torch.randn(*tokens, n, device=device, dtype=dtype)
    outs = []
    for layer in layers:
        xr = x.clone().requires_grad_()
        y = layer(xr)
        y.backward(dy)
        outs.append((y, xr.grad, layer.weight.grad, layer.bias.grad))
    return outs


@pytest.fixture
def linear_step_pair():
    """``linear_step_pair(recipe, k, n, tokens, dtype, device, **layer_kwargs)``: see
    :func:`_linear_step_pair`."""
    return _linear_step_pair


def _assert_steps_match(outs) -> None:
    """The two backends' step results (from :func:`_linear_step_pair`) are equal bit for bit
    on the CPU, and within 1% of each tensor's largest magnitude on a GPU (GEMM summation
    order)."""
    for got, want, name in zip(outs[0], outs[1], ("y", "dx", "dw", "db"), strict=True):
        if got.device.type == "cpu":
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()),
                                       msg=name)


@pytest.fixture
def assert_steps_match():
    """See :func:`_assert_steps_match`."""
    return _assert_steps_match
