"""The oracle itself, checked from first principles (so that agreement with it means something)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch

from . import oracle


def _all_e4m3_values() -> list[Fraction]:
    """Every finite non-negative float8_e4m3fn value, from the format definition."""
    vals = [Fraction(m, 8) * Fraction(1, 64) for m in range(8)]  # subnormals m/8 * 2^-6
    for e in range(1, 16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN
            vals.append((1 + Fraction(m, 8)) * Fraction(2) ** (e - 7))
    return vals


def test_e4m3_oracle_encodes_and_decodes_every_value():
    vals = _all_e4m3_values()
    assert len(vals) == 127 and vals[1] == Fraction(1, 512) and vals[-1] == 448
    x = np.array([float(v) for v in vals], dtype=np.float32)
    codes = oracle.e4m3_bytes(x)
    np.testing.assert_array_equal(codes, np.arange(127, dtype=np.uint8))
    np.testing.assert_array_equal(oracle.e4m3_bytes(-x), np.arange(127, dtype=np.uint8) | 0x80)
    np.testing.assert_array_equal(oracle.e4m3_value(codes), x)


def test_e4m3_oracle_rounds_midpoints_to_even_and_saturates():
    vals = _all_e4m3_values()
    for i in range(len(vals) - 1):
        mid = (vals[i] + vals[i + 1]) / 2
        m32 = np.float32(float(mid))
        assert Fraction(float(m32)) == mid  # midpoints are exact in FP32
        below, above = np.nextafter(m32, np.float32(0)), np.nextafter(m32, np.float32(1e9))
        got = oracle.e4m3_bytes(np.array([below, m32, above], dtype=np.float32))
        even = i if i % 2 == 0 else i + 1
        assert got.tolist() == [i, even, i + 1], (i, float(mid), got)
    big = np.array([448.0, 449.0, 464.0, 480.0, 1e30, np.inf], dtype=np.float32)
    assert oracle.e4m3_bytes(big).tolist() == [0x7E] * 6
    assert oracle.e4m3_bytes(np.array([np.nan], dtype=np.float32))[0] & 0x7F == 0x7F
    tiny = np.array([0.0, -0.0, 2.0**-11, 2.0**-10, 1e-40], dtype=np.float32)
    assert oracle.e4m3_bytes(tiny).tolist() == [0, 0x80, 0, 0, 0]


def test_torch_e4m3_cast_matches_oracle_on_random_fp32():
    # The package casts with torch (after clamping to +-448); check that cast independently.
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31, (2_000_000,), generator=g, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    x = x[torch.isfinite(x)].clamp(-448, 448)
    x = torch.cat([x, torch.randn(1_000_000, generator=g) * 2.0 ** torch.randint(-12, 9, (1,))])
    want = oracle.e4m3_bytes(x.numpy())
    got = x.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(got, want)


def test_e2m1_oracle_ties_and_saturation():
    x = np.array(
        [
            0,
            0.25,
            0.2500001,
            0.75,
            1.25,
            1.75,
            2.5,
            3.5,
            5,
            5.0000005,
            6,
            7,
            1e38,
            -0.0,
            -0.25,
            -0.75,
            -5,
            -6.5,
        ],
        dtype=np.float32,
    )
    want = [0, 0, 1, 2, 2, 4, 4, 6, 6, 7, 7, 7, 7, 8, 8, 10, 14, 15]
    assert oracle.e2m1_codes(x).tolist() == want


def test_pack_even_index_in_low_nibble():
    codes = np.array([[1, 2, 15, 8]], dtype=np.uint8)
    assert oracle.pack(codes).tolist() == [[0x21, 0x8F]]


def test_bf16_rounding_matches_torch():
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 2**31, (1_000_000,), generator=g, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    x = x[torch.isfinite(x)]
    got = oracle.round_to_dtype(x.numpy(), "bfloat16")
    want = x.to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_ue8m0_exponent_is_exact_ceil_log2():
    rng = np.random.default_rng(2)
    amax = np.concatenate(
        [
            (rng.random(20000) * 2.0 ** rng.integers(-140, 127, 20000)).astype(np.float32),
            np.array([6, 3, 12, 6 * 2.0**-127, 6 * 2.0**-126, 1e-45], dtype=np.float32),
        ]
    )
    amax = amax[amax > 0]
    for emax in (6.0, 448.0):
        k = oracle.ue8m0_exponent(amax, emax)
        sample = amax[::97].tolist() + amax[-6:].tolist()
        for a, kk in zip(sample, list(k[::97]) + list(k[-6:]), strict=True):
            r = Fraction(a) / Fraction(emax)
            e = 0  # exact ceil(log2 r) by integer comparisons
            while Fraction(2) ** e < r:
                e += 1
            while Fraction(2) ** (e - 1) >= r:
                e -= 1
            assert kk == max(-127, min(127, e)), (a, emax, kk, e)
