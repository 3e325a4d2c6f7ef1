"""The backend interface: how NVFP4Linear's quantizations and GEMMs are executed.

Every backend gives the reference backend's numbers: identical codes and scales, and GEMM
outputs equal up to the summation order of the FP32 accumulation.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..numerics.quantize import QTensor
from ..recipe import QuantSpec


class Backend(Protocol):
    """What NVFP4Linear needs from a backend."""

    name: str

    def quantize_rowcol(
        self,
        x: torch.Tensor,
        row: QuantSpec | None,
        col: QuantSpec | None,
        generator: torch.Generator | None,
    ) -> tuple[QTensor | None, QTensor | None]:
        """Quantize a 2D ``x`` [M, K] row-wise (along K) and ``x^T`` [K, M] along M.

        Either spec may be None (that copy is skipped). ``numerics.rng.split_generator``
        turns ``generator`` into one child generator per copy (row, then column), whether or
        not each copy is requested; each copy's ``quantize`` draws its seed from its child.
        """
        ...

    def quantize_weight(self, w: torch.Tensor, spec: QuantSpec) -> tuple[QTensor, QTensor]:
        """Quantize ``w`` [N, K] along K and ``w^T`` [K, N] along N.

        With square tiles both come from the same tiles, so ``w^T``'s values are exactly the
        transpose of ``w``'s.
        """
        ...

    def gemm(self, a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
        """``a @ b^T`` for a [M, K] and b [N, K], both quantized along K, in ``out_dtype``.

        Block values are exact in BF16; accumulation is FP32 and the global scales multiply
        the FP32 output before the cast.
        """
        ...
