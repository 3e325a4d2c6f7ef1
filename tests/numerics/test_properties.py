"""Properties: error bounds (hypothesis), idempotence, padding, 2D consistency, empty tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hf_nvfp4.numerics import e2m1, quantize

from .cases import DISTRIBUTIONS, make_input

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLACK = 2.0**-16  # FP32 roundings of e, x * e and the dequantization (a few ulps, 2^-23 each)


@st.composite
def fp32_arrays(draw, max_rows=4, max_cols=70, lo=1e-30, hi=1e30):
    """FP32 matrices mixing magnitudes over 60 decades; tensor amax is 0 or >= ``lo``
    (below it S_dec = 1/S_enc leaves the FP32 normal range and the bound's slack is wrong)."""
    shape = (draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols)))
    hi = float(np.float32(hi))
    elems = st.floats(-hi, hi, width=32, allow_subnormal=False)
    x = draw(hnp.arrays(np.float32, shape, elements=elems))
    amax = np.abs(x).max()
    assume(amax == 0 or amax >= lo)
    return x


def _per_element_scale(q, shape) -> np.ndarray:
    s = q.scale.float() if q.scale.dtype != torch.uint8 else torch.pow(2.0, q.scale.float() - 127)
    s = s.repeat_interleave(q.format.block, dim=-1).double().numpy()
    return s[tuple(slice(0, n) for n in shape)]


def _half_spacing(v: np.ndarray) -> np.ndarray:
    """Largest nearest-rounding error (E2M1 units) at |v|: half the local grid spacing, or the
    saturation error |v| - 6 above the grid."""
    return np.where(v <= 2, 0.25, np.where(v <= 4, 0.5, np.where(v <= 6, 1.0, v - 6.0)))


