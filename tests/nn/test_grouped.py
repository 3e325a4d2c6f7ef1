"""quantized_grouped_linear (one autograd node for all experts) vs per-expert quantized_linear.

Reference backend: the per-group execution must give the per-expert composition bit for
bit. Triton backend: the grouped kernels quantize exactly as the per-expert calls (bit-exact
kernels: tests/kernels/test_kernels_grouped.py), so outputs and gradients agree up to the
FP32 summation order of the GEMMs.
"""

import pytest
import torch

from hf_nvfp4.kernels import is_triton_available
from hf_nvfp4.nn.functional import LinearPlan, quantized_linear
from hf_nvfp4.nn.grouped import _Batched, _PerGroup, expert_keys, quantized_grouped_linear
from hf_nvfp4.recipe import PRESETS, Recipe

COUNTS = [21, 0, 16, 5, 34]
SENTINELS = 3
IN, OUT = 32, 48


def _inputs(transposed: bool, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = sum(COUNTS) + SENTINELS
    x = torch.randn(rows, IN, generator=g).to(device, dtype)
    shape = (len(COUNTS), IN, OUT) if transposed else (len(COUNTS), OUT, IN)
    w = (torch.randn(shape, generator=g) * 0.1).to(device, dtype)
    b = torch.randn(len(COUNTS), OUT, generator=g).to(device, dtype)
    dy = torch.randn(rows, OUT, generator=g).to(device, dtype)
    keys = expert_keys(torch.tensor([4, 0], device=device), 0, len(COUNTS), 1)[0]
    return x, w, b, dy, keys


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _grouped(x, w, b, dy, keys, plan, transposed):
    x, w, b = _leaves(x, w, b)
    y = quantized_grouped_linear(x, w, b, COUNTS, plan, keys, transposed=transposed)
    y.backward(dy)
    return y, x.grad, w.grad, b.grad, y.grad_fn.impl


def _per_expert(x, w, b, dy, keys, plan, transposed):
    x, w, b = _leaves(x, w, b)
    outs = []
    for g, rows in enumerate(x[: sum(COUNTS)].split(COUNTS)):
        if COUNTS[g]:
            wg = w[g].t() if transposed else w[g]
            outs.append(quantized_linear(rows, wg, b[g], plan, keys[g]))
    y = torch.cat([*outs, x.new_zeros(SENTINELS, OUT)])
    y.backward(dy)
    return y, x.grad, w.grad, b.grad


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp4"])
def test_reference_backend_equals_per_expert_linears_bitwise(transposed, recipe):
    plan = LinearPlan(PRESETS[recipe].role_specs(), "reference", share_input=False)
    args = (*_inputs(transposed, torch.float32), plan, transposed)
    *got, impl = _grouped(*args)
    want = _per_expert(*args)
    assert impl is _PerGroup
    for name, a, b in zip(("y", "dx", "dw", "db"), got, want, strict=True):
        assert torch.equal(a, b), name
    assert got[2][1].abs().sum() == 0 and got[3][1].abs().sum() == 0  # the empty expert
    assert torch.equal(got[0][-SENTINELS:], torch.zeros(SENTINELS, OUT))


def test_high_precision_wgrad_equals_per_expert_linears():
    recipe = Recipe(wgrad_format="bf16", rht=False)
    plan = LinearPlan(recipe.role_specs(), "reference", share_input=False)
    args = (*_inputs(False, torch.float32, seed=1), plan, False)
    *got, _ = _grouped(*args)
    for name, a, b in zip(("y", "dx", "dw", "db"), got, _per_expert(*args), strict=True):
        assert torch.equal(a, b), name


_TRITON, _WHY = is_triton_available()
_DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not _TRITON, reason=_WHY)
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_kernels_equal_per_expert_triton_linears(transposed, dtype):
    plan = LinearPlan(PRESETS["nvfp4"].role_specs(), "triton", share_input=False)
    args = (*_inputs(transposed, dtype, _DEV, seed=2), plan, transposed)
    *got, impl = _grouped(*args)
    want = _per_expert(*args)
    # FP32 rows run group by group (the grouped amax pass is exact for 16-bit inputs)
    assert impl is (_PerGroup if dtype == torch.float32 else _Batched)
    # same codes, scales and keys: FP32 sums in another order, one rounding to the dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7,
                                                                         atol=1e-3)
    for name, a, b in zip(("y", "dx", "dw", "db"), got, want, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=name)
    assert got[2][1].abs().sum() == 0 and got[3][1].abs().sum() == 0
    assert torch.equal(got[0][-SENTINELS:], torch.zeros_like(got[0][-SENTINELS:]))
    assert torch.equal(got[1][-SENTINELS:], torch.zeros_like(got[1][-SENTINELS:]))


def test_counts_must_match_the_weight():
    plan = LinearPlan(PRESETS["nvfp4"].role_specs(), "reference")
    x, w, b, _, _ = _inputs(False, torch.float32)
    with pytest.raises(ValueError, match="counts has 2 groups but the weight has 5"):
        quantized_grouped_linear(x, w, b, [1, 2], plan)
    with pytest.raises(ValueError, match="add up to 1000 rows"):
        quantized_grouped_linear(x, w, b, [1000, 0, 0, 0, 0], plan)
