"""MXFP4 quantization kernels (:mod:`hf_nvfp4.kernels.quantize_mxfp4`, the 32x32 tiles of
:mod:`hf_nvfp4.kernels.quantize_2d`) vs the reference, bit for bit.

Against ``numerics.quantize(..., "mxfp4", ...)``: packed codes, UE8M0 scale bytes, QTensor
metadata, for the row copy, the column copy (RHT, stochastic rounding with the reference's
generator keys) and weight tiles with W^T; run compiled on a GPU or in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), so shapes stay small.
"""

import pytest
import torch

from hf_nvfp4.backends.reference import ReferenceBackend, reference_gemm
from hf_nvfp4.kernels import is_triton_available
from hf_nvfp4.numerics import e2m1
from hf_nvfp4.numerics.hadamard import hadamard_transform
from hf_nvfp4.numerics.quantize import QTensor, quantize
from hf_nvfp4.numerics.rng import draw_seed, split_generator
from hf_nvfp4.numerics.scales import ue8m0_exponents
from hf_nvfp4.numerics.testing import assert_qtensor_equal
from hf_nvfp4.recipe import QuantSpec, Recipe

_OK, _REASON = is_triton_available()
pytestmark = [
    pytest.mark.skipif(not _OK, reason=_REASON),
    # the interpreter's numpy warns where the GPU silently overflows to Inf (huge blocks,
    # x * 2^127 in a NaN block) or divides by zero (the NVFP4 kernel's zero blocks)
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
MX = Recipe("mxfp4", "mxfp4", "mxfp4").role_specs()  # RHT on wgrad copies, SR on dy
MX_PLAIN = Recipe("mxfp4", "mxfp4", "mxfp4", weight_2d=False, rht=False,
                  stochastic_rounding=False).role_specs()
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.float32, id="fp32")]
ROLES = [
    pytest.param(MX.x, MX.x_t, id="x_rtn_rht"),
    pytest.param(MX.dy, MX.dy_t, id="dy_sr_rht"),
    pytest.param(MX_PLAIN.x, MX_PLAIN.x_t, id="x_rtn_no_rht"),
    pytest.param(MX.dy, MX_PLAIN.dy_t, id="dy_sr_no_rht"),
]


@pytest.fixture(autouse=True, scope="module")
def _untimed_picks(untimed_picks):
    """Every kernel runs its first config (see conftest)."""


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Columns over five decades, one zero row and column (zero blocks both ways)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)
    x[min(m, 3) - 1] = 0
    x[:, 1] = 0
    return x.to(dtype)


def _keys(seed: int) -> torch.Tensor:
    """The int32 SR keys of the reference's two child generators of ``seed``."""
    from hf_nvfp4.kernels._common import seed_key

    g_row, g_col = split_generator(torch.Generator().manual_seed(seed))
    return torch.tensor([seed_key(draw_seed(g_row)), seed_key(draw_seed(g_col))],
                        dtype=torch.int32, device=DEV)


def _sr(spec: QuantSpec | None) -> bool:
    return spec is not None and spec.rounding == "stochastic"


