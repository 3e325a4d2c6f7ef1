"""The package's quantizer equals the independent numpy oracle bit for bit.

Element bytes, block-scale bytes (``.view(torch.uint8)``) and the global-scale bits, for the
nearest-rounding paths of every format, with and without the RHT, FP32/BF16/FP16 inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_nvfp4.numerics import quantize

from . import oracle
from .cases import DISTRIBUTIONS, DTYPES, make_input


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def assert_matches_oracle(x: torch.Tensor, fmt: str, tile, rht: bool = False) -> None:
    q = quantize(x, fmt, tile=tile, rht=rht)
    o = oracle.quantize(x.float().numpy(), fmt, tile, rht, _dtype_name(x.dtype))
    data = q.data.view(torch.uint8).numpy()
    scale = q.scale.view(torch.uint8).numpy()
    for what, got, want in (("data", data, o.data), ("scale", scale, o.scale)):
        assert got.shape == want.shape, (what, got.shape, want.shape)
        bad = np.argwhere(got != want)
        assert not len(bad), (
            f"{what} bytes differ at {len(bad)} places; first {tuple(bad[0])}: "
            f"package 0x{got[tuple(bad[0])]:02x} oracle 0x{want[tuple(bad[0])]:02x}"
        )
    if o.global_scale_bits is None:
        assert q.global_scale is None
    else:
        got_bits = int(q.global_scale.reshape(1).view(torch.int32)) & 0xFFFFFFFF
        assert got_bits == o.global_scale_bits, (hex(got_bits), hex(o.global_scale_bits))
    # the oracle's dequantization agrees too (same bytes, independent decoding)
    want_deq = oracle.dequantize(o, fmt, tuple(q.shape))
    np.testing.assert_array_equal(q.dequantize().numpy(), want_deq)


NVFP4_CASES = [((1, 16), False), ((1, 16), True), ((16, 16), False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_name)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize(("tile", "rht"), NVFP4_CASES, ids=["1x16", "1x16-rht", "16x16"])
def test_nvfp4_matches_oracle(dist, dtype, tile, rht):
    x = make_input(dist, (64, 256), dtype, seed=DISTRIBUTIONS.index(dist))
    assert_matches_oracle(x, "nvfp4", tile, rht)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_name)
@pytest.mark.parametrize(("tile", "rht"), NVFP4_CASES, ids=["1x16", "1x16-rht", "16x16"])
def test_nvfp4_ragged_and_batched_match_oracle(dtype, tile, rht):
    x = make_input("student_t", (37 * 3, 83), dtype, seed=1).reshape(3, 37, 83)
    assert_matches_oracle(x, "nvfp4", tile, rht)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize(
    ("fmt", "tile"),
    [
        ("mxfp4", (1, 32)),
        ("mxfp4", (32, 32)),
        ("mxfp8", (1, 32)),
        ("fp8_block", (1, 128)),
        ("fp8_block", (128, 128)),
    ],
    ids=["mxfp4-1x32", "mxfp4-32x32", "mxfp8-1x32", "fp8-1x128", "fp8-128x128"],
)
def test_other_formats_match_oracle(dist, fmt, tile):
    for dtype in DTYPES:
        assert_matches_oracle(make_input(dist, (128, 256), dtype, seed=3), fmt, tile)


def test_mxfp4_rht_matches_oracle():
    x = make_input("student_t", (32, 96), torch.bfloat16, seed=4)
    assert_matches_oracle(x, "mxfp4", (1, 32), rht=True)


@pytest.mark.parametrize("value", [1e-44, 1e-40, 1e-38, 3e-36, 7.9e-36])
def test_global_scale_clamp_and_subnormal_s_dec(value):
    # amax < 2688 / FLT_MAX: S_enc clamps to FLT_MAX and S_dec = 1 / FLT_MAX is subnormal.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 64, generator=g) * value
    for dtype in (torch.float32, torch.bfloat16):
        for tile, rht in NVFP4_CASES:
            if not rht:  # the RHT of FP32-subnormal inputs depends on the BLAS kernel
                assert_matches_oracle(x.to(dtype), "nvfp4", tile, rht)


def test_non_te_rht_sign_matches_oracle():
    sign = [1, -1] * 8
    x = make_input("normal", (8, 64), torch.bfloat16, seed=6)
    q = quantize(x, "nvfp4", rht=True, rht_sign=sign)
    o = oracle.quantize(x.float().numpy(), "nvfp4", None, True, "bfloat16", sign)
    np.testing.assert_array_equal(q.data.numpy(), o.data)
    np.testing.assert_array_equal(q.scale.view(torch.uint8).numpy(), o.scale)
