"""The reference backend: pure PyTorch on any device, the source of truth for the others."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..numerics.quantize import QTensor, quantize
from ..numerics.rng import split_generator
from ..recipe import QuantSpec


def quantize_spec(
    x: torch.Tensor,
    spec: QuantSpec,
    generator: torch.Generator | None = None,
    amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> QTensor:
    """``numerics.quantize`` with the arguments of a QuantSpec.

    With ``amax_reduce`` NaN/Inf propagate instead of raising: a rank that raised between
    collectives would leave the others waiting in theirs.
    """
    return quantize(
        x,
        spec.fmt,
        tile=spec.tile,
        rounding=spec.rounding,
        rht=spec.rht,
        rht_sign=spec.rht_sign,
        generator=generator,
        amax_reduce=amax_reduce if spec.fmt == "nvfp4" else None,
        allow_nonfinite=amax_reduce is not None,
    )


def quantize_rowcol_reduced(
    x: torch.Tensor,
    row: QuantSpec | None,
    col: QuantSpec | None,
    generator: torch.Generator | None,
    amax_reduce: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[QTensor | None, QTensor | None]:
    """:meth:`ReferenceBackend.quantize_rowcol` with each copy's global amax reduced.

    The data-parallel path: every rank quantizes its shard with the amax of the whole
    batch. Runs on the reference code whatever the layer's backend (the fused kernels take
    their amax inside one call).
    """
    g_row, g_col = split_generator(generator)
    q_row = quantize_spec(x, row, g_row, amax_reduce) if row is not None else None
    q_col = (
        quantize_spec(x.t().contiguous(), col, g_col, amax_reduce) if col is not None else None
    )
    return q_row, q_col


def reference_gemm(a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b^T`` from exact block values in FP32, global scales applied to the output."""
    av, bv = a.block_values(), b.block_values()
    if av.shape[-1] != bv.shape[-1]:
        raise ValueError(
            f"gemm operands disagree on the padded reduction dimension: {tuple(av.shape)} vs "
            f"{tuple(bv.shape)}"
        )
    out = av @ bv.transpose(-1, -2)
    scale = torch.ones((), dtype=torch.float32, device=out.device)
    for q in (a, b):
        if q.global_scale is not None:
            scale = scale * q.global_scale
    out = out * scale
    return out[: a.shape[0], : b.shape[0]].to(out_dtype)


class ReferenceBackend:
    """Unfused pure-PyTorch quantization and FP32 GEMMs of exact block values."""

    name = "reference"

    def quantize_rowcol(
        self,
        x: torch.Tensor,
        row: QuantSpec | None,
        col: QuantSpec | None,
        generator: torch.Generator | None,
    ) -> tuple[QTensor | None, QTensor | None]:
        """See :meth:`Backend.quantize_rowcol`."""
        g_row, g_col = split_generator(generator)
        q_row = quantize_spec(x, row, g_row) if row is not None else None
        q_col = quantize_spec(x.t().contiguous(), col, g_col) if col is not None else None
        return q_row, q_col

    def quantize_weight(self, w: torch.Tensor, spec: QuantSpec) -> tuple[QTensor, QTensor]:
        """See :meth:`Backend.quantize_weight`."""
        return quantize_spec(w, spec), quantize_spec(w.t().contiguous(), spec)

    def gemm(self, a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
        """See :meth:`Backend.gemm`."""
        return reference_gemm(a, b, out_dtype)