def _kernel(x: torch.Tensor, row: QuantSpec | None, col: QuantSpec | None, seed: int = 7):
    """The kernel's copies, as the QTensors the backend builds from them."""
    from hf_nvfp4.kernels.quantize_mxfp4 import quantize_rowcol_mxfp4

    sign = tuple(col.rht_sign) if col is not None and col.rht else None
    sr = _sr(row) or _sr(col)
    rd, rs, cd, cs = quantize_rowcol_mxfp4(x.to(DEV), row is not None, col is not None, sign,
                                           _sr(row), _sr(col), _keys(seed) if sr else None)
    m, k = x.shape
    q_row = q_col = None
    if row is not None:
        q_row = QTensor(rd.cpu(), rs.cpu(), None, "mxfp4", torch.Size((m, k)), x.dtype, (1, 32))
    else:
        assert rd.numel() == rs.numel() == 0
    if col is not None:
        cols = -(-m // 32) * 32 if col.rht else m
        q_col = QTensor(cd.cpu(), cs.cpu(), None, "mxfp4", torch.Size((k, cols)), x.dtype,
                        (1, 32), col.rht)
    else:
        assert cd.numel() == cs.numel() == 0
    return q_row, q_col


def _reference(x: torch.Tensor, row: QuantSpec | None, col: QuantSpec | None, seed: int = 7):
    """The row copy of x and the column copy of x^T, one child generator per copy."""
    gens = split_generator(torch.Generator().manual_seed(seed))
    return [None if spec is None else quantize(
        t, spec.fmt, tile=spec.tile, rounding=spec.rounding, rht=spec.rht,
        rht_sign=spec.rht_sign, generator=gen, allow_nonfinite=True)
        for t, spec, gen in ((x, row, gens[0]), (x.t().contiguous(), col, gens[1]))]


def _check_rowcol(x: torch.Tensor, row: QuantSpec | None, col: QuantSpec | None,
                  seed: int = 7) -> None:
    for got, want, name in zip(_kernel(x, row, col, seed), _reference(x, row, col, seed),
                               ("row", "col"), strict=True):
        if want is None:
            assert got is None
        else:
            assert_qtensor_equal(got, want, name)


def _tiles(w: torch.Tensor) -> tuple[QTensor, QTensor]:
    from hf_nvfp4.kernels.quantize_2d import quantize_2d_mxfp4

    data, scale, data_t, scale_t = quantize_2d_mxfp4(w.to(DEV))
    n, k = w.shape
    return (QTensor(data.cpu(), scale.cpu(), None, "mxfp4", torch.Size((n, k)), w.dtype,
                    (32, 32)),
            QTensor(data_t.cpu(), scale_t.cpu(), None, "mxfp4", torch.Size((k, n)), w.dtype,
                    (32, 32)))


def _check_tiles(w: torch.Tensor) -> None:
    got, got_t = _tiles(w)
    assert_qtensor_equal(got, quantize(w, "mxfp4", tile=(32, 32), allow_nonfinite=True), "w")
    assert_qtensor_equal(got_t, quantize(w.t().contiguous(), "mxfp4", tile=(32, 32),
                                         allow_nonfinite=True), "w_t")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (50, 96), (37, 40)], ids=str)
@pytest.mark.parametrize(("row", "col"), ROLES)
def test_rowcol_bitwise(dtype, shape, row, col):
    _check_rowcol(_x(*shape, dtype), row, col)


@pytest.mark.parametrize(("row", "col"), [(MX.dy, None), (None, MX.dy_t), (MX.x, None),
                                          (None, MX.x_t)], ids=["row_sr", "col_sr_rht",
                                                                "row", "col_rht"])
def test_rowcol_one_copy(row, col):
    """A copy alone draws with its own key, as with the other copy present."""
    _check_rowcol(_x(40, 72, torch.bfloat16, seed=1), row, col)


def test_rowcol_strided_rows():
    """A view with padded rows (elements contiguous) reads the same values."""
    _check_rowcol(_x(40, 300, torch.bfloat16, seed=2)[:, :200], MX.dy, MX.dy_t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (70, 100), (32, 160)], ids=str)
def test_tiles_bitwise(dtype, shape):
    _check_tiles(_x(*shape, dtype, seed=3))


