"""FP8 block quantization kernels (:mod:`hf_nvfp4.kernels.quantize_fp8`) vs the reference.

Bit for bit against ``numerics.quantize(..., "fp8_block", tile=...)``: element bytes, FP32
scale bits, QTensor metadata; run compiled on a GPU or in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 without a GPU). Shapes stay small: the
interpreter runs each program as numpy.
"""

import pytest
import torch

from hf_nvfp4.backends.reference import ReferenceBackend
from hf_nvfp4.kernels import is_triton_available
from hf_nvfp4.numerics.quantize import QTensor, quantize
from hf_nvfp4.numerics.testing import assert_qtensor_equal
from hf_nvfp4.recipe import Recipe

_OK, _REASON = is_triton_available()
pytestmark = [
    pytest.mark.skipif(not _OK, reason=_REASON),
    # div_rn(448, 0) of zero blocks: the interpreter's numpy warns, the GPU gives inf silently
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = Recipe("fp8_block", "fp8_block", "fp8_block", rht=False,
             stochastic_rounding=False).role_specs()
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(200, 300), (128, 128), (5, 130), (257, 64)]


@pytest.fixture(autouse=True, scope="module")
def _untimed_picks(untimed_picks):
    """Every kernel runs its first config (see conftest)."""


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Columns over five decades, some zero rows and columns (zero blocks both ways)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)
    x[: min(m, 3)] = 0
    x[:, 1] = 0
    return x.to(dtype)


def _qt(data, scale, shape, dtype, tile) -> QTensor:
    return QTensor(data.cpu(), scale.cpu(), None, "fp8_block", torch.Size(shape), dtype, tile)


def _rowcol(x: torch.Tensor, row: bool, col: bool) -> tuple[QTensor | None, QTensor | None]:
    from hf_nvfp4.kernels.quantize_fp8 import quantize_rowcol_fp8

    rd, rs, cd, cs = quantize_rowcol_fp8(x.to(DEV), row, col)
    m, k = x.shape
    return (_qt(rd, rs, (m, k), x.dtype, (1, 128)) if row else None,
            _qt(cd, cs, (k, m), x.dtype, (1, 128)) if col else None)


def _tiles(w: torch.Tensor) -> tuple[QTensor, QTensor]:
    from hf_nvfp4.kernels.quantize_fp8 import quantize_2d_fp8

    data, scale, data_t, scale_t = quantize_2d_fp8(w.to(DEV))
    n, k = w.shape
    return (_qt(data, scale, (n, k), w.dtype, (128, 128)),
            _qt(data_t, scale_t, (k, n), w.dtype, (128, 128)))


def _check_rowcol(x: torch.Tensor, row: bool = True, col: bool = True) -> None:
    got_row, got_col = _rowcol(x, row, col)
    if row:
        assert_qtensor_equal(got_row, quantize(x, "fp8_block", allow_nonfinite=True), "row")
    else:
        assert got_row is None
    if col:
        assert_qtensor_equal(got_col, quantize(x.t().contiguous(), "fp8_block",
                                               allow_nonfinite=True), "col")


def _check_tiles(w: torch.Tensor) -> None:
    got, got_t = _tiles(w)
    assert_qtensor_equal(got, quantize(w, "fp8_block", tile=(128, 128)), "w")
    assert_qtensor_equal(got_t, quantize(w.t().contiguous(), "fp8_block", tile=(128, 128)), "w_t")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rowcol_bitwise(dtype, shape):
    _check_rowcol(_x(*shape, dtype))


@pytest.mark.parametrize("row,col", [(True, False), (False, True)])
def test_rowcol_one_copy(row, col):
    from hf_nvfp4.kernels.quantize_fp8 import quantize_rowcol_fp8

    _check_rowcol(_x(70, 200, torch.bfloat16, seed=1), row, col)
    out = quantize_rowcol_fp8(_x(70, 200, torch.bfloat16).to(DEV), row, col)
    skipped = out[2:] if row else out[:2]
    assert [t.numel() for t in skipped] == [0, 0]


def test_rowcol_strided_rows():
    """A view with padded rows (elements contiguous) reads the same values."""
    base = _x(40, 300, torch.bfloat16, seed=2)
    _check_rowcol(base[:, :260])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(200, 300), (128, 256), (5, 130)], ids=str)
def test_tiles_bitwise(dtype, shape):
    _check_tiles(_x(*shape, dtype, seed=3))


