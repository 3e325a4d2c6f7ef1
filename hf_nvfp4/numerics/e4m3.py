"""FP8 E4M3 elements (float8_e4m3fn): nearest and stochastic rounding."""

from __future__ import annotations

import torch

from .formats import E4M3_MAX

_MIN_NORMAL_EXP = -6  # smallest normal E4M3 exponent; below it the spacing stays 2^-9
_MANTISSA_BITS = 3


def round_nearest(v: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even cast of fp32 values to float8_e4m3fn."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def round_stochastic(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding of fp32 values to float8_e4m3fn with uniform draws ``u``.

    Between the two neighbouring E4M3 values ``lo <= |v| < lo + ulp`` the result rounds up
    with probability ``(|v| - lo) / ulp``; magnitudes above 448 saturate. Both neighbours
    are exact in FP32, so the arithmetic below is exact.
    """
    m = v.abs().clamp(max=E4M3_MAX)
    _, exp = torch.frexp(m)
    e = (exp - 1).clamp(min=_MIN_NORMAL_EXP)
    ulp = torch.ldexp(torch.ones_like(m), (e - _MANTISSA_BITS).to(m.dtype))
    lo = torch.floor(m / ulp) * ulp
    up = (u < (m - lo) / ulp).to(m.dtype)
    mag = torch.clamp(lo + up * ulp, max=E4M3_MAX)
    return torch.copysign(mag, v).to(torch.float8_e4m3fn)
