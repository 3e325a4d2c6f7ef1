"""The reference backend: pure PyTorch on any device, the source of truth for the others."""

from __future__ import annotations

import torch

from ..numerics.quantize import QTensor, quantize, tensor_amax
from ..recipe import QuantSpec
from .base import Rng, as_keys


def quantize_spec(
    x: torch.Tensor,
    spec: QuantSpec,
    rng: torch.Generator | torch.Tensor | None = None,
    amax: torch.Tensor | None = None,
    check_finite: bool = True,
) -> QTensor:
    """``numerics.quantize`` with the arguments of a QuantSpec.

    ``rng``: a generator, or one 32-bit key (0-dim integer tensor), for stochastic rounding.
    ``amax``: the FP32 0-dim global amax to use instead of the local one (formats with a
    global scale); NaN/Inf then propagate instead of raising: a rank that raised between
    collectives would leave the others waiting in theirs.
    ``check_finite``: False propagates NaN/Inf as the kernels do (no host sync).
    """
    global_amax = amax if spec.fmt == "nvfp4" else None
    return quantize(
        x,
        spec.fmt,
        tile=spec.tile,
        rounding=spec.rounding,
        rht=spec.rht,
        rht_sign=spec.rht_sign,
        generator=None if rng is None or isinstance(rng, torch.Tensor) else rng,
        sr_key=rng if isinstance(rng, torch.Tensor) and spec.rounding == "stochastic" else None,
        amax_reduce=None if global_amax is None else (lambda _local: global_amax),
        allow_nonfinite=amax is not None or not check_finite,
    )


def reference_amax_rowcol(
    x: torch.Tensor, row: QuantSpec | None, col: QuantSpec | None
) -> torch.Tensor:
    """See :meth:`Backend.amax_rowcol`."""
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    a_row = tensor_amax(x) if row is not None else zero
    a_col = (
        tensor_amax(x.t().contiguous(), rht=col.rht, rht_sign=col.rht_sign)
        if col is not None else zero
    )
    return torch.stack([a_row.float(), a_col.float()])


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
    """Unfused pure-PyTorch quantization and FP32 GEMMs of exact block values.

    Args:
        check_finite: raise on NaN/Inf inputs (a host sync per quantization; in eager only:
            under torch.compile they propagate, so a graph has no data-dependent branch);
            False propagates them into the scales as the kernels do (the Triton backend's
            fallback for formats it has no kernels for, which must not stall the GPU).
    """

    name = "reference"

    def __init__(self, check_finite: bool = True) -> None:
        self.check_finite = check_finite

    def _quantize(
        self, x: torch.Tensor, spec: QuantSpec, key: torch.Tensor | None = None,
        amax: torch.Tensor | None = None,
    ) -> QTensor:
        # traced, the check would be a data-dependent branch: propagate as the kernels do
        check = self.check_finite and not torch.compiler.is_compiling()
        return quantize_spec(x, spec, key, amax, check)

    def quantize_rowcol(
        self,
        x: torch.Tensor,
        row: QuantSpec | None,
        col: QuantSpec | None,
        rng: Rng = None,
        *,
        amax: torch.Tensor | None = None,
        values: tuple[bool, bool] = (False, False),
    ) -> tuple[QTensor | None, QTensor | None]:
        """See :meth:`Backend.quantize_rowcol` (always packed QTensors)."""
        keys = as_keys(rng, x.device)
        k_row, k_col = (None, None) if keys is None else (keys[0], keys[1])
        a_row, a_col = (None, None) if amax is None else (amax[0], amax[1])
        q_row = self._quantize(x, row, k_row, a_row) if row is not None else None
        q_col = (
            self._quantize(x.t().contiguous(), col, k_col, a_col) if col is not None else None
        )
        return q_row, q_col

    def amax_rowcol(
        self, x: torch.Tensor, row: QuantSpec | None, col: QuantSpec | None
    ) -> torch.Tensor:
        """See :meth:`Backend.amax_rowcol`."""
        return reference_amax_rowcol(x, row, col)

    def quantize_weight(
        self, w: torch.Tensor, spec: QuantSpec, *, amax: torch.Tensor | None = None,
        values: bool = False,
    ) -> tuple[QTensor, QTensor]:
        """See :meth:`Backend.quantize_weight` (always packed QTensors)."""
        return (self._quantize(w, spec, amax=amax),
                self._quantize(w.t().contiguous(), spec, amax=amax))

    def gemm(self, a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
        """See :meth:`Backend.gemm`."""
        return reference_gemm(a, b, out_dtype)
