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


def hadamard_transform(
    x: torch.Tensor, sign: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Apply the 16-point RHT to each consecutive 16-chunk of the last dimension.

    Each chunk ``v`` becomes ``v @ (D H / 4)``, accumulated in FP32 and rounded back to the
    input dtype (what TE does before taking the amax). The last dimension must be a multiple
    of 16. The transform is orthonormal: applying it to both GEMM operands along the
    reduction dimension leaves the product unchanged.
    """
    if x.shape[-1] % RHT_SIZE:
        raise ValueError(
            f"hadamard_transform needs the last dimension to be a multiple of {RHT_SIZE}; "
            f"got shape {tuple(x.shape)}"
        )
    m = rht_matrix(sign, x.device)
    chunks = x.float().reshape(*x.shape[:-1], x.shape[-1] // RHT_SIZE, RHT_SIZE)
    return (chunks @ m).reshape(x.shape).to(x.dtype)
