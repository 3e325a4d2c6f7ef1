"""The 16-point random Hadamard transform (RHT) applied before the weight-gradient GEMM."""

from __future__ import annotations

from collections.abc import Sequence

import torch

RHT_SIZE = 16
# Transformer Engine's fixed sign vector (one for all of training).
TE_RHT_SIGN = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def sylvester_hadamard(n: int = RHT_SIZE) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix (entries +-1, fp32); n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two; got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rht_matrix(
    sign: Sequence[int] | torch.Tensor | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """``D H / 4`` (fp32, 16x16): diagonal signs times Sylvester Hadamard, orthonormal."""
    if sign is None:
        sign = TE_RHT_SIGN
    # checked on Python numbers (a tensor's are read once), so torch.compile traces a
    # constant sign vector without a data-dependent branch
    vals = sign.tolist() if isinstance(sign, torch.Tensor) else list(sign)
    if len(vals) != RHT_SIZE or any(v not in (1, -1) for v in vals):
        raise ValueError(f"RHT sign must be 16 entries of +1/-1; got {vals}")
    s = torch.tensor(vals, dtype=torch.float32)
    m = s[:, None] * sylvester_hadamard(RHT_SIZE) / 4.0
    return m.to(device) if device is not None else m


def round_to_odd_fp32(z: torch.Tensor) -> torch.Tensor:
    """FP64 ``z`` rounded to FP32 by round-to-odd: truncated toward zero, the last bit set when
    inexact. Rounding that to any format with at most 22 significand bits (BF16, FP16) to
    nearest even gives exactly the nearest-even rounding of ``z`` itself (one rounding)."""
    f = z.float()
    back = f.double()
    inexact = back != z
    bits = f.view(torch.int32) - (inexact & (back.abs() > z.abs())).int()
    return (bits | inexact.int()).view(torch.float32)


def hadamard_transform(
    x: torch.Tensor, sign: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Apply the 16-point RHT to each consecutive 16-chunk of the last dimension.

    Each chunk ``v`` becomes ``v @ (D H / 4)``, rounded once to the input dtype (TE rounds the
    transform to BF16 before taking the amax). The last dimension must be a multiple of 16.
    The transform is orthonormal: applying it to both GEMM operands along the reduction
    dimension leaves the product unchanged.

    Rounding: the products ``v_i * (+-1/4)`` are exact; each output's 16 are summed in FP64
    in token order from ``+0`` (the Triton kernels' exact path) and the sum is rounded once:
    to FP32 by nearest even for FP32 inputs, and for BF16/FP16 inputs through a round-to-odd
    FP32 (:func:`round_to_odd_fp32`), which makes it the nearest-even rounding
    of the FP64 sum itself (no double rounding at BF16 midpoints). The FP64 sum is exact, so
    the output is the correctly rounded exact transform, whenever the chunk's nonzero inputs
    span few enough binades: always for FP16 (its whole range fits), up to 41 binades for
    BF16 and 25 for FP32 (largest over smallest exponent). Wider chunks are rounded from the
    FP64 sum (error below 2^-49 of the sum of |products|). The Triton kernels give these
    bits exactly for every input.
    """
    if x.shape[-1] % RHT_SIZE:
        raise ValueError(
            f"hadamard_transform needs the last dimension to be a multiple of {RHT_SIZE}; "
            f"got shape {tuple(x.shape)}"
        )
    m = rht_matrix(sign).to(device=x.device, dtype=torch.float64)  # +-1/4
    chunks = x.double().reshape(*x.shape[:-1], x.shape[-1] // RHT_SIZE, RHT_SIZE)
    # each output summed in token order from +0 (an all-zero chunk gives +0, never -0), as
    # the Triton kernels' exact path (kernels._common.rht16_exact) does; in place, one
    # operation per token (a fused multiply-add where the CPU has one changes nothing: the
    # products are exact)
    z = torch.zeros_like(chunks)
    for i in range(RHT_SIZE):
        z.addcmul_(chunks[..., i : i + 1], m[i])
    z = z.reshape(x.shape)
    if x.dtype == torch.float64:
        return z
    if x.dtype == torch.float32:
        return z.float()
    return round_to_odd_fp32(z).to(x.dtype)
