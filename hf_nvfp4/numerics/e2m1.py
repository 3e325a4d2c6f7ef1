"""FP4 E2M1 elements: rounding to codes, decoding, and packing two codes per byte.

Codes 0..7 are the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign (8 is -0).
"""

from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Round-to-nearest-even boundaries between consecutive magnitudes. At a tie the even code
# wins, so a boundary whose lower code is even keeps the tie below (strict ">"), one whose
# lower code is odd sends it up (">=").
_RNE_STRICT = (0.25, 1.25, 2.5, 5.0)  # lower codes 0, 2, 4, 6: ties stay down
_RNE_INCLUSIVE = (0.75, 1.75, 3.5)  # lower codes 1, 3, 5: ties go up


def round_nearest(v: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) of fp32 values, round-to-nearest ties-to-even, saturating.

    The sign bit follows ``signbit(v)``, so a negative value that rounds to zero is code 8
    (-0), as the hardware conversion does.
    """
    m = v.abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for t in _RNE_STRICT:
        code += (m > t).to(torch.uint8)
    for t in _RNE_INCLUSIVE:
        code += (m >= t).to(torch.uint8)
    return code | (torch.signbit(v).to(torch.uint8) << 3)


def round_stochastic(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of fp32 values, rounding stochastically with uniform draws ``u`` in [0, 1).

    A magnitude between grid neighbours ``lo < m < hi`` rounds up when
    ``u < (m - lo) / (hi - lo)``, so ``E[decode(code)] = v`` for ``|v| <= 6``; larger
    magnitudes saturate to 6. The grid spacing is 0.5 below 2, 1 below 4 and 2 up to 6, so
    ``lo``, the fraction and the rounded value are exact in FP32.
    """
    m = v.abs().clamp(max=6.0)
    step = torch.where(m < 2.0, 0.5, torch.where(m < 4.0, 1.0, 2.0))
    lo = torch.floor(m / step) * step
    rounded = lo + (u < (m - lo) / step).to(m.dtype) * step
    return round_nearest(torch.copysign(rounded, v))


def decode(codes: torch.Tensor) -> torch.Tensor:
    """FP32 values of E2M1 codes (uint8, 0..15).

    Computed from the bits (exponent ``e = (c >> 1) & 3``, mantissa bit ``c & 1``: ``0.5 * m``
    for ``e = 0``, else ``2^(e-1) * (1 + 0.5 * m)``, sign bit 3; every step exact), not
    from a lookup table: no constant tensor is created, so it traces under torch.compile on
    any device. A zero code with the sign bit decodes to -0.
    """
    c = codes.to(torch.int32)
    e = (c >> 1) & 3
    m = (c & 1).to(torch.float32)
    mag = torch.where(e == 0, 0.5 * m, torch.ldexp(1.0 + 0.5 * m, (e - 1).to(torch.float32)))
    return torch.where((c & 8) != 0, -mag, mag)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes along the last (even-length) dimension: even index in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing needs an even last dimension; got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 bytes to codes, last dimension doubled."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)
