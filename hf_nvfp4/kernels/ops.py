"""The kernels as ``torch.library`` custom ops (``torch.ops.hf_nvfp4.*``) with fake impls.

Fake (meta) implementations give output shapes without running anything, so the ops trace
under torch.compile and work on meta tensors. NVFP4 scales come out as uint8 E4M3 bytes and
are returned as ``float8_e4m3fn`` (ops taking scales accept either 1-byte dtype); MXFP4's
UE8M0 scales stay uint8, the QTensor dtype.

Outside torch.compile a call runs the Python implementation directly: the dispatcher round
trip of a Python custom op costs ~10-20 us per call, and an NVFP4 linear makes about a dozen
calls per training step (host time that small layers do not hide behind GPU work).
"""

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from .amax import amax_rowcol as _amax_rowcol
from .amax import prepare_rht  # noqa: F401 - the backend reaches the kernels through here
from .dequantize import dequantize_fp4
from .gemm import gemm_scaled
from .quantize_2d import quantize_2d_mxfp4 as _quantize_2d_mxfp4
from .quantize_2d import quantize_2d_nvfp4
from .quantize_fp8 import quantize_2d_fp8 as _quantize_2d_fp8
from .quantize_fp8 import quantize_rowcol_fp8 as _quantize_rowcol_fp8
from .quantize_mxfp4 import quantize_rowcol_mxfp4 as _quantize_rowcol_mxfp4
from .quantize_rowcol import quantize_rowcol_nvfp4

_U8 = torch.uint8
_E4M3 = torch.float8_e4m3fn


def _e4m3(scale: Tensor) -> Tensor:
    """The kernels write E4M3 scale bytes into uint8 buffers; ops return them typed."""
    return scale.view(_E4M3)


class _EagerOp:
    """A ``torch.library`` custom op that eager calls bypass (see the module docstring)."""

    def __init__(self, name: str, impl: Callable[..., Any]) -> None:
        self.op = torch.library.custom_op(name, mutates_args=())(impl)
        self.impl = impl
        self.__doc__ = impl.__doc__

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Register the op's fake (meta) implementation."""
        return self.op.register_fake(fn)

    def __call__(self, *args: Any) -> Any:
        # every op's first argument is its main input tensor: meta (or fake) with the others
        if torch.compiler.is_compiling() or args[0].is_meta:
            return self.op(*args)
        return self.impl(*args)


def _custom_op(name: str) -> Callable[[Callable[..., Any]], _EagerOp]:
    return lambda impl: _EagerOp(name, impl)


