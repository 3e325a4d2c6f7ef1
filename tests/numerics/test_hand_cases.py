"""Hand-computed cases: E2M1 tie points, E4M3 scale boundaries, amax 0, UE8M0 exponents."""

from __future__ import annotations

import math

import pytest
import torch

from hf_nvfp4.numerics import e2m1, fake_quantize, quantize

TIES = [  # (input, expected code, expected value) at every E2M1 tie point and around it
    (0.0, 0, 0.0),
    (0.25, 0, 0.0),
    (0.75, 2, 1.0),
    (1.25, 2, 1.0),
    (1.75, 4, 2.0),
    (2.5, 4, 2.0),
    (3.5, 6, 4.0),
    (5.0, 6, 4.0),
    (5.001, 7, 6.0),
    (6.0, 7, 6.0),
    (0.26, 1, 0.5),
    (0.74, 1, 0.5),
    (1.26, 3, 1.5),
    (2.49, 4, 2.0),
    (2.51, 5, 3.0),
    (3.49, 5, 3.0),
    (4.99, 6, 4.0),
]


def _two_block_tensor(block: list[float]) -> torch.Tensor:
    """[2688, 0, ...] then ``block``: S_enc = S_dec = 1 and, when max|block| is 6 * 2^m, the
    second block's scale is exactly 2^m, so x * e reproduces ``block / 2^m`` exactly."""
    first = [2688.0] + [0.0] * 15
    return torch.tensor([first + block], dtype=torch.float32)


def test_e2m1_round_nearest_tie_points_with_signs():
    for x, code, _ in TIES:
        assert int(e2m1.round_nearest(torch.tensor([x]))[0]) == code, x
        assert int(e2m1.round_nearest(torch.tensor([-x]))[0]) == code | 8, -x
    assert int(e2m1.round_nearest(torch.tensor([-0.0]))[0]) == 8


@pytest.mark.parametrize("m", [0, -3, 4])
def test_nvfp4_tie_points_through_quantize(m):
    ins = [x for x, _, _ in TIES if x <= 6][:15]
    block = [6.0 * 2**m] + [x * 2**m for x in ins]
    q = quantize(_two_block_tensor(block))
    assert float(q.global_scale) == 1.0
    assert float(q.scale[0, 1].float()) == 2.0**m
    codes = e2m1.unpack(q.data)[0, 16:].tolist()
    assert codes == [7] + [c for x, c, _ in TIES if x <= 6][:15]
    deq = q.dequantize()[0, 16:].tolist()
    assert deq == [6.0 * 2**m] + [v * 2**m for x, _, v in TIES if x <= 6][:15]
    qn = quantize(-_two_block_tensor(block))
    assert e2m1.unpack(qn.data)[0, 16:].tolist() == [c | 8 for c in codes]


def test_negative_zero_is_code_8():
    x = _two_block_tensor([6.0, -0.0, -0.1, 0.0] + [0.0] * 12)
    codes = e2m1.unpack(quantize(x).data)[0, 16:20].tolist()
    assert codes == [7, 8, 8, 0]


@pytest.mark.parametrize(
    ("s", "byte"),
    [
        (2.0**-9, 0x01),  # smallest subnormal scale
        (2.0**-10, 0x00),  # tie between 0 and 2^-9: even -> 0
        (1.5 * 2.0**-9, 0x02),  # tie between 1 and 2 (x 2^-9): even -> 2
        (2.5 * 2.0**-9, 0x02),  # tie between 2 and 3: even -> 2
        (7 * 2.0**-9, 0x07),  # largest subnormal
        (7.5 * 2.0**-9, 0x08),  # tie -> smallest normal 2^-6
        (2.0**-6, 0x08),
        (1.0625, 0x38),  # tie between 1 and 1.125 -> 1
        (1.1875, 0x3A),  # tie between 1.125 and 1.25 -> 1.25
        (416.0, 0x7D),
        (432.0, 0x7E),  # tie between 416 and 448 -> 448 (even mantissa)
    ],
)
def test_nvfp4_e4m3_block_scale_boundaries(s, byte):
    # S_enc = 1, so the block scale is e4m3(block_amax * f32(1/6)); 6 * s * f32(1/6) == s.
    block = [6.0 * s] + [0.0] * 15
    q = quantize(_two_block_tensor(block))
    assert int(q.scale.view(torch.uint8)[0, 1]) == byte
    assert int(q.scale.view(torch.uint8)[0, 0]) == 0x7E  # 2688 * f32(1/6) saturates to 448
    if byte == 0:
        assert q.dequantize()[0, 16:].abs().max() == 0