def _block_amax(x: np.ndarray, tile) -> np.ndarray:
    t = torch.from_numpy(x).double().abs()
    th, tw = tile
    r, c = t.shape
    t = F.pad(t, (0, -c % tw, 0, -r % th))
    R, C = t.shape
    a = t.reshape(R // th, th, C // tw, tw).amax(dim=(1, 3), keepdim=True)
    return a.expand(R // th, th, C // tw, tw).reshape(R, C)[:r, :c].numpy()


@SETTINGS
@given(x=fp32_arrays(max_rows=20), tile_2d=st.booleans())
def test_nvfp4_error_bound(x, tile_2d):
    """|x - deq| <= h(|x| / d) * d with d = fp32(s_b) * S_dec and h the half spacing.

    With s_b the RNE of s = block_amax * S_enc / 6, a normal s_b is within 2^-4 * s of s,
    so the block max maps to at most 6 / (1 - 2^-4) = 6.4 and saturates by at most 0.4 d;
    hence also, a priori, |x - deq| <= d <= block_amax * (1 + 2^-4) / 6. A block whose
    s rounds to 0 (s <= 2^-10) dequantizes to 0 with |x| <= 6 * 2^-10 * S_dec.
    """
    tile = (16, 16) if tile_2d else (1, 16)
    q = quantize(torch.from_numpy(x), tile=tile)
    deq = q.dequantize().double().numpy()
    x64 = x.astype(np.float64)
    err = np.abs(x64 - deq)
    sb = _per_element_scale(q, x.shape)
    s_dec = float(q.global_scale)
    d = sb * s_dec
    zero = sb == 0
    assert (deq[zero] == 0).all()
    assert (np.abs(x64[zero]) <= 6 * 2.0**-10 * s_dec * (1 + SLACK)).all()
    nz = ~zero
    v = np.abs(x64[nz]) / d[nz]
    bound = _half_spacing(v) * d[nz] * (1 + SLACK) + np.abs(x64[nz]) * SLACK
    assert (err[nz] <= bound).all(), np.max(err[nz] / bound)
    normal = sb >= 2.0**-5
    bamax = _block_amax(x, tile)
    assert (bamax[normal] / d[normal] <= 6.4 * (1 + SLACK)).all()
    assert (err[normal] <= bamax[normal] * (1 + 2.0**-4) / 6 * (1 + SLACK)).all()


@SETTINGS
@given(x=fp32_arrays(max_cols=100, lo=1e-36), tile_2d=st.booleans())
def test_mxfp4_error_bound(x, tile_2d):
    """2^k >= block_amax / 6, so nothing saturates: |x - deq| <= h(|x| / 2^k) * 2^k."""
    tile = (32, 32) if tile_2d else (1, 32)
    q = quantize(torch.from_numpy(x), "mxfp4", tile=tile)
    d = _per_element_scale(q, x.shape)
    x64 = x.astype(np.float64)
    err = np.abs(x64 - q.dequantize().double().numpy())
    v = np.abs(x64) / d
    assert (v <= 6).all()
    assert (err <= _half_spacing(v) * d * (1 + SLACK)).all()
    assert (err <= _block_amax(x, tile) / 3).all()  # 2^(k-1) < amax / 6 and h <= 1


@SETTINGS
@given(
    x=fp32_arrays(max_rows=3, max_cols=300, lo=1e-36),
    fmt=st.sampled_from([("fp8_block", (1, 128)), ("fp8_block", (128, 128)), ("mxfp8", (1, 32))]),
)
def test_fp8_error_bound(x, fmt):
    """E4M3 RNE: relative error <= 2^-4 for normals, absolute <= 2^-10 * scale for
    subnormals; either way <= 2^-4 of the block max (which maps to >= 224)."""
    name, tile = fmt
    q = quantize(torch.from_numpy(x), name, tile=tile)
    x64 = x.astype(np.float64)
    err = np.abs(x64 - q.dequantize().double().numpy())
    s = _per_element_scale(q, x.shape)
    bound = np.maximum(2.0**-4 * np.abs(x64), 2.0**-10 * s) * (1 + SLACK)
    assert (err <= bound).all()
    assert (err <= 2.0**-4 * _block_amax(x, tile) * (1 + SLACK)).all()


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("tile", [(128, 128), (1, 128)])
def test_fp8_block_round_trip_distributions(dist, tile):
    x = make_input(dist, (256, 384), torch.float32, seed=7)
    err = (x.double() - quantize(x, "fp8_block", tile=tile).dequantize().double()).abs()
    bamax = torch.from_numpy(_block_amax(x.numpy(), tile))
    assert (err <= 2.0**-4 * bamax * (1 + SLACK)).all()


# --- idempotence -------------------------------------------------------------------------


def _ulps(a: float, b: float) -> int:
    ia = int(np.array(a, np.float32).view(np.int32))
    ib = int(np.array(b, np.float32).view(np.int32))
    return abs(ia - ib)


@SETTINGS
@given(x=fp32_arrays(max_rows=20), tile_2d=st.booleans())
def test_nvfp4_requantize_keeps_codes_and_normal_scales(x, tile_2d):
    """quantize(dequantize(q)): every block with a normal E4M3 scale keeps its codes and
    scale bytes (its max always has code 6, so s_b is recovered), and the global scale moves
    by at most an ulp or two (amax' = 2688 * S_dec is not amax): the dequantized values of
    those blocks agree to ~2^-22 relative, not bit for bit. Blocks with subnormal or zero
    scales can change codes (see test_nvfp4_requantize_counterexamples)."""
    tile = (16, 16) if tile_2d else (1, 16)
    q = quantize(torch.from_numpy(x), tile=tile)
    y = q.dequantize()
    q2 = quantize(y, tile=tile)
    assert _ulps(float(q.global_scale), float(q2.global_scale)) <= 2
    sc = q.scale.view(torch.uint8)
    normal = (sc & 0x78) != 0
    assert torch.equal(sc[normal], q2.scale.view(torch.uint8)[normal])
    codes, codes2 = e2m1.unpack(q.data), e2m1.unpack(q2.data)
    mask = normal.repeat_interleave(16, dim=-1)
    assert torch.equal(codes[mask], codes2[mask])
    y2 = q2.dequantize().double()
    m = mask[tuple(slice(0, n) for n in x.shape)]
    rel = (y2[m] - y.double()[m]).abs() <= y.double()[m].abs() * 2.0**-21
    assert rel.all()


def test_nvfp4_requantize_counterexamples():
    # A block whose scale rounds to 0 stores saturated codes (x * FLT_MAX -> +-6) that
    # decode to 0; requantizing stores code 0 instead: same values, different bytes.
    x = torch.tensor([[2688.0] + [0.0] * 15 + [1e-3] + [0.0] * 15])
    q = quantize(x)
    q2 = quantize(q.dequantize())
    assert int(q.scale.view(torch.uint8)[0, 1]) == 0 and int(e2m1.unpack(q.data)[0, 16]) == 7
    assert int(e2m1.unpack(q2.data)[0, 16]) == 0
    assert torch.equal(q.dequantize(), q2.dequantize())
    # Subnormal scales round coarsely. Block max 9 * 2^-9: s = 1.5 * 2^-9 ties to the even
    # s_b = 2 * 2^-9, the max maps to 4.5 -> code 6 (value 4), i.e. 8 * 2^-9. Requantized:
    # s' = 8/6 * 2^-9 -> 1 * 2^-9 and 8 * 2^-9 saturates to 6 * 2^-9: the values change.
    x = torch.tensor([[2688.0] + [0.0] * 15 + [9 * 2.0**-9] + [0.0] * 15])
    q = quantize(x)
    assert int(q.scale.view(torch.uint8)[0, 1]) == 0x02
    assert float(q.dequantize()[0, 16]) == 8 * 2.0**-9
    q2 = quantize(q.dequantize())
    assert int(q2.scale.view(torch.uint8)[0, 1]) == 0x01
    assert float(q2.dequantize()[0, 16]) == 6 * 2.0**-9


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
@SETTINGS
@given(x=fp32_arrays(max_rows=3, max_cols=100, lo=1e-36))
def test_mx_requantize_keeps_values_exactly(fmt, x):
    """MX: dequantized values are element * 2^k exactly. A block whose max code is 6 (or
    >= 256 for MXFP8) keeps k; one whose max rounded down to 3 (224) gets k - 1 and doubled
    codes, still exact. So values round trip bit for bit, bytes only for such blocks."""
    q = quantize(torch.from_numpy(x), fmt)
    y = q.dequantize()
    assert torch.equal(quantize(y, fmt).dequantize(), y)


def test_mxfp4_requantize_bytes_change_when_block_max_rounds_to_3():
    x = torch.tensor([[3.2, 1.0] + [0.0] * 30])  # k = 0, 3.2 -> 3; requantized k = -1
    q = quantize(x, "mxfp4")
    q2 = quantize(q.dequantize(), "mxfp4")
    assert int(q.scale[0, 0]) == 127 and int(q2.scale[0, 0]) == 126
    assert torch.equal(q.dequantize(), q2.dequantize())


@pytest.mark.parametrize("tile", [(1, 128), (128, 128)])
def test_fp8_block_requantize_keeps_codes(tile):
    x = make_input("student_t", (256, 256), torch.float32, seed=8)
    q = quantize(x, "fp8_block", tile=tile)
    q2 = quantize(q.dequantize(), "fp8_block", tile=tile)
    assert torch.equal(q.data.view(torch.uint8), q2.data.view(torch.uint8))
    assert torch.allclose(q.scale, q2.scale, rtol=2.0**-21, atol=0)


# --- padding, 2D consistency, empty tensors ----------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "tile", "rht"),
    [
        ("nvfp4", (1, 16), False),
        ("nvfp4", (1, 16), True),
        ("nvfp4", (16, 16), False),
        ("mxfp4", (1, 32), False),
        ("mxfp4", (32, 32), False),
        ("fp8_block", (1, 128), False),
        ("fp8_block", (128, 128), False),
        ("mxfp8", (1, 32), False),
    ],
)
@pytest.mark.parametrize("shape", [(5, 37), (19, 1), (2, 33, 70)])
def test_ragged_shapes_equal_explicit_zero_padding(fmt, tile, rht, shape):
    x = make_input("student_t", (int(np.prod(shape[:-1])), shape[-1]), torch.bfloat16, 9)
    x = x.reshape(shape)
    th, tw = tile
    pr = -shape[-2] % th if th > 1 else 0
    xp = F.pad(x, (0, -shape[-1] % tw, 0, pr))
    q, qp = quantize(x, fmt, tile=tile, rht=rht), quantize(xp, fmt, tile=tile, rht=rht)
    assert torch.equal(q.data.view(torch.uint8), qp.data.view(torch.uint8))
    assert torch.equal(q.scale.view(torch.uint8), qp.scale.view(torch.uint8))
    deq = q.dequantize()
    if rht:  # the transform mixes the padding in: the last dim stays padded
        assert tuple(deq.shape) == (*shape[:-1], xp.shape[-1])
        assert torch.equal(deq, qp.dequantize()[..., : shape[-2], :])
    else:
        assert tuple(deq.shape) == shape
        assert torch.equal(deq, qp.dequantize()[..., : shape[-2], : shape[-1]])


def test_ragged_1d_vector():
    x = make_input("normal", (1, 23), torch.float32, 10)[0]
    q = quantize(x)
    assert q.dequantize().shape == (23,)
    assert torch.equal(q.dequantize(), quantize(F.pad(x, (0, 9))).dequantize()[:23])


@pytest.mark.parametrize("shape", [(48, 80), (37, 50), (2, 32, 48), (16, 16)])
@pytest.mark.parametrize("dist", ["normal", "student_t", "e4m3_subnormal", "zero_blocks"])
def test_2d_tiles_make_w_and_wt_consistent(shape, dist):
    w = make_input(dist, (int(np.prod(shape[:-1])), shape[-1]), torch.bfloat16, 11)
    w = w.reshape(shape)
    q, qt = quantize(w, tile=(16, 16)), quantize(w.mT, tile=(16, 16))
    assert torch.equal(q.dequantize(), qt.dequantize().mT)
    codes, codes_t = e2m1.unpack(q.data), e2m1.unpack(qt.data)
    r, c = shape[-2:]
    assert torch.equal(codes[..., :r, :c], codes_t[..., :c, :r].mT)


def test_fp8_128x128_tiles_make_w_and_wt_consistent():
    w = make_input("student_t", (200, 300), torch.float32, 12)
    q, qt = (quantize(t, "fp8_block", tile=(128, 128)) for t in (w, w.T))
    assert torch.equal(q.dequantize(), qt.dequantize().T)


@pytest.mark.parametrize(
    ("shape", "tile"),
    [
        ((0,), None),
        ((0, 16), None),
        ((3, 0), None),
        ((0, 0), (16, 16)),
        ((2, 0, 32), None),
        ((0, 40), (16, 16)),
    ],
)
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8_block", "mxfp8"])
def test_empty_tensors(shape, tile, fmt):
    from hf_nvfp4.numerics import get_format

    if tile is not None:
        b = get_format(fmt).block
        tile = (b, b)
    q = quantize(torch.empty(shape), fmt, tile=tile)
    deq = q.dequantize()
    assert tuple(deq.shape) == shape and deq.numel() == 0
    if fmt == "nvfp4":
        assert float(q.global_scale) == 1.0
