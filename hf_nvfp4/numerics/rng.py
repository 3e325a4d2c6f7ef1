"""Counter-based random numbers for stochastic rounding.

The draw for element ``i`` of a tensor is a pure function of ``(seed, i)``, with ``seed``
taken from a torch.Generator once per quantization. A GPU kernel that hashes the same
counters reproduces the reference's rounding bit for bit, on any grid and block size.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = (h * FMIX_C1) & _MASK32
    h = h ^ (h >> 13)
    h = (h * FMIX_C2) & _MASK32
    return h ^ (h >> 16)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One 31-bit seed from ``generator`` (torch's default CPU generator when None)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))


def counter_uniform(
    seed: int, shape: torch.Size | tuple[int, ...], device: torch.device | str
) -> torch.Tensor:
    """FP32 uniforms in [0, 1) for the row-major element indices of ``shape``.

    ``u[i] = (fmix32((i * GOLDEN + fmix32(seed)) mod 2^32) >> 8) * 2^-24``, exact in FP32.
    """
    n = 1
    for s in shape:
        n *= int(s)
    key = int(_fmix32(torch.tensor(seed & _MASK32, dtype=torch.int64)))
    idx = torch.arange(n, dtype=torch.int64, device=device)
    h = _fmix32((idx * GOLDEN + key) & _MASK32)
    return ((h >> 8).to(torch.float32) * 2.0**-24).reshape(shape)


def split_generator(
    generator: torch.Generator | None, n: int = 2
) -> tuple[torch.Generator | None, ...]:
    """``n`` CPU generators, each seeded by one draw from ``generator`` (None gives Nones).

    A fused op that quantizes several copies hands one child to each, so every copy's
    stream is fixed whether or not the other copies are requested or rounded stochastically.
    """
    if generator is None:
        return (None,) * n
    return tuple(torch.Generator().manual_seed(draw_seed(generator)) for _ in range(n))