def test_e4m3_scale_saturates_at_448():
    x = torch.tensor([[1e30] + [0.0] * 15])
    q = quantize(x)
    assert int(q.scale.view(torch.uint8)[0, 0]) == 0x7E
    assert float(q.global_scale) == pytest.approx(1e30 / 2688, rel=1e-6)
    assert int(e2m1.unpack(q.data)[0, 0]) == 7


@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
def test_amax_zero_gives_global_scale_one_and_zero_codes(tile):
    q = quantize(torch.zeros(16, 32), tile=tile)
    assert q.global_scale.dtype == torch.float32 and float(q.global_scale) == 1.0
    assert not q.data.any() and not q.scale.view(torch.uint8).any()
    qn = quantize(torch.full((16, 32), -0.0), tile=tile)
    assert (qn.data == 0x88).all() and float(qn.global_scale) == 1.0
    assert (qn.dequantize() == 0).all()


def _ceil_log2_exact(a: float, emax: float) -> int:
    from fractions import Fraction

    r = Fraction(a) / Fraction(emax)
    e = math.ceil(math.log2(a / emax)) if a / emax > 0 else -200
    while Fraction(2) ** e < r:
        e += 1
    while Fraction(2) ** (e - 1) >= r:
        e -= 1
    return e


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_mx_scales_are_powers_of_two_with_the_exponent_rule(fmt):
    emax = 6.0 if fmt == "mxfp4" else 448.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32 * 8, generator=g) * torch.pow(
        2.0, torch.randint(-140, 110, (64, 1), generator=g).float()
    )
    specials = [
        emax,
        emax * 1.0000001,
        emax / 2,
        emax / 2 * 1.0000001,
        0.0,
        1e-45,
        emax * 2.0**-127,
        float(torch.nextafter(torch.tensor(emax * 2.0**-127), torch.tensor(1.0))),
    ]
    for i, a in enumerate(specials):
        x[i, :32] = 0.0
        x[i, 5] = a
    q = quantize(x, fmt)
    amax = x.abs().reshape(64, 8, 32).amax(-1)
    for a, b in zip(amax.flatten().tolist(), q.scale.flatten().tolist(), strict=True):
        want = -127 if a == 0 else max(-127, min(127, _ceil_log2_exact(a, emax)))
        assert b - 127 == want, (a, b - 127, want)
    # dequantized block values are element * 2^k: the scale is exactly a power of two
    assert q.scale.dtype == torch.uint8
    assert [b - 127 for b in q.scale[:4, 0].tolist()] == [0, 1, -1, 0]


def test_fake_quantize_keeps_the_grid_values_in_the_input_dtype():
    """``fake_quantize`` gives the values NVFP4 keeps, in the input's dtype: with unit scales
    the E2M1 grid (and the tie cases rounded to it), the rest of the tensor unchanged."""
    x = _two_block_tensor([v for v, _, _ in TIES[:16]])
    out = fake_quantize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert out[0, 16:].tolist() == [k for _, _, k in TIES[:16]]
    assert out[0, :16].tolist() == [2688.0] + [0.0] * 15
    xb = x.to(torch.bfloat16)  # 5.001 is 5.0 in BF16: a tie, kept as 4
    out = fake_quantize(xb)
    assert out.dtype == torch.bfloat16 and out[0, 24].item() == 4.0
    assert torch.equal(out, quantize(xb).dequantize(torch.bfloat16))
