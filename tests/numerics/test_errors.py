"""Input validation: non-finite values, dtypes, unknown options."""

from __future__ import annotations

import pytest
import torch

from hf_nvfp4.numerics import quantize


def test_nonfinite_raises_with_counts():
    x = torch.randn(4, 32)
    x[0, 3] = float("nan")
    x[1, 0] = float("inf")
    x[2, 5] = float("-inf")
    with pytest.raises(ValueError, match=r"1 NaN and 2 Inf of 128 elements"):
        quantize(x)
    with pytest.raises(ValueError, match="allow_nonfinite"):
        quantize(x.to(torch.bfloat16), "mxfp4")


@pytest.mark.parametrize(
    ("fmt", "tile"),
    [
        ("nvfp4", (1, 16)),
        ("nvfp4", (16, 16)),
        ("fp8_block", (1, 128)),
        ("fp8_block", (128, 128)),
        ("mxfp4", (1, 32)),
        ("mxfp8", (1, 32)),
    ],
)
def test_allow_nonfinite_propagates_nan_to_its_block(fmt, tile):
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    x[3, 5] = float("nan")
    deq = quantize(x, fmt, tile=tile, allow_nonfinite=True).dequantize()
    th, tw = tile
    r0, c0 = (3 // th) * th, 0
    assert deq[r0 : r0 + th, c0 : c0 + tw].isnan().all()


def test_allow_nonfinite_inf_saturates():
    x = torch.randn(2, 32)
    x[0, 0] = float("inf")
    q = quantize(x, allow_nonfinite=True)
    assert float(q.global_scale) == 1.0  # S_enc = 2688 / inf = 0 -> 1, as TE does
    assert int(q.scale.view(torch.uint8)[0, 0]) == 0x7E


@pytest.mark.parametrize(
    "dtype",
    [torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn],
)
def test_bad_dtypes_raise_type_error(dtype):
    with pytest.raises(TypeError, match="dtype"):
        quantize(torch.zeros(2, 32).to(dtype))


def test_non_tensor_raises_type_error():
    with pytest.raises(TypeError):
        quantize([1.0] * 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fmt": "nvfp8"}, "unknown block format"),
        ({"fmt": "nvfp4", "tile": (1, 32)}, "tile"),
        ({"fmt": "nvfp4", "tile": (32, 32)}, "tile"),
        ({"fmt": "mxfp4", "tile": (1, 16)}, "tile"),
        ({"fmt": "nvfp4", "rounding": "floor"}, "rounding"),
        ({"fmt": "nvfp4", "tile": (16, 16), "rht": True}, "rht"),
    ],
)
def test_unknown_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(torch.zeros(32, 32), **kwargs)


def test_2d_tile_on_vector_raises():
    with pytest.raises(ValueError, match="rank"):
        quantize(torch.zeros(32), tile=(16, 16))
