"""Triton quantization kernels vs the reference, bit for bit.

Run compiled on a GPU, or in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU). The row/column kernel is called directly with the
SR keys of the reference's generators (``seed_key(draw_seed(child))`` of
``split_generator``), against ``numerics.quantize`` itself.
"""

import importlib.util

import pytest
import torch

from hf_nvfp4.backends.reference import ReferenceBackend
from hf_nvfp4.kernels import is_triton_available
from hf_nvfp4.numerics.hadamard import hadamard_transform
from hf_nvfp4.numerics.quantize import quantize
from hf_nvfp4.numerics.rng import draw_seed, split_generator
from hf_nvfp4.numerics.testing import assert_qtensor_equal
from hf_nvfp4.recipe import QuantSpec, Recipe

_OK, _REASON = is_triton_available()
pytestmark = [
    pytest.mark.skipif(not _OK, reason=_REASON),
    # div_rn(1, 0) of zero blocks: the interpreter's numpy warns, the GPU gives inf silently.
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SPECS = Recipe().role_specs()
NO_RHT = Recipe(rht=False, stochastic_rounding=False).role_specs()
MXFP4 = Recipe("mxfp4", "mxfp4", "mxfp4").role_specs()


@pytest.fixture(autouse=True, scope="module")
def _untimed_picks(untimed_picks):
    """Every kernel runs its first config (see conftest)."""


@pytest.fixture(scope="module")
def backends():
    from hf_nvfp4.backends.triton_backend import TritonBackend

    return TritonBackend(), ReferenceBackend()


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)
    return x.to(dtype)


def _keys(seed: int) -> torch.Tensor:
    """The int32 SR keys of the reference's two child generators of ``seed``."""
    from hf_nvfp4.kernels._common import seed_key

    g_row, g_col = split_generator(torch.Generator().manual_seed(seed))
    return torch.tensor([seed_key(draw_seed(g_row)), seed_key(draw_seed(g_col))],
                        dtype=torch.int32, device=DEV)


def _kernel(x, row, col, seed=7, **kw):
    """quantize_rowcol_nvfp4 with the arguments a backend derives from two QuantSpecs."""
    from hf_nvfp4.kernels.quantize_rowcol import quantize_rowcol_nvfp4

    sign = tuple(col.rht_sign) if col is not None and col.rht else None
    sr = [s is not None and s.rounding == "stochastic" for s in (row, col)]
    return quantize_rowcol_nvfp4(x.to(DEV), row is not None, col is not None, sign, *sr,
                                 _keys(seed) if any(sr) else None, **kw)


def _reference(x, row, col, seed, amax_reduce=None):
    """The row copy of x and the column copy of x^T, one child generator per copy."""
    gens = split_generator(torch.Generator().manual_seed(seed))
    out = []
    for t, spec, gen in ((x, row, gens[0]), (x.t().contiguous(), col, gens[1])):
        out.append(None if spec is None else quantize(
            t, spec.fmt, tile=spec.tile, rounding=spec.rounding, rht=spec.rht,
            rht_sign=spec.rht_sign, generator=gen, amax_reduce=amax_reduce))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view(torch.int16)


def _check_rowcol(x, row, col, seed=7, amax_reduce=None):
    """Codes, scales, global scales and BF16 block values of both copies vs the reference."""
    want = _reference(x, row, col, seed, amax_reduce)
    amax = None
    if amax_reduce is not None:
        amax = torch.stack([amax_reduce(t) for t in _local_amax(x, col)]).to(DEV)
    rd, rs, cd, cs, gs = _kernel(x, row, col, seed, amax=amax)
    rv, rvs, cv, cvs, gsv = _kernel(x, row, col, seed, amax=amax, row_values=True,
                                    col_values=True)
    assert torch.equal(gs.cpu(), gsv.cpu())
    for i, (q, data, scale, vals, vscale) in enumerate(
        ((want[0], rd, rs, rv, rvs), (want[1], cd, cs, cv, cvs))
    ):
        if q is None:
            assert data.numel() == scale.numel() == vals.numel() == 0
            continue
        assert torch.equal(data.cpu(), q.data), f"copy {i} codes"
        assert torch.equal(scale.cpu(), q.scale.view(torch.uint8)), f"copy {i} scales"
        assert float(gs[i]) == float(q.global_scale), f"copy {i} global scale"
        assert torch.equal(_bits(vals), _bits(q.block_values().to(torch.bfloat16))), i
        assert vscale.numel() == 0


def _local_amax(x, col):
    """The reference's per-copy amaxes (column: after the RHT, at the padded shape)."""
    xt = x.t().float()
    if col is not None and col.rht:
        pad = -xt.shape[1] % 16
        xt = hadamard_transform(torch.nn.functional.pad(x.t(), (0, pad)), col.rht_sign).float()
    return x.float().abs().amax(), xt.abs().amax()