def _special(dtype: torch.dtype) -> torch.Tensor:
    """[64, 64]: 1x32 blocks (and 32x32 tiles) of zeros and -0, amaxes at and next to the
    UE8M0 boundaries ``6 * 2^n``, E2M1 ties after scaling, and the extremes of the dtype:
    tiny amaxes (the exponent clamps to -127) and huge ones."""
    finfo = torch.finfo(dtype)
    x = torch.zeros(64, 64)
    x[0, 32:] = -0.0
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0, 5.5, 0.1])
    amaxes = [6.0, 6.0 * 1.0078125, 6.0 * 0.99609375, 3.0, 12.0, 7.0, 0.375, 1.0]
    for i, a in enumerate(amaxes):  # block (i + 1, 0): amax a, ties scaled by a / 6
        x[i + 1, 0] = a
        x[i + 1, 1 : 1 + len(ties)] = ties * (a / 6.0)
        x[i + 1, 32:44] = ties * 2.0 ** (i - 4)  # block (i + 1, 1): amax 5.5 * 2^(i-4)
    x[10, :32] = finfo.max * torch.linspace(-1, 1, 32)
    tiny = finfo.tiny * torch.linspace(-1, 1, 32)  # smallest normals and subnormals
    if dtype == torch.bfloat16 and DEV == "cpu":  # Triton's interpreter widens BF16
        tiny = tiny.sign() * tiny.abs().clamp(min=finfo.tiny)  # subnormals wrongly
    x[11, :32] = tiny
    x[12, :32] = finfo.smallest_normal * 2.0 ** torch.arange(32.0).clamp(max=20)
    x[13, 32:] = finfo.max / 3
    x[32:, :32] = torch.randn(32, 32, generator=torch.Generator().manual_seed(5)) * 1e-3
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype):
    """Zero blocks, UE8M0 boundaries, ties, extreme magnitudes: rows, columns (through x and
    x^T, RHT and SR included) and 32x32 tiles."""
    x = _special(dtype)
    for t in (x, x.t().contiguous()):
        _check_rowcol(t, MX.x, MX_PLAIN.x_t)
        _check_rowcol(t, MX.dy, MX.dy_t)
        _check_tiles(t)
    _check_rowcol(torch.zeros(33, 40, dtype=dtype), MX.dy, MX.dy_t)
    scales = set(quantize(x, "mxfp4").scale.flatten().tolist())
    assert {0, 127, 128} <= scales  # zero and tiny blocks; amax 6 (2^0) and 6 * (1 + 2^-7)


def _nan_free_equal(got: QTensor, want: QTensor, values: torch.Tensor, name: str) -> None:
    """Scales equal; codes equal except at NaN elements of ``values`` (the padded input the
    reference quantizes), whose codes are unspecified; the NaN blocks decode to NaN."""
    assert torch.equal(got.scale, want.scale), name
    keep = ~values.isnan()
    assert torch.equal(e2m1.unpack(got.data)[keep], e2m1.unpack(want.data)[keep]), name
    g, w = got.block_values(), want.block_values()
    assert torch.equal(g.isnan(), w.isnan()), name
    assert torch.equal(g[~w.isnan()], w[~w.isnan()]), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite(dtype):
    """Inf: its block's exponent is -2 (the reference's frexp) and the Inf saturates, bit
    for bit; NaN: the block's scale byte is 0xFF (NaN) and its other codes match. Through
    the RHT, Inf and NaN spread over their 16-token group."""
    x = _x(64, 96, dtype, seed=6)
    x[5, 10] = float("nan")
    x[7, 40] = float("inf")
    x[40, 70] = -float("inf")
    x[33, 3] = float("nan")
    for row, col in ((MX.x, MX.x_t), (MX.dy, MX_PLAIN.dy_t)):
        got, want = _kernel(x, row, col), _reference(x, row, col)
        _nan_free_equal(got[0], want[0], x.float(), "row")
        xt = x.t().contiguous()
        vt = (hadamard_transform(xt, col.rht_sign) if col.rht else xt).float()
        _nan_free_equal(got[1], want[1], vt, f"col rht={col.rht}")
        assert want[0].scale[5, 0] == want[0].scale[33, 0] == 255  # NaN
        assert want[0].scale[7, 1] == want[0].scale[40, 2] == 125  # Inf: k = -2
    for got, t in zip(_tiles(x), (x, x.t().contiguous()), strict=True):
        want = quantize(t, "mxfp4", tile=(32, 32), allow_nonfinite=True)
        _nan_free_equal(got, want, t.float(), "tiles")


