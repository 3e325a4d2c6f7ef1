"""The backend interface: how NVFP4Linear's quantizations and GEMMs are executed.

Every backend gives the reference backend's numbers: identical codes and scales, and GEMM
outputs equal up to the summation order of the FP32 accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..numerics.quantize import QTensor
from ..numerics.rng import generator_keys
from ..recipe import QuantSpec

#: Stochastic-rounding source: a generator (functional API, tests), int32 [2] keys
#: (training: :func:`hf_nvfp4.quant.sr.advance_keys`; [0] row copy, [1] column copy) or None.
Rng = torch.Generator | torch.Tensor | None


@dataclass
class BlockValues:
    """An NVFP4 operand as block values (E2M1 value x E4M3 scale, exact in BF16).

    What a backend may hand its own GEMM instead of a packed :class:`QTensor` for a copy that
    is consumed at once and never saved: the GEMM then reads it without a dequantize pass.

    Attributes:
        values: BF16 [rows, padded cols] block values, without the global scale.
        global_scale: FP32 decode scale ``S_dec`` of the tensor.
    """

    values: torch.Tensor
    global_scale: torch.Tensor


Operand = QTensor | BlockValues


def cuda_capability_at_least(
    device: torch.device | str | None, major: int, what: str
) -> tuple[bool, str]:
    """Whether ``device`` (default: the current CUDA device) is a CUDA GPU of compute
    capability >= ``major``.0, and why not; ``what`` names the hardware feature."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return False, f"device {dev} is not a CUDA device"
    got, minor = torch.cuda.get_device_capability(dev)
    if got < major:
        return False, f"compute capability {got}.{minor} < {major}.0 ({what})"
    return True, "ok"


def as_keys(rng: Rng, device: torch.device) -> torch.Tensor | None:
    """int32 [2] keys on ``device`` from an :data:`Rng` (a generator is split as the
    reference does: :func:`hf_nvfp4.numerics.rng.generator_keys`). Tensors are recognised
    first: torch 2.14's dynamo cannot trace ``isinstance(tensor, torch.Generator)``."""
    if rng is None:
        return None
    if not isinstance(rng, torch.Tensor):
        rng = generator_keys(rng)
    return rng.to(device)


class Backend(Protocol):
    """What NVFP4Linear needs from a backend."""

    name: str

    def quantize_rowcol(
        self,
        x: torch.Tensor,
        row: QuantSpec | None,
        col: QuantSpec | None,
        rng: Rng = None,
        *,
        amax: torch.Tensor | None = None,
        values: tuple[bool, bool] = (False, False),
    ) -> tuple[Operand | None, Operand | None]:
        """Quantize a 2D ``x`` [M, K] row-wise (along K) and ``x^T`` [K, M] along M.

        Either spec may be None (that copy is skipped). Stochastic copies draw with key
        ``keys[0]`` (row) and ``keys[1]`` (column) of :func:`as_keys` ``(rng)``, whether or
        not the other copy is requested. ``amax``: FP32 [2] global amaxes (row, column) to
        derive the global scales from instead of the local ones (e.g. all-reduced across
        data-parallel ranks; see :meth:`amax_rowcol`). ``values`` (row, column) asks for
        :class:`BlockValues` where the backend has them, for copies only its GEMM reads.
        """
        ...

    def amax_rowcol(
        self, x: torch.Tensor, row: QuantSpec | None, col: QuantSpec | None
    ) -> torch.Tensor:
        """FP32 [2] local global amaxes of ``x``'s row copy and ``x^T``'s column copy (after
        the column spec's RHT), as :func:`hf_nvfp4.numerics.quantize.tensor_amax` takes them;
        0 for a copy whose spec is None."""
        ...

    def quantize_weight(
        self, w: torch.Tensor, spec: QuantSpec, *, amax: torch.Tensor | None = None,
        values: bool = False,
    ) -> tuple[Operand, QTensor]:
        """Quantize ``w`` [N, K] along K and ``w^T`` [K, N] along N.

        With square tiles both come from the same tiles, so ``w^T``'s values are exactly the
        transpose of ``w``'s. ``amax``: the FP32 0-dim global amax to encode with instead of
        ``w``'s own (formats with a global scale), e.g. that of a whole weight of which ``w``
        is a shard (:mod:`hf_nvfp4.quant.fsdp`); NaN/Inf then propagate instead of raising.
        ``values``: ``w``'s copy as :class:`BlockValues` where the backend has them (the
        forward's copy, which only its GEMM reads); ``w^T`` is always packed.
        """
        ...

    def gemm(self, a: Operand, b: Operand, out_dtype: torch.dtype) -> torch.Tensor:
        """``a @ b^T`` for a [M, K] and b [N, K], both quantized along K, in ``out_dtype``.

        Block values are exact in BF16; accumulation is FP32 and the global scales multiply
        the FP32 output before the cast.
        """
        ...
