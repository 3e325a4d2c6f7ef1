"""Stochastic rounding: unbiased, reproducible from a seed, independent, neighbours only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_nvfp4.numerics import e2m1, e4m3, quantize

from . import oracle

GRID = np.array(oracle.E2M1_GRID)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scaled_values(x: torch.Tensor, q) -> np.ndarray:
    """``clamp(x * e, -6, 6)`` in FP32 exactly as NUMERICS.md computes it, from q's scales."""
    sb = q.scale.float().repeat_interleave(16, dim=-1)
    e = torch.clamp(1.0 / (sb * q.global_scale), max=torch.finfo(torch.float32).max)
    return (x.float() * e).clamp(-6, 6).numpy()


def _row_pattern() -> torch.Tensor:
    # one block: the max (6 after scaling) and values at many fractional positions
    return torch.tensor(
        [6.0, 0.1, 0.3, 0.7, 0.74, 1.1, 1.3, 1.9, 2.2, 2.75, 3.3, 3.9, 4.5, 5.9, -1.25, -0.5]
    )


def test_unbiased_nvfp4():
    n = 8192
    x = _row_pattern().repeat(n, 1) * 3.7  # identical blocks: one scale, n draws per column
    q = quantize(x, rounding="stochastic", generator=_gen(0))
    deq = q.dequantize().double()
    v = torch.from_numpy(_scaled_values(x, q)[0]).double()
    d = float(q.scale[0, 0].float()) * float(q.global_scale)
    lo = torch.from_numpy(GRID[np.searchsorted(GRID, np.abs(v.numpy()), side="right") - 1])
    hi = torch.from_numpy(GRID[np.minimum(np.searchsorted(GRID, np.abs(v.numpy())), 7)])
    p = torch.where(hi > lo, (v.abs() - lo) / (hi - lo).clamp(min=1e-30), torch.zeros(16))
    sigma = (hi - lo) * d * (p * (1 - p) / n).sqrt()  # std of the mean of n Bernoulli steps
    target = v * d  # the unrounded value; E[deq] = target (|v| <= 6, no saturation)
    mean = deq.mean(0)
    assert ((mean - target).abs() <= 5 * sigma + 2.0**-20 * target.abs()).all()
    assert ((target - x[0].double()).abs() <= 2.0**-20 * x[0].double().abs()).all()
    exact = p == 0  # grid values never move: every draw is the nearest rounding
    rtn = quantize(x[:1]).dequantize().double()[0]
    assert (deq[:, exact] == rtn[exact]).all()


def test_never_rounds_to_a_non_neighbour():
    g = _gen(1)
    x = torch.randn(512, 256, generator=g) * torch.rand(512, 1, generator=g) * 10
    for tile in [(1, 16), (16, 16)]:
        q = quantize(x, tile=tile, rounding="stochastic", generator=_gen(2))
        v = _scaled_values(x, q)  # q.scale repeats a 2D tile's scale on each of its rows
        codes = e2m1.unpack(q.data).numpy()
        mag = GRID[codes & 7]
        lo = GRID[np.searchsorted(GRID, np.abs(v), side="right") - 1]
        hi = GRID[np.minimum(np.searchsorted(GRID, np.abs(v)), 7)]
        assert ((mag == lo) | (mag == hi)).all()
        assert ((codes >= 8) == np.signbit(v)).all()
        rtn = quantize(x, tile=tile)  # the scales never depend on the rounding mode
        assert torch.equal(q.scale.view(torch.uint8), rtn.scale.view(torch.uint8))


def test_reproducible_from_seed():
    x = torch.randn(64, 128, generator=_gen(4))
    a = quantize(x, rounding="stochastic", generator=_gen(123))
    b = quantize(x, rounding="stochastic", generator=_gen(123))
    c = quantize(x, rounding="stochastic", generator=_gen(124))
    assert torch.equal(a.data, b.data) and torch.equal(
        a.scale.view(torch.uint8), b.scale.view(torch.uint8)
    )
    assert not torch.equal(a.data, c.data)
    assert torch.equal(a.scale.view(torch.uint8), c.scale.view(torch.uint8))  # scales are RTN