DTYPES = [
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
]
SHAPES = [
    pytest.param((64, 64), id="64x64"),
    pytest.param((50, 96), id="ragged_m50"),
    pytest.param((37, 40), id="ragged_m37_k40"),
    pytest.param((200, 336), id="200x336"),
]
ROLES = [
    pytest.param(SPECS.x, SPECS.x_t, id="x_rtn_rht"),
    pytest.param(SPECS.dy, SPECS.dy_t, id="dy_sr_rht"),
    pytest.param(NO_RHT.x, NO_RHT.x_t, id="x_rtn_no_rht"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("row", "col"), ROLES)
def test_rowcol_bitwise(dtype, shape, row, col):
    _check_rowcol(_x(*shape, dtype), row, col)


@pytest.mark.parametrize(
    ("row", "col"),
    [
        pytest.param(SPECS.dy, None, id="row_only_sr"),
        pytest.param(None, SPECS.dy_t, id="col_only_sr"),
        pytest.param(None, NO_RHT.x_t, id="col_only_no_rht"),
    ],
)
def test_rowcol_partial(row, col):
    _check_rowcol(_x(48, 80, torch.bfloat16, seed=1), row, col)


@pytest.mark.parametrize("scale", [pytest.param(1.0, id="local"), pytest.param(3.0, id="x3")])
@pytest.mark.parametrize(("row", "col"), ROLES[:2])
def test_rowcol_given_amax(row, col, scale):
    """A caller's amax (data-parallel: all-reduced) replaces the amax pass."""
    _check_rowcol(_x(50, 64, torch.bfloat16, seed=5), row, col, amax_reduce=lambda a: a * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rht", [pytest.param(True, id="rht"), pytest.param(False, id="no_rht")])
def test_amax_rowcol(dtype, rht):
    from hf_nvfp4.kernels.amax import amax_rowcol

    x = _x(77, 528, dtype, seed=6)
    col = SPECS.x_t if rht else NO_RHT.x_t
    got = amax_rowcol(x.to(DEV), True, True, tuple(col.rht_sign) if rht else None).cpu()
    assert torch.equal(got, torch.stack(_local_amax(x, col)))


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float32, id="fp32")])
def test_amax_all_configs(monkeypatch, dtype):
    """Every tuning candidate of the amax pass gives the same maxima, the multi-tile strips
    included (the interpreter's untimed choice runs one tile per program): BF16 through the
    tensor-core maximum, FP32 through the exact path."""
    from hf_nvfp4.kernels import amax

    x = _x(100, 128, dtype, seed=9)
    sign = tuple(SPECS.x_t.rht_sign)
    want = torch.stack(_local_amax(x, SPECS.x_t))
    for bk, tiles, warps, stages in amax._CONFIGS:
        name = f"BK={bk},tiles={tiles},warps={warps},stages={stages}"
        monkeypatch.setattr(amax, "pick", lambda *a, name=name, **k: name)
        assert torch.equal(amax.amax_rowcol(x.to(DEV), True, True, sign).cpu(), want), name


