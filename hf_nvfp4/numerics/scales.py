"""Scale arithmetic: the NVFP4 two-level scales, MX power-of-two scales, FP8 block scales.

All arithmetic is FP32 in Transformer Engine's order of operations, so that scale bytes match
bit for bit.
"""

from __future__ import annotations

import math

import torch

from .formats import E2M1_MAX, E4M3_MAX, FLT_MAX

_F32 = torch.float32


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=_F32, device=like.device)


def nvfp4_global_encode(amax: torch.Tensor) -> torch.Tensor:
    """``S_enc = 448 * 6 / amax`` (FP32), clamped to FLT_MAX; 1 when amax is 0."""
    amax = amax.to(_F32)
    s_enc = torch.clamp(_f32(E4M3_MAX * E2M1_MAX, amax) / amax, max=FLT_MAX)
    return torch.where((amax == 0) | (s_enc == 0), _f32(1.0, amax), s_enc)


def nvfp4_block_scales(block_amax: torch.Tensor, s_enc: torch.Tensor) -> torch.Tensor:
    """E4M3 block decode scales ``e4m3(min(block_amax * (S_enc * (1/6)), FLT_MAX))``.

    TE folds 1/6 into the global multiplier first; ``(block_amax / 6) * S_enc`` rounds twice
    and differs in the last bit.
    """
    multiplier = s_enc * _f32(1.0 / E2M1_MAX, s_enc)
    s = torch.clamp(block_amax * multiplier, max=FLT_MAX)
    return torch.clamp(s, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def nvfp4_element_multiplier(block_scale: torch.Tensor, s_dec: torch.Tensor) -> torch.Tensor:
    """Per-block encode multiplier ``min(1 / (fp32(s_b) * S_dec), FLT_MAX)``."""
    denom = block_scale.to(_F32) * s_dec
    return torch.clamp(_f32(1.0, denom) / denom, max=FLT_MAX)


def ue8m0_exponents(block_amax: torch.Tensor, element_max: float) -> torch.Tensor:
    """MX scale exponents ``ceil(log2(block_amax / element_max))`` in [-127, 127] (int32).

    Computed exactly, without dividing: with ``amax = m * 2^e`` and ``element_max = m' * 2^e'``
    (``m, m'`` in [0.5, 1)), ``ceil(log2(amax / element_max))`` is ``e - e' + (m > m')``.
    The FP32 quotient ``amax / element_max`` would round in the subnormal range and give -127
    instead of -126 for amax just above ``element_max * 2^-127``. Zero blocks get -127.
    """
    amax = block_amax.to(_F32)
    mant, exp = torch.frexp(amax)
    e_mant, e_exp = math.frexp(element_max)
    k = exp - e_exp + (mant > e_mant).to(exp.dtype)
    k = torch.where(amax > 0, k, torch.full_like(k, -127))
    return k.clamp(-127, 127).to(torch.int32)


def exp2_int(k: torch.Tensor) -> torch.Tensor:
    """Exact FP32 ``2**k`` for integer exponents in [-127, 127]."""
    return torch.ldexp(torch.ones(k.shape, dtype=_F32, device=k.device), k.to(_F32))


def fp8_block_encode(block_amax: torch.Tensor) -> torch.Tensor:
    """FP8 block encode scale ``448 / amax`` (FP32), clamped to FLT_MAX; 1 when amax is 0."""
    block_amax = block_amax.to(_F32)
    enc = torch.clamp(_f32(E4M3_MAX, block_amax) / block_amax, max=FLT_MAX)
    return torch.where(block_amax == 0, _f32(1.0, block_amax), enc)
