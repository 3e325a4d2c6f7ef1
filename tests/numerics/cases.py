"""Input distributions shared by the exactness tests and bench/numerics_exactness.py."""

from __future__ import annotations

import torch

DISTRIBUTIONS = ("normal", "student_t", "ties", "zero_blocks", "tiny", "e4m3_subnormal", "huge")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# E2M1 tie points and grid values (in units of the block scale) used by the "ties" inputs.
_TIE_MAGS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, 0.5, 1.0, 3.0, 4.0, 6.0, 0.0)


def make_input(
    dist: str, shape: tuple[int, int], dtype: torch.dtype, seed: int = 0
) -> torch.Tensor:
    """A ``shape`` tensor of ``dtype`` drawn from ``dist`` (deterministic in ``seed``).

    * normal / student_t (df=2, heavy tails);
    * ties: blocks of 16 whose max is ``6 * 2^m`` and whose other elements are E2M1 tie
      points times ``2^m``, plus one element 2688 so that ``S_enc = 1``: then the NVFP4 block
      scale is exactly ``2^m`` and ``x * e`` lands exactly on the ties;
    * zero_blocks: normal data with a third of the 16-blocks (and a row) zeroed, some ``-0.0``;
    * tiny: magnitudes ~1e-30 (FP16: ~1e-6, its subnormal range);
    * e4m3_subnormal: per-block magnitudes spread over 10^0..10^-7 of the tensor max, so block
      scales fall into the E4M3 subnormal range and below it (scale 0);
    * huge: magnitudes up to ``finfo(dtype).max / 1e3`` (FP16: max / 8, so the RHT cannot
      overflow).
    """
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    if dist == "normal":
        x = torch.randn(shape, generator=g)
    elif dist == "student_t":
        n = torch.randn(shape, generator=g)
        chi2 = torch.randn((2, *shape), generator=g).pow(2).sum(0)
        x = n / (chi2 / 2).sqrt()
    elif dist == "ties":
        mags = torch.tensor(_TIE_MAGS)[torch.randint(len(_TIE_MAGS), shape, generator=g)]
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
        nb = -(-cols // 16)
        m = torch.randint(-9, 6, (rows, nb), generator=g).float()
        scale = torch.pow(2.0, m).repeat_interleave(16, dim=1)[:, :cols]
        x = sign * mags * scale
        x[:, ::16] = 6.0 * scale[:, ::16] * sign[:, ::16]
        x.view(-1)[0] = 2688.0
    elif dist == "zero_blocks":
        x = torch.randn(shape, generator=g)
        nb = -(-cols // 16)
        keep = (torch.rand((rows, nb), generator=g) > 1 / 3).float()
        x = x * keep.repeat_interleave(16, dim=1)[:, :cols]
        x[rows // 2] = 0.0
        x[:, -1] = torch.where(x[:, -1] == 0, torch.tensor(-0.0), x[:, -1])
    elif dist == "tiny":
        x = torch.randn(shape, generator=g) * (1e-6 if dtype == torch.float16 else 1e-30)
    elif dist == "e4m3_subnormal":
        nb = -(-cols // 16)
        f = torch.pow(10.0, -7.0 * torch.rand((rows, nb), generator=g))
        f[0, 0] = 1.0
        x = torch.randn(shape, generator=g) * f.repeat_interleave(16, dim=1)[:, :cols]
    elif dist == "huge":
        big = torch.finfo(dtype).max / (8.0 if dtype == torch.float16 else 1e3)
        x = (torch.rand(shape, generator=g) * 2 - 1) * big
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    return x.to(dtype)