def test_all_configs(monkeypatch):
    """Every tuning candidate of the row/column kernel gives the same bits."""
    from hf_nvfp4.kernels import quantize_rowcol as qr

    x = _x(200, 272, torch.bfloat16, seed=8)
    for bm, bk, warps in qr._CONFIGS:
        name = f"BM={bm},BK={bk},warps={warps}"
        monkeypatch.setattr(qr, "pick", lambda *a, name=name, **k: name)
        _check_rowcol(x, SPECS.dy, SPECS.dy_t)


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from hf_nvfp4.kernels import interpreting
    from hf_nvfp4.kernels._common import (
        add_directed,
        e2m1_decode,
        e2m1_decode_scaled,
        e2m1_nearest,
        e2m1_nearest_fma,
        e2m1_nearest_value,
        e2m1_nearest_word,
        e2m1_stochastic,
        e2m1_stochastic_fast,
        e4m3_decode,
        rht16,
        rht16_exact,
        round_bf16,
        sr_offsets,
        uniform24,
    )

    @triton.jit
    def _directed_sums(a_ptr, b_ptr, out_ptr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
        """Columns of out: a + b rounded down, up; a - b rounded down, up."""
        offs = tl.arange(0, BLOCK)
        a = tl.load(a_ptr + offs)
        b = tl.load(b_ptr + offs)
        tl.store(out_ptr + offs * 4, add_directed(a, b, False, False, INTERPRET))
        tl.store(out_ptr + offs * 4 + 1, add_directed(a, b, True, False, INTERPRET))
        tl.store(out_ptr + offs * 4 + 2, add_directed(a, b, False, True, INTERPRET))
        tl.store(out_ptr + offs * 4 + 3, add_directed(a, b, True, True, INTERPRET))

    @triton.jit
    def _both_encoders(v_ptr, a_ptr, b_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + offs, mask=offs < n, other=0.0)
        tl.store(a_ptr + offs, e2m1_nearest(v), mask=offs < n)
        tl.store(b_ptr + offs, e2m1_nearest_fma(v), mask=offs < n)

    @triton.jit
    def _fast_helpers(v_ptr, key_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """Columns of out: nearest, nearest_fma, stochastic, stochastic_fast, the draw; then
        the FP32 bits of the nearest code decoded and of e2m1_nearest_value."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + offs, mask=offs < n, other=0.0)
        key = tl.load(key_ptr)
        idx = offs.to(tl.uint32)
        o = out_ptr + offs * 7
        tl.store(o, e2m1_nearest(v), mask=offs < n)
        tl.store(o + 1, e2m1_nearest_fma(v), mask=offs < n)
        tl.store(o + 2, e2m1_stochastic(v, uniform24(idx, key)), mask=offs < n)
        tl.store(o + 3, e2m1_stochastic_fast(v, sr_offsets(idx, key)), mask=offs < n)
        tl.store(o + 4, uniform24(idx, key), mask=offs < n)
        tl.store(o + 5, e2m1_decode(e2m1_nearest_fma(v)).to(tl.int32, bitcast=True),
                 mask=offs < n)
        tl.store(o + 6, e2m1_nearest_value(v).to(tl.int32, bitcast=True), mask=offs < n)

    @triton.jit
    def _decoders(out_ptr, BLOCK: tl.constexpr):
        """Every (code, E4M3 byte) pair: decode times scale, and the fused decode."""
        offs = tl.arange(0, BLOCK)
        code = offs & 15
        s = e4m3_decode((offs >> 4) & 127)
        tl.store(out_ptr + offs * 2, e2m1_decode(code) * s)
        tl.store(out_ptr + offs * 2 + 1, e2m1_decode_scaled(code, s))


    @triton.jit
    def _nearest_words(v_ptr, word_ptr, codes_ptr, BLOCK: tl.constexpr):
        """Rows of 8 of v: the fused word (word) and e2m1_nearest of each element (codes)."""
        rows = tl.arange(0, BLOCK)
        v = ()
        for j in tl.static_range(8):
            x = tl.load(v_ptr + rows * 8 + j)
            tl.store(codes_ptr + rows * 8 + j, e2m1_nearest(x))
            v = v + (x,)
        tl.store(word_ptr + rows, e2m1_nearest_word(v, 0))

    @triton.jit
    def _rht_both(x_ptr, m_ptr, out_ptr, dot_ptr, redo_ptr, SIGN: tl.constexpr,
                  INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
        """Rows of 16 of x [BLOCK, 16]: rht16 (out; redone by rht16_exact when it says so,
        the flag in redo) and a tl.dot with D H / 4 (dot), both rounded to x's dtype."""
        rows = tl.arange(0, BLOCK)
        v = ()
        for j in tl.static_range(16):
            v = v + (tl.load(x_ptr + rows * 16 + j),)
        y, redo = rht16(v, SIGN, INTERPRET)
        tl.store(redo_ptr, tl.zeros([], tl.int32) + (redo & (x_ptr.dtype.element_ty
                                                             == tl.bfloat16)))
        if redo:
            y = rht16_exact(x_ptr + rows * 16, 1, 16, rows >= 0, SIGN, INTERPRET)
        for j in tl.static_range(16):
            tl.store(out_ptr + rows * 16 + j, y[j].to(out_ptr.dtype.element_ty))
        c16 = tl.arange(0, 16)
        x = tl.load(x_ptr + rows[:, None] * 16 + c16[None, :])
        m = tl.load(m_ptr + c16[:, None] * 16 + c16[None, :])
        if x.dtype == tl.float32 or INTERPRET:
            d = tl.dot(x.to(tl.float32), m, input_precision="ieee")
        else:
            d = tl.dot(x, m.to(x.dtype))
        if INTERPRET and x.dtype == tl.bfloat16:  # the interpreter's cast truncates
            d = round_bf16(d)
        tl.store(dot_ptr + rows[:, None] * 16 + c16[None, :], d.to(dot_ptr.dtype.element_ty))


def _exact_sum_blocks(n: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, 16] blocks whose 16 RHT terms are exact to sum in FP32 (exponents within 11
    binades of the block's base, 8-bit significands), bases over the dtype's normal range
    (BF16: 2^-120 to 2^123; Triton's interpreter converts BF16 subnormals to FP32 wrongly)."""
    g = torch.Generator().manual_seed(3)
    lo, hi = (-120, 112) if dtype == torch.bfloat16 else (-24, 1)
    base = torch.randint(lo, hi, (n, 1), generator=g)
    e = base + torch.randint(0, 12, (n, 16), generator=g)
    mant = 1 + torch.randint(0, 128, (n, 16), generator=g) / 128
    sign = torch.where(torch.rand(n, 16, generator=g) < 0.5, -1.0, 1.0)
    x = (sign * mant * torch.pow(2.0, e.double())).to(dtype)
    x[torch.rand(n, 16, generator=g) < 0.1] = 0.0
    return x


def _rht16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """rht16 (with its redo) and the tensor-core-style dot of the rows of 16 of x."""
    from hf_nvfp4.kernels._common import sign_mask
    from hf_nvfp4.numerics.hadamard import TE_RHT_SIGN, rht_matrix

    out = torch.empty_like(x, device=DEV)
    dot = torch.empty_like(out)
    redo = torch.zeros(1, dtype=torch.int32, device=DEV)
    _rht_both[(1,)](x.to(DEV), rht_matrix(TE_RHT_SIGN).to(DEV), out, dot, redo,
                    SIGN=sign_mask(TE_RHT_SIGN), INTERPRET=interpreting(), BLOCK=x.shape[0])
    return out.cpu(), dot.cpu(), bool(redo.item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rht16_butterfly_exact(dtype):
    """rht16 gives the reference's bits; on 16-bit blocks whose 16-term sums are exact in
    FP32 (over the whole exponent range, and signed zeros: never -0) without a redo, and
    equal to the tensor-core dot's; FP32 on any input (the exact path, always)."""
    from hf_nvfp4.numerics.hadamard import TE_RHT_SIGN, rht_matrix

    n = 1024
    x = _x(n // 16, 16 * 16, dtype, seed=9).reshape(n, 16) if dtype == torch.float32 else \
        _exact_sum_blocks(n, dtype)
    # zero blocks: in row j every term of output j is -0 (a sum from -0 would give -0)
    neg = torch.cat([rht_matrix(TE_RHT_SIGN).t() > 0,
                     torch.rand(16, 16, generator=torch.Generator().manual_seed(4)) < 0.5])
    x[:32] = torch.where(neg, -0.0, 0.0).to(dtype)
    out, dot, redo = _rht16(x)
    want = hadamard_transform(x, TE_RHT_SIGN)
    assert torch.equal(_bits(out), _bits(want))
    if dtype == torch.bfloat16:
        assert not redo  # exact FP32 sums never take the slow path
    if dtype != torch.float32:
        assert torch.equal(_bits(dot), _bits(want))
    assert not torch.signbit(out[:32]).any()


@pytest.mark.parametrize("dtype", DTYPES[::2])
def test_rht16_correctly_rounded_at_midpoints(dtype):
    """Blocks whose exact outputs lie within half an FP32 ulp of a BF16/FP16 midpoint (both
    sides), or cancel after an FP32 rounding: rht16 (BF16: through its redo) gives the
    correctly rounded transform (exact integers) as the reference does; rounding the FP32
    sum, as the tensor-core dot does, misses about half of them."""
    from hf_nvfp4.numerics.testing import exact_rht, rht_tie_blocks

    x = rht_tie_blocks(64, dtype, seed=1)
    want = exact_rht(x)
    assert torch.equal(_bits(hadamard_transform(x)), _bits(want))
    out, dot, redo = _rht16(x)
    assert torch.equal(_bits(out), _bits(want))
    assert redo == (dtype == torch.bfloat16)
    assert (_bits(dot) != _bits(want)).sum() > 100  # the test data can tell


def test_rht16_fast_path_on_wide_blocks():
    """BF16 blocks spanning many binades (inexact FP32 sums, mostly far from midpoints): the
    FP32 butterfly's outputs, kept where the check passes, are the reference's bits; a
    program of such blocks rarely needs the redo."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(512, 16, generator=g)
         * torch.pow(2.0, torch.randint(-40, 1, (512, 16), generator=g).double())).bfloat16()
    want = hadamard_transform(x)
    out, _, _ = _rht16(x)
    assert torch.equal(_bits(out), _bits(want))
    redos = [_rht16(x[i:i + 32])[2] for i in range(0, 512, 32)]
    assert sum(redos) < len(redos)


def _directed_reference(a: float, b: float, up: bool) -> float:
    """``a + b`` (FP32 values) rounded to FP32 toward +inf (``up``) or -inf, from the exact
    rational sum; IEEE's signs of zero (an exact zero is -0 rounding down, unless both
    operands are +0, and +0 rounding up, unless both are -0)."""
    import math
    from fractions import Fraction

    import numpy as np

    big = float(np.finfo(np.float32).max)
    exact = Fraction(a) + Fraction(b)
    if exact == 0:
        both = math.copysign(1, a) + math.copysign(1, b)
        return 0.0 if (both > 0 if not up else both >= 0) else -0.0
    if exact > Fraction(big):
        return math.inf if up else big
    if exact < -Fraction(big):
        return -big if up else -math.inf
    c = np.float32(float(exact))
    toward = np.float32(math.inf if up else -math.inf)
    away = np.float32(-math.inf if up else math.inf)
    while (Fraction(float(c)) < exact) if up else (Fraction(float(c)) > exact):
        c = np.nextafter(c, toward)
    while True:  # the bound closest to the exact sum
        d = np.nextafter(c, away)
        if not math.isfinite(float(d)) or ((Fraction(float(d)) < exact) if up
                                           else (Fraction(float(d)) > exact)):
            break
        c = d
    return float(c)


def test_add_directed():
    """add_directed (PTX add.rm/add.rp compiled; TwoSum in the interpreter) is IEEE's
    directed rounding on sums and differences near and far apart in magnitude, subnormal
    steps, signed zeros, exact cancellations and overflow (the interpreter's version: but
    for the sign of an exact zero rounded down and overflows, which rht16 does not need)."""
    import math

    g = torch.Generator().manual_seed(21)
    n = 1024
    big = torch.finfo(torch.float32).max
    a = torch.randn(n, generator=g) * torch.pow(2.0, torch.randint(-30, 30, (n,), generator=g))
    b = torch.randn(n, generator=g) * torch.pow(2.0, torch.randint(-30, 30, (n,), generator=g))
    b[:64] = -a[:64]  # exact cancellations
    b[64:128] = a[64:128] * 2.0**-24  # the last bit and below
    special = [(0.0, -0.0), (-0.0, -0.0), (0.0, 0.0), (-0.0, 0.0), (1.0, 2.0**-149),
               (-1.0, 2.0**-149), (2.0**-149, 2.0**-149), (2.0**-126, -2.0**-149),
               (big, big), (-big, -big), (big, -big), (big, 2.0**103), (3.0, 2.0**-100),
               (-3.0, -(2.0**-100)), (1.0, -(2.0**-25)), (math.inf, 1.0), (-math.inf, 1.0)]
    for i, (x, y) in enumerate(special):
        a[128 + i], b[128 + i] = x, y
    out = torch.empty(n, 4, device=DEV)
    _directed_sums[(1,)](a.to(DEV), b.to(DEV), out, INTERPRET=interpreting(), BLOCK=n)
    got = out.cpu()
    for i in range(n):
        x, y = float(a[i]), float(b[i])
        if not (math.isfinite(x) and math.isfinite(y)):
            want = [x + y] * 4
        else:
            want = [_directed_reference(x, y, False), _directed_reference(x, y, True),
                    _directed_reference(x, -y, False), _directed_reference(x, -y, True)]
        w = torch.tensor(want, dtype=torch.float32)
        if interpreting():
            emulated = (w != 0) & (w.abs() < big)  # zeros and overflows: IEEE compiled only
            if i < 64:  # exact cancellations: +0 in every direction
                assert torch.equal(_bits(got[i, [0, 1]]), _bits(torch.zeros(2)))
            got[i][~emulated] = w[~emulated]
        assert torch.equal(_bits(got[i]), _bits(w)), (i, x, y, got[i].tolist(), want)


def test_rht16_on_blocks_spanning_the_exponent_range():
    """BF16 blocks spanning up to 200 binades, with exactly cancelling pairs of large terms
    around small ones (sums an FP32 interval cannot decide, FP64 token-order sums that are
    inexact): rht16 with its redo gives the reference's bits, and on the blocks that the
    reference's FP64 sum holds exactly, the correctly rounded transform (exact integers)."""
    from hf_nvfp4.numerics.hadamard import TE_RHT_SIGN, rht_matrix
    from hf_nvfp4.numerics.testing import exact_rht

    g = torch.Generator().manual_seed(8)
    n = 256
    e = torch.randint(-100, 100, (n, 16), generator=g)
    e[1::2] = e[1::2, :1] // 4 + torch.randint(0, 30, (n // 2, 16), generator=g)  # narrow
    x = torch.randn(n, 16, generator=g).double() * torch.pow(2.0, e.double())
    m = rht_matrix(TE_RHT_SIGN).double() * 4  # +-1
    for r in range(0, n, 2):  # wide blocks: a large pair cancelling in half of the outputs
        i, j = torch.randperm(16, generator=g)[:2].tolist()
        big = float(2.0 ** torch.randint(20, 60, (1,), generator=g))
        x[r, i] = big * m[i, 0]
        x[r, j] = -big * m[j, 0] if r % 4 else big * m[j, 0]
    x = x.clamp(-2.0**120, 2.0**120).bfloat16()
    x[(x != 0) & (x.abs() < 2.0**-120)] = 0.0  # the interpreter's BF16 subnormals
    want = hadamard_transform(x)
    out, _, _ = _rht16(x)
    assert torch.equal(_bits(out), _bits(want))
    spread = x.float().abs().clamp_min(2.0**-126).log2()
    held = (spread.amax(1) - spread.amin(1)) <= 40
    assert held.sum() > 20
    assert torch.equal(_bits(want[held]), _bits(exact_rht(x[held])))


def test_e2m1_nearest_fma_on_ties():
    """The one-FMA nearest-even encoder equals e2m1_nearest on ties, neighbours, saturation."""
    ties = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0,
                         5.0, 6.0, 7.0, 1e30, 1e-45, 1e-40, 3.0e38])
    near = torch.cat([ties, torch.nextafter(ties, torch.full_like(ties, 1e38)),
                      torch.nextafter(ties, torch.zeros_like(ties)),
                      torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 7])
    v = torch.cat([near, -near]).to(DEV)
    a = torch.empty(v.shape, dtype=torch.int32, device=DEV)
    b = torch.empty_like(a)
    _both_encoders[(-(-v.numel() // 1024),)](v, a, b, v.numel(), BLOCK=1024)
    assert torch.equal(a, b)


def test_e2m1_nearest_word():
    """The fused encode + pack gives e2m1_nearest's codes in nibbles 0..7 on ties, their
    neighbours, saturation, subnormals and signed zeros, in every nibble."""
    ties = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0,
                         5.0, 6.0, 7.0, 1e30, 1e-45, 1e-40, 3.0e38])
    near = torch.cat([ties, torch.nextafter(ties, torch.full_like(ties, 1e38)),
                      torch.nextafter(ties, torch.zeros_like(ties)),
                      torch.rand(8200, generator=torch.Generator().manual_seed(2)) * 7])
    v = torch.cat([near, -near])[torch.randperm(2 * near.numel(),
                                               generator=torch.Generator().manual_seed(3))]
    v = v[: 8 * 2048].reshape(2048, 8).contiguous().to(DEV)
    word = torch.empty(2048, dtype=torch.int32, device=DEV)
    codes = torch.empty(2048, 8, dtype=torch.int32, device=DEV)
    _nearest_words[(1,)](v, word, codes, BLOCK=2048)
    want = (codes.cpu().long() << (4 * torch.arange(8))).sum(1)
    want = torch.where(want >= 2**31, want - 2**32, want).to(torch.int32)
    assert torch.equal(word.cpu(), want)


def _sr_edge_values(n: int, key: int) -> torch.Tensor:
    """Magnitudes on every E2M1 interval whose fraction ``p * 2^24`` is the element's draw
    ``r24`` (and one step either side, and half-way below 0.25), plus random ones."""
    from hf_nvfp4.numerics.rng import keyed_uniform

    r24 = (keyed_uniform(torch.tensor(key), (n,), "cpu").double() * 2**24)
    g = torch.Generator().manual_seed(1)
    lo_step = [(0.0, 0.5), (0.5, 0.5), (1.0, 0.5), (1.5, 0.5), (2.0, 1.0), (3.0, 1.0),
               (4.0, 2.0)]
    pick = torch.randint(0, len(lo_step), (n,), generator=g)
    lo = torch.tensor([lo_step[i][0] for i in pick], dtype=torch.float64)
    step = torch.tensor([lo_step[i][1] for i in pick], dtype=torch.float64)
    delta = torch.randint(-1, 2, (n,), generator=g).double()
    kind = torch.randint(0, 4, (n,), generator=g)
    m = lo + (r24 + delta) / 2**24 * step
    m = torch.where(kind == 1, (r24 + 0.5) * 2.0**-26 * torch.rand(n, generator=g).double()
                    .lt(0.5).double().add(1.0), m)
    m = torch.where(kind == 2, torch.rand(n, generator=g).double() * 7, m)
    m = torch.where(kind == 3, torch.rand(n, generator=g).double() * 2.0**-20, m)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (m * sign).float()


def test_fast_encoders():
    """The fused SR / nearest encoders give the codes of the reference-shaped encoders on
    ties, saturation, subnormals and fractions equal to the draw."""
    key = 0xA545F491 - (1 << 32)
    v = _sr_edge_values(60000, key)
    v[:8] = torch.tensor([0.0, -0.0, 6.0, -6.0, 7.5, 1e30, 1e-45, -3e-39])
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # nearest: ties to even
    ties = torch.cat([ties, torch.nextafter(ties, torch.zeros_like(ties)),
                      torch.nextafter(ties, torch.full_like(ties, 8.0))])
    v = torch.cat([v, ties, -ties]).to(DEV)
    out = torch.empty(v.numel(), 7, dtype=torch.int32, device=DEV)
    keys = torch.tensor([key], dtype=torch.int32, device=DEV)
    _fast_helpers[(-(-v.numel() // 1024),)](v, keys, out, v.numel(), BLOCK=1024)
    out = out.cpu()
    assert torch.equal(out[:, 0], out[:, 1])
    assert torch.equal(out[:, 2], out[:, 3])
    assert (out[:, 2] != out[:, 0]).any()  # the draws decide some elements
    # the value without the code: the decoded code's bits, signed zeros included
    assert torch.equal(out[:, 5], out[:, 6])
    assert (out[:, 6] == -(1 << 31)).any()


def test_decode_scaled():
    out = torch.empty(16 * 128, 2, dtype=torch.float32, device=DEV)
    _decoders[(1,)](out, BLOCK=16 * 128)
    out = out.cpu()
    assert torch.equal(out[:, 0].view(torch.int32), out[:, 1].view(torch.int32))


def test_zero_blocks_rowcol():
    x = _x(40, 64, torch.bfloat16, seed=2)
    x[:16, :32] = 0
    x[:, 48:] = 0
    x[5, 3] = -0.0
    for xx in (x, torch.zeros_like(x)):
        _check_rowcol(xx, SPECS.x, SPECS.x_t)
        _check_rowcol(xx, SPECS.dy, SPECS.dy_t)


def test_zero_blocks_weight(backends, count_op_calls):
    calls = count_op_calls("quantize_2d")
    x = _x(40, 64, torch.bfloat16, seed=2).to(DEV)
    x[:16, :32] = 0
    x[:, 48:] = 0
    tri, ref = backends
    for g, w in zip(tri.quantize_weight(x, SPECS.w), ref.quantize_weight(x, SPECS.w), strict=True):
        assert_qtensor_equal(g, w, name="2d")
    assert calls == {"quantize_2d": 1}  # the kernel ran (no silent fallback to the reference)


def test_extreme_scales():
    """Block amaxes spanning the E4M3 subnormals and the saturation at 448."""
    x = _x(32, 256, torch.float32, seed=3)
    x[:, :16] *= 1e6
    x[:, 16:64] *= 1e-7
    _check_rowcol(x, SPECS.x, SPECS.x_t)


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize(
    "shape", [pytest.param((64, 96), id="64x96"), pytest.param((40, 72), id="ragged_40x72")]
)
@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(SPECS.w, id="2d_16x16"),
        pytest.param(Recipe(weight_2d=False).role_specs().w, id="1x16"),
        pytest.param(MXFP4.w, id="mxfp4_32x32"),
    ],
)
def test_weight_bitwise(backends, count_op_calls, dtype, shape, spec):
    calls = count_op_calls("quantize_2d", "quantize_2d_mxfp4", "quantize_rowcol")
    w = _x(*shape, dtype, seed=4).to(DEV)
    tri, ref = backends
    for name, g, r in zip(("w", "w_t"), tri.quantize_weight(w, spec),
                          ref.quantize_weight(w, spec), strict=True):
        assert_qtensor_equal(g, r, name=name)
    assert sum(calls.values()) == 1  # one kernel wrote both (no fallback to the reference)


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize(
    "shape", [pytest.param((64, 96), id="64x96"), pytest.param((40, 72), id="ragged_40x72")]
)
@pytest.mark.parametrize("spec", [pytest.param(SPECS.w, id="2d_16x16"),
                                  pytest.param(Recipe(weight_2d=False).role_specs().w, id="1x16")])
def test_weight_values_bitwise(backends, count_op_calls, dtype, shape, spec):
    """The training forward's W as BF16 block values: the reference's block values of its
    packed W, bit for bit (zero in the padding columns), its global scale, and the same
    packed W^T."""
    from hf_nvfp4.backends.base import BlockValues

    calls = count_op_calls("quantize_2d", "quantize_rowcol")
    w = _x(*shape, dtype, seed=4).to(DEV)
    w[:16, :16] = 0  # an all-zero tile
    tri, ref = backends
    (got, got_t), (want, want_t) = tri.quantize_weight(w, spec, values=True), ref.quantize_weight(
        w, spec)
    assert isinstance(got, BlockValues)
    n, k16 = shape[0], -(-shape[1] // 16) * 16
    assert got.values.dtype == torch.bfloat16 and tuple(got.values.shape) == (n, k16)
    assert torch.equal(got.values.float().cpu(), want.block_values()[:n].cpu())
    assert int(torch.count_nonzero(got.values[:16, :16])) == 0
    assert torch.equal(got.global_scale.reshape(()).cpu(), want.global_scale.reshape(()).cpu())
    assert_qtensor_equal(got_t, want_t, name="w_t")
    assert sum(calls.values()) == 1


@pytest.mark.parametrize("spec", [pytest.param(SPECS.w, id="2d_16x16"),
                                  pytest.param(Recipe(weight_2d=False).role_specs().w, id="1x16")])
def test_weight_shard_with_the_whole_weights_amax(backends, spec):
    """A shard quantized with the whole weight's amax (FSDP2's quantized all-gather) has the
    whole weight's codes and scales on its rows, and its global scale."""
    w = _x(64, 96, torch.bfloat16, seed=5)
    w[40:48, :16] *= 50  # the whole weight's amax lies outside the shard
    tri, ref = backends
    whole = ref.quantize_weight(w, spec)[0]
    amax = w.float().abs().amax()
    for backend in (tri, ref):
        shard = backend.quantize_weight(w[16:32].contiguous(), spec, amax=amax)[0]
        assert torch.equal(shard.data, whole.data[16:32])
        assert torch.equal(shard.scale.view(torch.uint8), whole.scale[16:32].view(torch.uint8))
        assert torch.equal(shard.global_scale.reshape(()), whole.global_scale.reshape(()))


def test_stochastic_rounding_statistics():
    """E[dequantize] = x for stochastic rounding, and the kernel's draws are the reference's."""
    m, k = 64, 256
    levels = torch.linspace(-5.9, 5.9, k - 16)
    x = torch.cat([torch.full((m, 16), 6.0), levels.expand(m, -1)], dim=1)  # scale fixed
    spec = QuantSpec("nvfp4", (1, 16), "stochastic")
    means = []
    for seed in range(4):
        want = _reference(x, spec, None, seed)[0]
        got = _kernel(x, spec, None, seed)[0]
        assert torch.equal(got.cpu(), want.data)
        means.append(want.dequantize()[:, 16:].mean(0))
    mean = torch.stack(means).mean(0)
    # per level: 256 draws of a Bernoulli over a grid step <= 2: std of the mean <= 1/16
    err = (mean - levels).abs()
    assert float(err.max()) < 0.3, float(err.max())
    assert float(err.mean()) < 0.08, float(err.mean())
    nearest = _reference(x, QuantSpec("nvfp4", (1, 16)), None, 0)[0]
    assert float((nearest.dequantize()[:, 16:].mean(0) - levels).abs().mean()) > float(
        err.mean()
    )


def test_dequantize_op():
    from hf_nvfp4.kernels.ops import dequantize

    q = _reference(_x(37, 48, torch.bfloat16).to(DEV), SPECS.x, None, 0)[0]
    got = dequantize(q.data, q.scale.view(torch.uint8), q.global_scale, 37, torch.float32)
    assert torch.equal(got, q.dequantize(torch.float32))
    vals = dequantize(q.data, q.scale.view(torch.uint8), None, 37, torch.bfloat16)
    assert torch.equal(vals, q.block_values().to(torch.bfloat16))


def test_fake_shapes():
    from hf_nvfp4.kernels import ops

    x = torch.empty(40, 72, device="meta", dtype=torch.bfloat16)
    keys = torch.empty(2, device="meta", dtype=torch.int32)
    rd, rs, cd, cs, gs = ops.quantize_rowcol(x, True, True, [1] * 16, False, True, keys, None,
                                             False, False)
    assert [t.shape for t in (rd, rs, cd, cs, gs)] == [
        (40, 40), (40, 5), (72, 24), (72, 3), (2,)
    ]
    rv, rs, cv, cs, _ = ops.quantize_rowcol(x, True, True, None, False, False, None, None,
                                            True, True)
    assert [t.shape for t in (rv, rs, cv, cs)] == [(40, 80), (0,), (72, 48), (0,)]
    assert [t.shape for t in ops.quantize_2d(x)[:4]] == [(48, 40), (48, 5), (80, 24), (80, 3)]
    vals, scale = ops.quantize_2d(x, None, True)[:2]
    assert [tuple(vals.shape), tuple(scale.shape), vals.dtype] == [(40, 80), (0,), torch.bfloat16]


@pytest.mark.parametrize("weight_2d", [True, False], ids=["2d_16x16", "1x16"])
def test_linear_fwd_bwd_matches_reference_backend(monkeypatch, count_op_calls, linear_step_pair,
                                                  assert_steps_match, weight_2d):
    """A whole NVFP4Linear step (RHT, SR), triton vs reference backend. The forward's x and W
    reach the GEMM as block values, so a step dequantizes only the two packed copies the
    backward saved (W^T, x^T). On the CPU the triton backend's GEMM is pinned to the
    reference GEMM's arithmetic (FP32 products of the block values; the Triton GEMM is tested
    in test_kernels_gemm.py), so outputs and gradients equal bit for bit exactly when every
    quantized operand does; on a GPU the GEMMs differ in summation order."""
    import hf_nvfp4.backends.triton_backend as tb

    def values_gemm(self, a, b, out_dtype):
        out = self._values(a).float() @ self._values(b).float().t()
        return (out * (self._global(a, out) * self._global(b, out))).to(out_dtype)

    calls = count_op_calls("quantize_2d", "quantize_rowcol", "dequantize")
    if DEV == "cpu":
        monkeypatch.setattr(tb.TritonBackend, "gemm", values_gemm)
    outs = linear_step_pair(Recipe(weight_2d=weight_2d), 96, 64, (3, 20), torch.float32, DEV,
                            sr_seed=3)
    assert calls == {"quantize_2d": int(weight_2d), "quantize_rowcol": 3 - weight_2d,
                     "dequantize": 2}
    assert_steps_match(outs)


def test_clear_error_without_triton(monkeypatch):
    from hf_nvfp4.backends import triton_backend

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    triton_backend._load_ops.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="pip install"):
            triton_backend.TritonBackend()
    finally:
        triton_backend._load_ops.cache_clear()


def _tokens(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """x [M, k] whose column copy x^T [k, M] holds ``blocks`` [k * M / 16, 16] row by row."""
    return blocks.reshape(k, -1).t().contiguous()


def test_rowcol_rht_correctly_rounded_at_midpoints():
    """The column copy's RHT through the row/column kernel (redo path) at midpoint ties:
    codes, scales and values are the reference's (the exact transform). The second tensor's
    block scales depend on the rounding: 5.5 from the correctly rounded maximum, 5.0 from
    the FP32 sum rounded to BF16."""
    from hf_nvfp4.numerics.testing import exact_rht, rht_amax_tie_blocks, rht_tie_blocks

    ties = rht_tie_blocks(24, torch.bfloat16, seed=2)
    _check_rowcol(_tokens(ties, 8), SPECS.x, SPECS.x_t)
    blocks = rht_amax_tie_blocks(24, seed=3)
    assert float(exact_rht(blocks).abs().max()) == 1.2578125
    x = _tokens(blocks, 8)
    _check_rowcol(x, SPECS.x, SPECS.x_t, amax_reduce=lambda a: torch.tensor(107.0))
    _check_rowcol(x, SPECS.dy, SPECS.dy_t, amax_reduce=lambda a: torch.tensor(107.0))
    scales = quantize(x.t().contiguous(), "nvfp4", rht=True, amax_reduce=lambda a: torch.tensor(
        107.0)).scale.float()
    assert torch.all(scales == 5.5)


def test_rowcol_fixup_pass_redoes_only_flagged_programs():
    """Midpoint-tie blocks in one program's tile of an otherwise ordinary x: the main pass
    flags that program, the fix-up launch redoes its column copy exactly, and every other
    program keeps the butterfly's output: both copies, RTN and SR, equal the reference."""
    from hf_nvfp4.numerics.testing import rht_tie_blocks

    xt = _x(256, 256, torch.bfloat16, seed=11)  # x^T [K, M]: blocks along M
    xt[:8, :16] = rht_tie_blocks(8, torch.bfloat16, seed=12)  # program (0, 0) only
    x = xt.t().contiguous()
    _check_rowcol(x, SPECS.x, SPECS.x_t)
    _check_rowcol(x, SPECS.dy, SPECS.dy_t)


def test_amax_rht_midpoint_in_one_strip_every_config(monkeypatch):
    """A midpoint-tie block in the third row tile and third 64-column block of ordinary x: in
    every tuning candidate the fix-up launch finds the global FP32 maximum next to a midpoint
    and redoes the strips that may hold the exact one (the tie's: 1.2578125, where the FP32
    sum rounds to 1.25). With a larger, exactly representable maximum elsewhere (3.0) no strip
    is redone and the tie does not matter."""
    from hf_nvfp4.kernels import amax
    from hf_nvfp4.numerics.testing import exact_rht, rht_amax_tie_blocks

    g = torch.Generator().manual_seed(13)
    x = (torch.randn(256, 192, generator=g) * 0.05).bfloat16()
    x[128:144, 130] = rht_amax_tie_blocks(1, seed=14)[0]
    louder = x.clone()
    louder[16:32, 5] = 0.0
    louder[16, 5] = 12.0  # its block's 16 outputs are +-12/4
    sign = tuple(SPECS.x_t.rht_sign)
    for t, want in ((x, 1.2578125), (louder, 3.0)):
        assert float(exact_rht(t.t().contiguous().reshape(-1, 16)).abs().max()) == want
        for bk, tiles, warps, stages in amax._CONFIGS:
            name = f"BK={bk},tiles={tiles},warps={warps},stages={stages}"
            monkeypatch.setattr(amax, "pick", lambda *a, name=name, **k: name)
            got = amax.amax_rowcol(t.to(DEV), False, True, sign).cpu()
            assert float(got[1]) == want, name


@pytest.mark.parametrize("dtype", DTYPES)
def test_amax_rht_correctly_rounded_at_midpoints(dtype):
    """The amax pass's RHT maximum is the correctly rounded one when the largest output sits
    just above a midpoint (BF16: tensor-core sum, then the exact redo of the strip), and on
    the midpoint-tie blocks (a block's exact outputs, the maximum over them), FP16/FP32 on
    the exact path."""
    from hf_nvfp4.kernels.amax import amax_rowcol
    from hf_nvfp4.numerics.testing import exact_rht, rht_amax_tie_blocks, rht_tie_blocks

    sign = tuple(SPECS.x_t.rht_sign)
    cases = [rht_amax_tie_blocks(8, seed=4)] if dtype == torch.bfloat16 else []
    if dtype != torch.float32:
        ties = rht_tie_blocks(32, dtype, seed=5)
        cases += [ties[i:i + 1] for i in range(0, 32, 5)]  # one block: its maximum decides
    else:
        cases = [_x(4, 16, dtype, seed=6).reshape(-1, 16)]
    for blocks in cases:
        x = _tokens(blocks, blocks.shape[0])
        got = amax_rowcol(x.to(DEV), True, True, sign).cpu()
        want = exact_rht(blocks).float().abs().max() if dtype != torch.float32 else \
            hadamard_transform(blocks).abs().max()
        assert float(got[1]) == float(want)
        assert float(got[0]) == float(x.float().abs().max())
