"""Per-role quantizers: every role bit-exact against hf_nvfp4.numerics, phases composable."""

import pytest
import torch

from hf_nvfp4.kernels import is_triton_available
from hf_nvfp4.nn.functional import LinearPlan
from hf_nvfp4.numerics.quantize import quantize, tensor_amax
from hf_nvfp4.numerics.testing import assert_qtensor_equal
from hf_nvfp4.quant.quantizer import Quantized, Quantizer
from hf_nvfp4.recipe import Recipe

SPECS = Recipe().role_specs()
KEYS = torch.tensor([123, -456], dtype=torch.int32)
# the Triton path where Triton runs (compiled on a GPU, else the interpreter)
BACKENDS = ["reference", "triton"] if is_triton_available()[0] else ["reference"]


def _numerics(x, spec, key=None, amax=None):
    return quantize(
        x, spec.fmt, tile=spec.tile, rounding=spec.rounding, rht=spec.rht,
        rht_sign=spec.rht_sign, sr_key=key if spec.rounding == "stochastic" else None,
        amax_reduce=None if amax is None else (lambda _: amax),
        allow_nonfinite=amax is not None,
    )


def _x(m=40, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * torch.linspace(0.1, 8, k)).to(torch.bfloat16)


def _device(backend):
    return "cuda" if torch.cuda.is_available() and backend != "reference" else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("role, row, col", [
    ("input", SPECS.x, SPECS.x_t), ("grad_output", SPECS.dy, SPECS.dy_t),
])
def test_activation_roles_equal_numerics(backend, role, row, col):
    dev = _device(backend)
    x, keys = _x().to(dev), KEYS.to(dev)
    got = Quantizer(role, row, col, backend)(x, keys)
    assert isinstance(got, Quantized)
    assert_qtensor_equal(got.row, _numerics(x, row, keys[0]))
    assert_qtensor_equal(got.col, _numerics(x.t().contiguous(), col, keys[1]))
    only_col = Quantizer(role, row, col, backend)(x, keys, row=False)
    assert only_col.row is None
    assert_qtensor_equal(only_col.col, got.col)  # a copy's draws do not depend on the other


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_role_equals_numerics_in_both_orientations(backend):
    w = _x(48, 64, seed=2).to(_device(backend))
    got = Quantizer("weight", SPECS.w, SPECS.w_dgrad, backend)(w)
    assert_qtensor_equal(got.row, _numerics(w, SPECS.w))
    assert_qtensor_equal(got.col, _numerics(w.t().contiguous(), SPECS.w_dgrad))
    # 16x16 tiles: W^T's values are exactly the transpose of W's
    assert torch.equal(got.col.dequantize().t(), got.row.dequantize())


@pytest.mark.parametrize("backend", BACKENDS)
def test_phases_amax_reduce_encode(backend):
    dev = _device(backend)
    x, keys = _x(seed=3).to(dev), KEYS.to(dev)
    q = Quantizer("grad_output", SPECS.dy, SPECS.dy_t, backend)
    amax = q.amax(x)
    assert amax.dtype == torch.float32 and amax.shape == (2,)
    assert torch.equal(amax[0], tensor_amax(x).float())
    assert torch.equal(amax[1], tensor_amax(x.t().contiguous(), rht=True).float())
    assert q.reduce(amax) is amax  # no reduction configured
    assert torch.equal(q.amax(x, col=False)[1], torch.zeros((), device=dev))
    # encoding with the local amaxes is the fused call; with others, numerics' amax_reduce
    fused = q(x, keys)
    phased = q.encode(x, amax, keys)
    assert_qtensor_equal(phased.row, fused.row)
    assert_qtensor_equal(phased.col, fused.col)
    bigger = amax * 4
    scaled = q.encode(x, bigger, keys)
    assert_qtensor_equal(scaled.row, _numerics(x, SPECS.dy, keys[0], bigger[0]))
    assert_qtensor_equal(scaled.col, _numerics(x.t().contiguous(), SPECS.dy_t, keys[1],
                                               bigger[1]))
    assert not torch.equal(scaled.row.global_scale, fused.row.global_scale)


def test_invalid_roles_and_phases_raise():
    with pytest.raises(ValueError, match="role must be one of"):
        Quantizer("bias", SPECS.x, None, "reference")
    with pytest.raises(ValueError, match="never reduced"):
        Quantizer("weight", SPECS.w, SPECS.w_dgrad, "reference", reduce_amax=True)
    with pytest.raises(ValueError, match="inside its encode pass"):
        Quantizer("weight", SPECS.w, SPECS.w_dgrad, "reference").amax(torch.ones(16, 16))
    with pytest.raises(ValueError, match="saved for backward"):
        Quantizer("weight", SPECS.w, SPECS.w_dgrad, "reference", values=(True, True))


def test_plan_builds_one_quantizer_per_role():
    plan = LinearPlan(SPECS, "reference", reduce_amax=True)
    assert (plan.input.row, plan.input.col) == (SPECS.x, SPECS.x_t)
    assert (plan.weight.row, plan.weight.col) == (SPECS.w, SPECS.w_dgrad)
    assert (plan.grad_output.row, plan.grad_output.col) == (SPECS.dy, SPECS.dy_t)
    assert plan.input.reduce_amax and plan.grad_output.reduce_amax
    assert not plan.weight.reduce_amax
    # the copies a GEMM reads at once come as block values; those saved for backward packed
    assert (plan.input.values, plan.weight.values, plan.grad_output.values) == (
        (True, False), (True, False), (True, True))
    # the quantizers are derived: equality and hashing are the plan's decisions only
    assert plan == LinearPlan(SPECS, "reference", reduce_amax=True)
    assert hash(plan) == hash(LinearPlan(SPECS, "reference", reduce_amax=True))
