"""hf_nvfp4.numerics.testing: pass on identical QTensors, name the first mismatch otherwise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_nvfp4.numerics import quantize
from hf_nvfp4.numerics.testing import (
    assert_codes_bitwise,
    assert_qtensor_equal,
    assert_scales_bitwise,
)


def _q(fmt="nvfp4", **kw):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    return quantize(x, fmt, **kw)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8_block", "mxfp8"])
def test_identical_pass(fmt):
    assert_qtensor_equal(_q(fmt), _q(fmt))


def test_code_mismatch_names_index_and_values():
    a = _q()
    data = a.data.clone()
    data[2, 5] ^= 0x10  # flip a bit of element 11's code (high nibble)
    b = dataclasses.replace(a, data=data)
    with pytest.raises(AssertionError, match=r"x: element bytes differ in 1 of 128") as e:
        assert_codes_bitwise(a, b, name="x")
    assert "(2, 5)" in str(e.value) and "elements 10,11" in str(e.value)


def test_fp8_element_mismatch_shows_values():
    a = _q("fp8_block")
    data = a.data.clone()
    data.view(torch.uint8)[1, 7] ^= 1
    with pytest.raises(AssertionError, match=r"\(1, 7\)"):
        assert_codes_bitwise(a, dataclasses.replace(a, data=data))


def test_scale_and_global_mismatch():
    a = _q()
    scale = a.scale.clone()
    scale.view(torch.uint8)[3, 2] += 1
    with pytest.raises(AssertionError, match=r"block scales differ .*\n  at \(3, 2\)"):
        assert_scales_bitwise(a, dataclasses.replace(a, scale=scale))
    g = torch.nextafter(a.global_scale, torch.tensor(1e9))
    with pytest.raises(AssertionError, match="global scales differ"):
        assert_scales_bitwise(a, dataclasses.replace(a, global_scale=g))
    f = _q("fp8_block")
    s = f.scale.clone()
    s[0, 0] = torch.nextafter(s[0, 0], torch.tensor(1e9))
    with pytest.raises(AssertionError, match=r"\(0, 0\) \(byte 0 of 4\)"):
        assert_scales_bitwise(f, dataclasses.replace(f, scale=s))


def test_metadata_and_shape_mismatch():
    a = _q()
    with pytest.raises(AssertionError, match="QTensor.tile differs"):
        assert_qtensor_equal(a, dataclasses.replace(a, tile=(16, 16)))
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_codes_bitwise(a, dataclasses.replace(a, data=a.data[:2]))