if _OK:
    import triton
    import triton.language as tl

    from hf_nvfp4.kernels._common import ue8m0_scale

    @triton.jit
    def _ue8m0_kernel(a_ptr, byte_ptr, mult_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        byte, mult = ue8m0_scale(tl.load(a_ptr + offs, mask=offs < n))
        tl.store(byte_ptr + offs, byte, mask=offs < n)
        tl.store(mult_ptr + offs, mult, mask=offs < n)


def test_ue8m0_scale_is_reference():
    """``ue8m0_scale`` gives scales.ue8m0_exponents' exponent (and the NaN byte) and the
    reference's exact multiplier ``2^-k`` on random FP32 magnitudes, every ``6 * 2^n`` and
    its neighbours, subnormals, zero, Inf and NaN."""
    g = torch.Generator().manual_seed(0)
    bounds = 6.0 * 2.0 ** torch.arange(-140, 127, dtype=torch.float64)
    bounds = bounds[bounds < 3.4e38].float()
    a = torch.cat([
        torch.randint(0, 0x7F800000, (1 << 15,), generator=g, dtype=torch.int32)
        .view(torch.float32),
        bounds, torch.nextafter(bounds, torch.full_like(bounds, float("inf"))),
        torch.nextafter(bounds, torch.zeros_like(bounds)),
        torch.tensor([0.0, 1e-45, 1e-40, 2.0**-126, 3.4028234663852886e38, float("inf"),
                      float("nan")]),
    ])
    byte = torch.empty(a.shape, dtype=torch.int32, device=DEV)
    mult = torch.empty(a.shape, dtype=torch.float32, device=DEV)
    _ue8m0_kernel[(triton.cdiv(a.numel(), 4096),)](a.to(DEV), byte, mult, a.numel(), BLOCK=4096)
    k = ue8m0_exponents(a, 6.0)
    want = torch.where(a.isnan(), 255, k + 127)
    assert torch.equal(byte.cpu(), want)
    assert torch.equal(mult.cpu(), torch.ldexp(torch.ones_like(a), -k.float()))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_dequantize_is_block_values(out_dtype):
    """The dequantize kernel at block 32 (UE8M0) gives ``QTensor.block_values`` bit for bit:
    every code against every scale byte, the subnormal 2^-127 (byte 0) and the NaN byte 255
    included, with ragged rows; with a global scale it is ``block values * S`` in FP32."""
    from hf_nvfp4.kernels import ops

    rows, cols = 37, 512
    g = torch.Generator().manual_seed(11)
    data = torch.randint(0, 256, (rows + 3, cols // 2), generator=g, dtype=torch.uint8)
    data[0] = torch.arange(256, dtype=torch.uint8)[: cols // 2]  # all 16 codes in pairs
    scale = torch.randint(0, 255, (rows + 3, cols // 32), generator=g, dtype=torch.uint8)
    scale[0, :4] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)
    scale[1] = torch.arange(16, dtype=torch.uint8) * 17  # 0, 17, ..., 255
    q = QTensor(data, scale, None, "mxfp4", torch.Size((rows, cols)), torch.bfloat16, (1, 32))
    want = q.block_values()[:rows]
    got = ops.dequantize(data.to(DEV), scale.to(DEV), None, rows, out_dtype, 32).cpu()
    torch.testing.assert_close(got, want.to(out_dtype), rtol=0, atol=0, equal_nan=True)
    assert got[0, 0:32].isfinite().all() and got[0, 96:128].isnan().all()
    assert (got[0, :32] != 0).sum() == 14  # byte 0: the nonzero codes stay nonzero
    gs = torch.tensor([0.75])
    got = ops.dequantize(data.to(DEV), scale.to(DEV), gs.to(DEV), rows, torch.float32, 32).cpu()
    torch.testing.assert_close(got, want * gs, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------ through TritonBackend


@pytest.fixture(scope="module")
def backends():
    from hf_nvfp4.backends import get_backend

    return get_backend("triton"), ReferenceBackend()


@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_matches_reference(backends, count_op_calls, dtype):
    """Activation and gradient copies (a generator's keys, as the reference splits it), and
    the weight in 32x32 tiles and 1x32 blocks (weight_2d=False)."""
    tri, ref = backends
    calls = count_op_calls("quantize_rowcol_mxfp4", "quantize_2d_mxfp4")
    x = _x(50, 96, dtype, seed=7).to(DEV)
    for row, col in ((MX.x, MX.x_t), (MX.dy, MX.dy_t)):
        got = tri.quantize_rowcol(x, row, col, torch.Generator().manual_seed(3),
                                  values=(True, True))
        want = ref.quantize_rowcol(x, row, col, torch.Generator().manual_seed(3))
        for g, w, name in zip(got, want, ("row", "col"), strict=True):
            assert_qtensor_equal(g, w, name)
    for spec in (MX.w, MX_PLAIN.w):
        for g, w, name in zip(tri.quantize_weight(x, spec), ref.quantize_weight(x, spec),
                              ("w", "w_t"), strict=True):
            assert_qtensor_equal(g, w, f"{name} {spec.tile}")
    assert calls == {"quantize_rowcol_mxfp4": 3, "quantize_2d_mxfp4": 1}


def test_backend_mixed_formats(backends, count_op_calls):
    """An NVFP4 row copy with an MXFP4 column copy, both stochastic with one generator: each
    copy through its own kernel, with the reference's keys."""
    tri, ref = backends
    calls = count_op_calls("quantize_rowcol_mxfp4", "quantize_2d_mxfp4")
    specs = Recipe("nvfp4", "nvfp4", "mxfp4").role_specs()
    x = _x(64, 96, torch.bfloat16, seed=8).to(DEV)
    got = tri.quantize_rowcol(x, specs.dy, specs.dy_t, torch.Generator().manual_seed(4))
    want = ref.quantize_rowcol(x, specs.dy, specs.dy_t, torch.Generator().manual_seed(4))
    for g, w, name in zip(got, want, ("row nvfp4", "col mxfp4"), strict=True):
        assert_qtensor_equal(g, w, name)
    assert calls["quantize_rowcol_mxfp4"] == 1


def test_backend_falls_back(backends, count_op_calls):
    """What the kernels do not cover goes to the reference: a row copy with RHT, a
    stochastic weight, a 3D tensor."""
    tri, ref = backends
    calls = count_op_calls("quantize_rowcol_mxfp4", "quantize_2d_mxfp4")
    x = _x(64, 64, torch.bfloat16, seed=9).to(DEV)
    rht_row = QuantSpec("mxfp4", (1, 32), rht=True)
    got = tri.quantize_rowcol(x, rht_row, None)
    assert got[1] is None
    assert_qtensor_equal(got[0], ref.quantize_rowcol(x, rht_row, None)[0], "rht row")
    sr_w = QuantSpec("mxfp4", (32, 32), "stochastic")
    assert tri.quantize_weight(x, sr_w)[0].fmt == "mxfp4"
    assert tri.quantize_rowcol(x[None], MX.x, None)[0].shape == (1, 64, 64)
    assert calls == {"quantize_rowcol_mxfp4": 0, "quantize_2d_mxfp4": 0}


def test_fake_impls_match_shapes():
    """The ops' meta outputs have the kernels' shapes and dtypes."""
    from hf_nvfp4.kernels import ops

    x = _x(70, 200, torch.bfloat16).to(DEV)
    sign = list(MX.x_t.rht_sign)
    for row, col in ((True, True), (True, False), (False, True)):
        args = (row, col, sign, False, False, None)
        real = ops.quantize_rowcol_mxfp4(x, *args)
        fake = ops.quantize_rowcol_mxfp4(x.to("meta"), *args)
        assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in fake]
    real = ops.quantize_2d_mxfp4(x)
    fake = ops.quantize_2d_mxfp4(x.to("meta"))
    assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in fake]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_linear_fwd_bwd_matches_reference_backend(monkeypatch, count_op_calls, linear_step_pair,
                                                  assert_steps_match, dtype):
    """A whole mxfp4 NVFP4Linear step (RHT, SR, 32x32 weight tiles), triton vs reference
    backend. On the CPU the triton backend's BF16 GEMM is pinned to the reference GEMM (the
    GEMM is tested in test_kernels_gemm.py), so outputs and gradients equal bit for bit
    exactly when every quantized operand does; on a GPU the GEMMs differ in summation order."""
    import hf_nvfp4.backends.triton_backend as tb

    calls = count_op_calls("quantize_rowcol_mxfp4", "quantize_2d_mxfp4")
    if DEV == "cpu":
        monkeypatch.setattr(tb.TritonBackend, "gemm",
                            lambda self, a, b, out_dtype: reference_gemm(a, b, out_dtype))
    outs = linear_step_pair("mxfp4", 96, 64, (3, 20), dtype, DEV)
    assert calls["quantize_rowcol_mxfp4"] >= 2 and calls["quantize_2d_mxfp4"] >= 1
    assert_steps_match(outs)
