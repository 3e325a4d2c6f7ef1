"""Per-role quantizers: how a linear layer's input, weight and output gradient are quantized.

A :class:`Quantizer` is built once per layer and device (by
:class:`~hf_nvfp4.nn.functional.LinearPlan`, from the Recipe's :class:`~hf_nvfp4.recipe.RoleSpecs`)
and holds every decision of its role: the spec of each layout, the backend that runs it,
whether the tensor amax is all-reduced across data-parallel ranks, and which copies come
back as block values for the backend's own GEMM. Quantizing runs in explicit phases, the
Transformer Engine / torchao quantizer pattern:

1. :meth:`Quantizer.amax`: the local global amax of each requested copy (the row copy's
   ``max |x|``, the column copy's ``max |RHT(x^T)|``), one Triton kernel on the GPU;
2. :meth:`Quantizer.reduce`: the all-reduce (max) over the process group, when enabled;
3. :meth:`Quantizer.encode`: one pass writing every requested layout with those amaxes.

Calling the quantizer runs all three; without a reduction the Triton encode kernel takes the
amax itself (phases 1 and 3 fused). The result is one :class:`Quantized` storage object that
holds every layout the tensor's consumers need: the row copy (fprop/dgrad) and the RHT column
copy (wgrad) of an activation or gradient, or both orientations of a weight.

Roles: ``"input"`` (x: row copy 1x16 RTN, column copy x^T with RHT), ``"grad_output"`` (dy:
row copy with SR, column copy dy^T with RHT + SR) and ``"weight"`` (W along K for fprop and
W^T along N for dgrad, from the same 16x16 tiles). A weight is whole on every rank (replicated,
or gathered by FSDP before the forward), so its amax is never reduced and is taken inside the
encode pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import backend_instance
from ..backends.base import Backend, Operand
from ..recipe import QuantSpec

ROLES = ("input", "weight", "grad_output")


@dataclass(frozen=True)
class Quantized:
    """Every layout of one quantized tensor.

    Attributes:
        row: quantized along the last dimension (x, dy; W along K), or None.
        col: quantized along the first dimension, i.e. the transpose (x^T, dy^T with the RHT;
            W^T along N), or None.
    """

    row: Operand | None
    col: Operand | None


def all_reduce_max(amax: torch.Tensor) -> torch.Tensor:
    """A copy of ``amax`` all-reduced (max) over the default process group."""
    amax = amax.clone()
    torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX)
    return amax


@dataclass(frozen=True)
class Quantizer:
    """The quantization of one tensor role of a linear layer (hashable, compile-constant).

    Attributes:
        role: one of :data:`ROLES`.
        row: the spec of the row copy (None: never produced).
        col: the spec of the column copy (None: never produced).
        backend: the resolved backend name.
        reduce_amax: all-reduce (max) the amaxes across ranks before encoding.
        values: (row, col): hand that copy to the backend's GEMM as block values where the
            backend has them (copies consumed at once and never saved; a weight's row copy
            only).
    """

    role: str
    row: QuantSpec | None
    col: QuantSpec | None
    backend: str
    reduce_amax: bool = False
    values: tuple[bool, bool] = (False, False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Quantizer role must be one of {ROLES}; got {self.role!r}")
        if self.role == "weight" and self.values[1]:
            raise ValueError("a weight's column copy (W^T) is saved for backward: never values")
        if self.role == "weight" and self.reduce_amax:
            raise ValueError("a weight's amax is never reduced (it is whole on every rank)")

    def _backend(self) -> Backend:
        return backend_instance(self.backend)

    def _specs(self, row: bool, col: bool) -> tuple[QuantSpec | None, QuantSpec | None]:
        return (self.row if row else None), (self.col if col else None)

    def amax(self, x: torch.Tensor, *, row: bool = True, col: bool = True) -> torch.Tensor:
        """Phase 1: FP32 [2] local global amaxes of the requested (row, column) copies of a
        2D ``x``; 0 for a copy not requested (activations and gradients only)."""
        if self.role == "weight":
            raise ValueError("a weight's amax is taken inside its encode pass")
        return self._backend().amax_rowcol(x, *self._specs(row, col))

    def reduce(self, amax: torch.Tensor) -> torch.Tensor:
        """Phase 2: the amaxes to encode with, all-reduced (max) when ``reduce_amax``."""
        return all_reduce_max(amax) if self.reduce_amax else amax

    def encode(
        self,
        x: torch.Tensor,
        amax: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        *,
        row: bool = True,
        col: bool = True,
    ) -> Quantized:
        """Phase 3: the requested layouts of a 2D ``x`` in one :class:`Quantized`.

        ``amax``: [2] global amaxes from phases 1-2, or None to take the local ones.
        ``keys``: int32 [2] stochastic-rounding keys ([0] row copy, [1] column copy), or None.
        """
        backend = self._backend()
        row_spec, col_spec = self._specs(row, col)
        if self.role == "weight":
            return Quantized(*_quantize_weight(backend, x, row_spec, col_spec, self.values[0]))
        if row_spec is None and col_spec is None:
            return Quantized(None, None)
        q_row, q_col = backend.quantize_rowcol(
            x, row_spec, col_spec, keys, amax=amax, values=self.values
        )
        return Quantized(q_row, q_col)

    def __call__(
        self,
        x: torch.Tensor,
        keys: torch.Tensor | None = None,
        *,
        row: bool = True,
        col: bool = True,
    ) -> Quantized:
        """All phases: amax, reduction (if enabled) and encode of a 2D ``x``."""
        amax = None
        if self.reduce_amax and (self._specs(row, col) != (None, None)):
            amax = self.reduce(self.amax(x, row=row, col=col))
        return self.encode(x, amax, keys, row=row, col=col)


def _quantize_weight(
    backend: Backend, w: torch.Tensor, spec: QuantSpec | None, spec_t: QuantSpec | None,
    values: bool,
) -> tuple[Operand | None, Operand | None]:
    """W along K (``spec``; block values if ``values``) and W^T along N (``spec_t``); with
    equal specs both come from the same tiles (one pass)."""
    if spec is None:
        return None, (backend.quantize_weight(w, spec_t)[1] if spec_t is not None else None)
    w_q, w_t = backend.quantize_weight(w, spec, values=values)
    if spec_t is None:
        return w_q, None
    if spec_t != spec:
        w_t = backend.quantize_weight(w, spec_t)[1]
    return w_q, w_t


__all__ = ["ROLES", "Quantized", "Quantizer", "all_reduce_max"]