def test_neighbouring_elements_round_independently():
    n = 4096
    x = torch.full((n, 16), 1.25)  # p = 1/2 between 1 and 1.5 after scaling (max 6)
    x[:, 0] = 6.0
    q = quantize(x, rounding="stochastic", generator=_gen(5))
    up = (e2m1.unpack(q.data)[:, 1:] == 3).double()  # 1.5 is code 3
    a, b = up[:, :-1].flatten(), up[:, 1:].flatten()  # horizontal neighbours
    m = a.numel()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert abs(float(corr)) <= 5 / m**0.5
    rows_a, rows_b = up[:-1].flatten(), up[1:].flatten()  # vertical neighbours
    corr_v = torch.corrcoef(torch.stack([rows_a, rows_b]))[0, 1]
    assert abs(float(corr_v)) <= 5 / rows_a.numel() ** 0.5
    assert abs(float(up.mean()) - 0.5) <= 5 * 0.5 / up.numel() ** 0.5


@pytest.mark.parametrize("fmt", ["fp8_block", "mxfp8", "mxfp4"])
def test_other_formats_stochastic_is_unbiased(fmt):
    n = 4096
    row = torch.linspace(-3.0, 3.0, 128) * 1.37
    row[0] = 3.0 * 1.37 * 1.5  # block max
    x = row.repeat(n, 1)
    q = quantize(x, fmt, rounding="stochastic", generator=_gen(6))
    qn = quantize(x, fmt)
    deq = q.dequantize().double()
    # every draw lies within one grid step of the nearest result; the mean tends to x
    spread = (deq - qn.dequantize().double()).abs().amax(0)
    sigma = spread / (4 * n) ** 0.5  # Bernoulli std <= step / 2
    assert ((deq.mean(0) - x[0].double()).abs() <= 5 * sigma + 2.0**-20 * x[0].abs()).all()


def test_e4m3_round_stochastic_unbiased_and_neighbours():
    vals = torch.tensor(
        [
            0.0,
            2.0**-11,
            1.3 * 2.0**-9,
            0.01,
            0.3,
            1.0,
            1.06,
            3.3,
            17.5,
            100.1,
            230.0,
            440.0,
            448.0,
            460.0,
            -0.7,
            -(2.0**-10),
        ]
    )
    n = 20000
    v = vals.repeat(n, 1)
    u = torch.rand(v.shape, generator=_gen(7))
    r = e4m3.round_stochastic(v, u)
    got = r.float().double()
    # neighbours from the oracle's exact table of E4M3 values
    table = np.unique(np.abs(oracle.e4m3_value(np.arange(127, dtype=np.uint8))).astype(np.float64))
    m = np.minimum(np.abs(vals.double().numpy()), 448.0)
    lo = table[np.searchsorted(table, m, side="right") - 1]
    hi = table[np.minimum(np.searchsorted(table, m), len(table) - 1)]
    sign = np.where(np.signbit(vals.numpy()), -1.0, 1.0)
    ok = (got.abs().numpy() == lo) | (got.abs().numpy() == hi)
    assert ok.all()
    assert ((np.signbit(got.numpy()) == np.signbit(vals.numpy())) | (got.numpy() == 0)).all()
    p = np.where(hi > lo, (m - lo) / np.where(hi > lo, hi - lo, 1), 0)
    sigma = (hi - lo) * np.sqrt(p * (1 - p) / n)
    assert (np.abs(got.mean(0).numpy() - sign * m) <= 5 * sigma + 1e-12).all()
    # RNE and SR agree on representable values
    assert torch.equal(e4m3.round_nearest(vals[:13]).float()[[0, 5, 12]], vals[[0, 5, 12]])