def _special_rows(dtype: torch.dtype) -> torch.Tensor:
    """Rows (1x128 blocks) whose scaled elements are exact E4M3 ties, subnormals and values
    past 448; padded with zeros to 130 columns (a ragged second block of zeros)."""
    ties = [
        1.0625, 1.1875, -1.0625, 2.125, 3.25 + 0.125, 0.96875,  # normal ties (to even)
        2**-10, 3 * 2**-10, 5 * 2**-10, -7 * 2**-10, 15 * 2**-10,  # subnormal ties, and
        2**-9, 7 * 2**-9, 2**-6, 2**-12, 2**-20, 0.0, -0.0,  # the subnormal/normal border
        240.0, 232.0, 248.0, 440.0, 444.0, 446.0, -447.0,  # ties and ties near the top
    ]
    rows = []
    for scale in (1.0, 4.0, 2.0**-20):  # amax 448 * scale: enc = 1 / scale exactly
        r = torch.zeros(130)
        r[0] = 448.0 * scale
        r[1 : 1 + len(ties)] = torch.tensor(ties) * scale
        rows.append(r)
    # amaxes whose FP32 product with fl(448 / amax) exceeds 448: the clamp saturates them
    a = torch.linspace(1.0, 2.0, 4097).to(dtype).unique().float()
    over = a[a * (448.0 / a) > 448.0]
    assert len(over) >= 4
    for amax in over[:: len(over) // 4][:4]:
        r = torch.zeros(130)
        r[0], r[1], r[2] = amax, -amax, amax / 3
        rows.append(r)
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_subnormals_saturation(dtype):
    """Rows and, through x^T, columns; and the same values as 128x128 tiles."""
    x = _special_rows(dtype)
    _check_rowcol(x)
    _check_rowcol(x.t().contiguous())
    w = torch.zeros(128, 130, dtype=dtype)
    w[0] = x[0]
    _check_tiles(w)
    subnormal = quantize(x, "fp8_block").data.view(torch.uint8) & 0x78 == 0
    assert (subnormal & (quantize(x, "fp8_block").data.float() != 0)).sum() >= 10


def test_nonfinite_propagate():
    """NaN in a block: its amax, scales and elements NaN; Inf: enc 0, dec inf, NaN at the
    Inf (inf * 0) and signed zeros elsewhere; other blocks unaffected (as the reference
    with allow_nonfinite=True). NaN elements are compared as NaN (the sign of a NaN is the
    hardware's)."""
    x = _x(130, 260, torch.float32, seed=4)
    x[5, 10] = float("nan")
    x[7, 200] = float("inf")
    x[129, 3] = -float("inf")
    got_row, got_col = _rowcol(x, True, True)
    got_w, got_wt = _tiles(x)
    want = [quantize(t, "fp8_block", tile=tile, allow_nonfinite=True)
            for t, tile in ((x, (1, 128)), (x.t().contiguous(), (1, 128)),
                            (x, (128, 128)), (x.t().contiguous(), (128, 128)))]
    for got, ref in zip((got_row, got_col, got_w, got_wt), want, strict=True):
        gd, rd = got.data.float(), ref.data.float()
        assert torch.equal(gd.isnan(), rd.isnan()) and rd.isnan().any()
        ok = ~rd.isnan()
        assert torch.equal(got.data.view(torch.uint8)[ok], ref.data.view(torch.uint8)[ok])
        assert torch.equal(got.scale.isnan(), ref.scale.isnan())
        fin = ~ref.scale.isnan()
        assert torch.equal(got.scale[fin].view(torch.int32), ref.scale[fin].view(torch.int32))


if _OK:
    import triton
    import triton.language as tl

    from hf_nvfp4.kernels.quantize_fp8 import e4m3_bits

    @triton.jit
    def _e4m3_bits_kernel(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + offs, mask=offs < n)
        tl.store(out_ptr + offs, e4m3_bits(v), mask=offs < n)


def test_e4m3_bits_is_torch_cast():
    """``e4m3_bits`` (the interpreter's FP32 -> E4M3 rounding) equals torch's saturating
    cast on every FP16 value, every E4M3 midpoint and its FP32 neighbours, and random FP32
    bit patterns (NaN with its sign, as torch)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    grid = codes.float()
    grid = grid[~grid.isnan()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    mid_bits = mids.view(torch.int32)
    g = torch.Generator().manual_seed(0)
    v = torch.cat([
        torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
        .float(),
        mids, (mid_bits + 1).view(torch.float32), (mid_bits - 1).view(torch.float32),
        torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=g, dtype=torch.int32)
        .view(torch.float32),
        torch.tensor([448.0, 464.0, 480.0, 1e30, float("inf"), 2.0**-149, 2.0**-126]),
    ])
    v = torch.cat([v, -v])
    out = torch.empty(v.numel(), dtype=torch.uint8, device=DEV)
    _e4m3_bits_kernel[(triton.cdiv(v.numel(), 4096),)](v.to(DEV), out, v.numel(), BLOCK=4096)
    out = out.cpu()
    want = v.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    bad = (out != want).nonzero().flatten()[:5]
    assert not len(bad), [(float(v[i]), int(out[i]), int(want[i])) for i in bad]


# ------------------------------------------------------------------ through TritonBackend


@pytest.fixture(scope="module")
def backends():
    from hf_nvfp4.backends import get_backend

    return get_backend("triton"), ReferenceBackend()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_matches_reference(backends, count_op_calls, dtype):
    """Row/column copies (with and without a given amax, which fp8_block ignores) and the
    weight in 128x128 tiles and 1x128 blocks (weight_2d=False)."""
    tri, ref = backends
    calls = count_op_calls("quantize_rowcol_fp8", "quantize_2d_fp8")
    x = _x(150, 200, dtype, seed=5).to(DEV)
    amax = torch.tensor([3.0, 5.0], device=DEV)
    for kw in ({}, {"amax": amax}):
        got = tri.quantize_rowcol(x, FP8.x, FP8.x_t, None, values=(True, True), **kw)
        want = ref.quantize_rowcol(x, FP8.x, FP8.x_t, None, **kw)
        for g, w, name in zip(got, want, ("row", "col"), strict=True):
            assert_qtensor_equal(g, w, name)
    assert tri.quantize_rowcol(x, None, FP8.dy_t)[0] is None
    flat = Recipe("fp8_block", "fp8_block", "fp8_block", weight_2d=False, rht=False,
                  stochastic_rounding=False).role_specs()
    for spec in (FP8.w, flat.w):
        for g, w, name in zip(tri.quantize_weight(x, spec), ref.quantize_weight(x, spec),
                              ("w", "w_t"), strict=True):
            assert_qtensor_equal(g, w, f"{name} {spec.tile}")
    assert calls == {"quantize_rowcol_fp8": 4, "quantize_2d_fp8": 1}


def test_backend_mixed_formats(backends, count_op_calls):
    """An NVFP4 row copy with an FP8 column copy: each copy through its own kernel."""
    tri, ref = backends
    calls = count_op_calls("quantize_rowcol_fp8", "quantize_2d_fp8")
    specs = Recipe("nvfp4", "nvfp4", "fp8_block", rht=False,
                   stochastic_rounding=False).role_specs()
    x = _x(64, 160, torch.bfloat16, seed=6).to(DEV)
    got = tri.quantize_rowcol(x, specs.x, specs.x_t, None)
    want = ref.quantize_rowcol(x, specs.x, specs.x_t, None)
    for g, w, name in zip(got, want, ("row nvfp4", "col fp8"), strict=True):
        assert_qtensor_equal(g, w, name)
    assert calls["quantize_rowcol_fp8"] == 1


def test_fake_impls_match_shapes():
    """The ops' meta outputs have the kernels' shapes and dtypes."""
    from hf_nvfp4.kernels import ops

    x = _x(70, 200, torch.bfloat16).to(DEV)
    for row, col in ((True, True), (True, False), (False, True)):
        real = ops.quantize_rowcol_fp8(x, row, col)
        fake = ops.quantize_rowcol_fp8(x.to("meta"), row, col)
        assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in fake]
    real = ops.quantize_2d_fp8(x)
    fake = ops.quantize_2d_fp8(x.to("meta"))
    assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in fake]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_linear_fwd_bwd_matches_reference_backend(backends, count_op_calls, linear_step_pair,
                                                  dtype):
    """A whole fp8_block NVFP4Linear step, triton vs reference backend: equal outputs and
    gradients (on the CPU both GEMMs are the reference GEMM; on a GPU the FP8 tensor cores
    accumulate in fewer bits, see backends.fp8_gemm)."""
    from hf_nvfp4.backends.fp8_gemm import ACCUMULATION_TOLERANCE

    calls = count_op_calls("quantize_rowcol_fp8", "quantize_2d_fp8")
    outs = linear_step_pair("fp8_block", 200, 144, (3, 50), dtype, DEV)
    assert calls["quantize_rowcol_fp8"] >= 2 and calls["quantize_2d_fp8"] >= 1
    for got, want, name in zip(outs[0], outs[1], ("y", "dx", "dw", "db"), strict=True):
        if DEV == "cpu":
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
        else:
            err = float((got - want).abs().max() / want.abs().max())
            assert err <= ACCUMULATION_TOLERANCE + 1e-2 * (dtype == torch.bfloat16), name
