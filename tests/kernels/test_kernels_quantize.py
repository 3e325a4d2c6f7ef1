"""Triton quantization kernels vs the reference, bit for bit, in Triton's CPU interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_nvfp4.backends.reference import ReferenceBackend  # noqa: E402
from hf_nvfp4.kernels import is_triton_available  # noqa: E402
from hf_nvfp4.numerics.testing import assert_qtensor_equal  # noqa: E402
from hf_nvfp4.recipe import QuantSpec, Recipe  # noqa: E402

_OK, _REASON = is_triton_available()
pytestmark = [
    pytest.mark.skipif(not _OK, reason=_REASON),
    # div_rn(1, 0) of zero blocks: the interpreter's numpy warns, the GPU gives inf silently.
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
]

SPECS = Recipe().role_specs()
NO_RHT = Recipe(rht=False, stochastic_rounding=False).role_specs()
MXFP4 = Recipe("mxfp4", "mxfp4", "mxfp4").role_specs()


@pytest.fixture(scope="module")
def backends():
    from hf_nvfp4.backends.triton_backend import TritonBackend

    return TritonBackend(), ReferenceBackend()


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)
    return x.to(dtype)


def _check_rowcol(backends, x, row, col, seed=7):
    tri, ref = backends
    got = tri.quantize_rowcol(x, row, col, torch.Generator().manual_seed(seed))
    want = ref.quantize_rowcol(x, row, col, torch.Generator().manual_seed(seed))
    for name, g, w in zip(("row", "col"), got, want, strict=True):
        if w is None:
            assert g is None
        else:
            assert_qtensor_equal(g, w, name=name)


DTYPES = [
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
]
SHAPES = [
    pytest.param((64, 64), id="64x64"),
    pytest.param((50, 96), id="ragged_m50"),
    pytest.param((37, 40), id="ragged_m37_k40"),
]
ROLES = [
    pytest.param(SPECS.x, SPECS.x_t, id="x_rtn_rht"),
    pytest.param(SPECS.dy, SPECS.dy_t, id="dy_sr_rht"),
    pytest.param(NO_RHT.x, NO_RHT.x_t, id="x_rtn_no_rht"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("row", "col"), ROLES)
def test_rowcol_bitwise(backends, dtype, shape, row, col):
    _check_rowcol(backends, _x(*shape, dtype), row, col)


@pytest.mark.parametrize(
    ("row", "col"),
    [
        pytest.param(SPECS.dy, None, id="row_only_sr"),
        pytest.param(None, SPECS.dy_t, id="col_only_sr"),
        pytest.param(MXFP4.x, MXFP4.x_t, id="mxfp4_fallback"),
    ],
)
def test_rowcol_partial_and_fallback(backends, row, col):
    _check_rowcol(backends, _x(48, 80, torch.bfloat16, seed=1), row, col)


@pytest.mark.parametrize(
    "kind", [pytest.param("blocks", id="zero_blocks"), pytest.param("all", id="all_zero")]
)
def test_zero_blocks(backends, kind):
    x = _x(40, 64, torch.bfloat16, seed=2)
    if kind == "all":
        x.zero_()
    else:
        x[:16, :32] = 0
        x[:, 48:] = 0
        x[5, 3] = -0.0
    _check_rowcol(backends, x, SPECS.x, SPECS.x_t)
    _check_rowcol(backends, x, SPECS.dy, SPECS.dy_t)
    tri, ref = backends
    for g, w in zip(tri.quantize_weight(x, SPECS.w), ref.quantize_weight(x, SPECS.w), strict=True):
        assert_qtensor_equal(g, w, name=kind)


def test_extreme_scales(backends):
    """Block amaxes spanning the E4M3 subnormals and the saturation at 448."""
    x = _x(32, 256, torch.float32, seed=3)
    x[:, :16] *= 1e6
    x[:, 16:64] *= 1e-7
    _check_rowcol(backends, x, SPECS.x, SPECS.x_t)


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize(
    "shape", [pytest.param((64, 96), id="64x96"), pytest.param((40, 72), id="ragged_40x72")]
)
@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(SPECS.w, id="2d_16x16"),
        pytest.param(Recipe(weight_2d=False).role_specs().w, id="1x16"),
        pytest.param(MXFP4.w, id="mxfp4_fallback"),
    ],
)
def test_weight_bitwise(backends, dtype, shape, spec):
    w = _x(*shape, dtype, seed=4)
    tri, ref = backends
    for name, g, r in zip(("w", "w_t"), tri.quantize_weight(w, spec),
                          ref.quantize_weight(w, spec), strict=True):
        assert_qtensor_equal(g, r, name=name)


def test_stochastic_rounding_statistics(backends):
    """E[dequantize] = x for stochastic rounding, and the kernel's draws are the reference's."""
    tri, ref = backends
    m, k = 64, 256
    levels = torch.linspace(-5.9, 5.9, k - 16)
    x = torch.cat([torch.full((m, 16), 6.0), levels.expand(m, -1)], dim=1)  # scale fixed
    spec = QuantSpec("nvfp4", (1, 16), "stochastic")
    means = []
    for seed in range(4):
        got, _ = tri.quantize_rowcol(x, spec, None, torch.Generator().manual_seed(seed))
        want, _ = ref.quantize_rowcol(x, spec, None, torch.Generator().manual_seed(seed))
        assert torch.equal(got.data, want.data)
        means.append(got.dequantize()[:, 16:].mean(0))
    mean = torch.stack(means).mean(0)
    # per level: 256 draws of a Bernoulli over a grid step <= 2: std of the mean <= 1/16
    err = (mean - levels).abs()
    assert float(err.max()) < 0.3, float(err.max())
    assert float(err.mean()) < 0.08, float(err.mean())
    nearest = tri.quantize_rowcol(x, QuantSpec("nvfp4", (1, 16)), None, None)[0]
    assert float((nearest.dequantize()[:, 16:].mean(0) - levels).abs().mean()) > float(
        err.mean()
    )


def test_dequantize_op(backends):
    from hf_nvfp4.kernels.ops import dequantize

    q = backends[1].quantize_rowcol(_x(37, 48, torch.bfloat16), SPECS.x, None, None)[0]
    got = dequantize(q.data, q.scale.view(torch.uint8), q.global_scale, 37, torch.float32)
    assert torch.equal(got, q.dequantize(torch.float32))
    vals = dequantize(q.data, q.scale.view(torch.uint8), None, 37, torch.bfloat16)
    assert torch.equal(vals, q.block_values().to(torch.bfloat16))


def test_fake_shapes():
    from hf_nvfp4.kernels import ops

    x = torch.empty(40, 72, device="meta", dtype=torch.bfloat16)
    rd, rs, cd, cs, gs = ops.quantize_rowcol(x, True, True, [1] * 16, None, 3)
    assert [t.shape for t in (rd, rs, cd, cs, gs)] == [
        (40, 40), (40, 5), (72, 24), (72, 3), (2,)
    ]
    assert [t.shape for t in ops.quantize_2d(x)[:4]] == [(48, 40), (48, 5), (80, 24), (80, 3)]


def test_clear_error_without_triton(monkeypatch):
    from hf_nvfp4.backends import triton_backend

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    triton_backend._load_ops.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="pip install"):
            triton_backend.TritonBackend()
    finally:
        triton_backend._load_ops.cache_clear()