def _pad(n: int, block: int) -> int:
    """``n`` rounded up to a multiple of ``block``."""
    return -(-n // block) * block


@_custom_op("hf_nvfp4::quantize_rowcol")
def quantize_rowcol(
    x: Tensor,
    row: bool,
    col: bool,
    col_rht_sign: Optional[list[int]],  # noqa: UP045 (custom_op schema inference)
    row_sr: bool,
    col_sr: bool,
    keys: Optional[Tensor],  # noqa: UP045
    amax: Optional[Tensor],  # noqa: UP045
    row_values: bool,
    col_values: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`.quantize_rowcol.quantize_rowcol_nvfp4`."""
    sign = tuple(col_rht_sign) if col_rht_sign is not None else None
    rd, rs, cd, cs, gs = quantize_rowcol_nvfp4(
        x.contiguous(), row, col, sign, row_sr, col_sr, keys,
        amax=amax, row_values=row_values, col_values=col_values,
    )
    return rd, _e4m3(rs), cd, _e4m3(cs), gs


@quantize_rowcol.register_fake
def _(x, row, col, col_rht_sign, row_sr, col_sr, keys, amax, row_values, col_values):
    m, k = x.shape
    new = x.new_empty

    def copy(rows: int, cols: int, keep: bool, values: bool) -> tuple[Tensor, Tensor]:
        if not keep:
            return new(0, dtype=_U8), new(0, dtype=_E4M3)
        if values:
            return new((rows, cols), dtype=torch.bfloat16), new(0, dtype=_E4M3)
        return new((rows, cols // 2), dtype=_U8), new((rows, cols // 16), dtype=_E4M3)

    return (
        *copy(m, _pad(k, 16), row, row_values),
        *copy(k, _pad(m, 16), col, col_values),
        new(2, dtype=torch.float32),
    )


@_custom_op("hf_nvfp4::amax_rowcol")
def amax_rowcol(x: Tensor, row: bool, col: bool,
                col_rht_sign: Optional[list[int]]) -> Tensor:  # noqa: UP045
    """See :func:`.amax.amax_rowcol`."""
    sign = tuple(col_rht_sign) if col_rht_sign is not None else None
    return _amax_rowcol(x.contiguous(), row, col, sign)


@amax_rowcol.register_fake
def _(x, row, col, col_rht_sign):
    return x.new_empty(2, dtype=torch.float32)


@_custom_op("hf_nvfp4::quantize_2d")
def quantize_2d(
    w: Tensor, amax: Optional[Tensor] = None, values: bool = False,  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`.quantize_2d.quantize_2d_nvfp4`."""
    data, scale, data_t, scale_t, gs = quantize_2d_nvfp4(w.contiguous(), amax, values)
    return data, _e4m3(scale), data_t, _e4m3(scale_t), gs


@quantize_2d.register_fake
def _(w, amax=None, values=False):
    n16, k16 = _pad(w.shape[0], 16), _pad(w.shape[1], 16)
    new = w.new_empty
    return (
        *((new((w.shape[0], k16), dtype=torch.bfloat16), new(0, dtype=_E4M3)) if values else
          (new((n16, k16 // 2), dtype=_U8), new((n16, k16 // 16), dtype=_E4M3))),
        new((k16, n16 // 2), dtype=_U8),
        new((k16, n16 // 16), dtype=_E4M3),
        new(1, dtype=torch.float32),
    )


@_custom_op("hf_nvfp4::quantize_rowcol_fp8")
def quantize_rowcol_fp8(x: Tensor, row: bool, col: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See :func:`.quantize_fp8.quantize_rowcol_fp8`."""
    return _quantize_rowcol_fp8(x, row, col)


@quantize_rowcol_fp8.register_fake
def _(x, row, col):
    m, k = x.shape
    new = x.new_empty

    def copy(rows: int, cols: int, keep: bool) -> tuple[Tensor, Tensor]:
        if not keep:
            return new(0, dtype=_E4M3), new(0, dtype=torch.float32)
        return new((rows, cols), dtype=_E4M3), new((rows, cols // 128), dtype=torch.float32)

    return (*copy(m, _pad(k, 128), row), *copy(k, _pad(m, 128), col))


@_custom_op("hf_nvfp4::quantize_2d_fp8")
def quantize_2d_fp8(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See :func:`.quantize_fp8.quantize_2d_fp8`."""
    return _quantize_2d_fp8(w)


@quantize_2d_fp8.register_fake
def _(w):
    n128, k128 = _pad(w.shape[0], 128), _pad(w.shape[1], 128)
    new = w.new_empty
    return (
        new((n128, k128), dtype=_E4M3),
        new((n128, k128 // 128), dtype=torch.float32),
        new((k128, n128), dtype=_E4M3),
        new((k128, n128 // 128), dtype=torch.float32),
    )


@_custom_op("hf_nvfp4::quantize_rowcol_mxfp4")
def quantize_rowcol_mxfp4(
    x: Tensor,
    row: bool,
    col: bool,
    col_rht_sign: Optional[list[int]],  # noqa: UP045 (custom_op schema inference)
    row_sr: bool,
    col_sr: bool,
    keys: Optional[Tensor],  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See :func:`.quantize_mxfp4.quantize_rowcol_mxfp4` (UE8M0 scales as uint8 bytes)."""
    sign = tuple(col_rht_sign) if col_rht_sign is not None else None
    return _quantize_rowcol_mxfp4(x, row, col, sign, row_sr, col_sr, keys)


@quantize_rowcol_mxfp4.register_fake
def _(x, row, col, col_rht_sign, row_sr, col_sr, keys):
    m, k = x.shape
    new = x.new_empty

    def copy(rows: int, cols: int, keep: bool) -> tuple[Tensor, Tensor]:
        if not keep:
            return new(0, dtype=_U8), new(0, dtype=_U8)
        return new((rows, cols // 2), dtype=_U8), new((rows, cols // 32), dtype=_U8)

    return (*copy(m, _pad(k, 32), row), *copy(k, _pad(m, 32), col))


@_custom_op("hf_nvfp4::quantize_2d_mxfp4")
def quantize_2d_mxfp4(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See :func:`.quantize_2d.quantize_2d_mxfp4` (UE8M0 scales as uint8 bytes)."""
    return _quantize_2d_mxfp4(w.contiguous())


@quantize_2d_mxfp4.register_fake
def _(w):
    n32, k32 = _pad(w.shape[0], 32), _pad(w.shape[1], 32)
    new = w.new_empty
    return (
        new((n32, k32 // 2), dtype=_U8),
        new((n32, k32 // 32), dtype=_U8),
        new((k32, n32 // 2), dtype=_U8),
        new((k32, n32 // 32), dtype=_U8),
    )


@_custom_op("hf_nvfp4::dequantize")
def dequantize(
    data: Tensor,
    scale: Tensor,
    global_scale: Optional[Tensor],  # noqa: UP045
    rows: int,
    out_dtype: torch.dtype,
    block: int = 16,
) -> Tensor:
    """See :func:`.dequantize.dequantize_fp4`."""
    return dequantize_fp4(data, scale.view(_U8), global_scale, rows, out_dtype, block)


@dequantize.register_fake
def _(data, scale, global_scale, rows, out_dtype, block=16):
    return data.new_empty((rows, data.shape[1] * 2), dtype=out_dtype)


@_custom_op("hf_nvfp4::gemm_scaled")
def gemm_scaled_op(
    a: Tensor, b: Tensor, gsa: Tensor, gsb: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """See :func:`.gemm.gemm_scaled`."""
    return gemm_scaled(a, b, gsa, gsb, out_dtype)


@gemm_scaled_op.register_fake
def _(a, b, gsa, gsb, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)
