"""The kernels as ``torch.library`` custom ops (``torch.ops.hf_nvfp4.*``) with fake impls.

Fake (meta) implementations give output shapes without running anything, so the ops trace
under torch.compile and work on meta tensors. Scales come out as uint8 E4M3 bytes and are
viewed as ``float8_e4m3fn`` by the backend.
"""

from typing import Optional

import torch
from torch import Tensor

from .dequantize import dequantize_nvfp4
from .gemm import gemm_nvfp4
from .quantize_2d import quantize_2d_nvfp4
from .quantize_rowcol import quantize_rowcol_nvfp4

_U8 = torch.uint8


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


@torch.library.custom_op("hf_nvfp4::quantize_rowcol", mutates_args=())
def quantize_rowcol(
    x: Tensor,
    row: bool,
    col: bool,
    col_rht_sign: Optional[list[int]],  # noqa: UP045 (custom_op schema inference)
    row_seed: Optional[int],  # noqa: UP045
    col_seed: Optional[int],  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`.quantize_rowcol.quantize_rowcol_nvfp4`."""
    sign = tuple(col_rht_sign) if col_rht_sign is not None else None
    return quantize_rowcol_nvfp4(x.contiguous(), row, col, sign, row_seed, col_seed)


@quantize_rowcol.register_fake
def _(x, row, col, col_rht_sign, row_seed, col_seed):
    m, k = x.shape
    new = x.new_empty
    empty = new(0, dtype=_U8)
    return (
        new((m, _pad16(k) // 2), dtype=_U8) if row else empty,
        new((m, _pad16(k) // 16), dtype=_U8) if row else empty.clone(),
        new((k, _pad16(m) // 2), dtype=_U8) if col else empty.clone(),
        new((k, _pad16(m) // 16), dtype=_U8) if col else empty.clone(),
        new(2, dtype=torch.float32),
    )


@torch.library.custom_op("hf_nvfp4::quantize_2d", mutates_args=())
def quantize_2d(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`.quantize_2d.quantize_2d_nvfp4`."""
    return quantize_2d_nvfp4(w.contiguous())


@quantize_2d.register_fake
def _(w):
    n16, k16 = _pad16(w.shape[0]), _pad16(w.shape[1])
    new = w.new_empty
    return (
        new((n16, k16 // 2), dtype=_U8),
        new((n16, k16 // 16), dtype=_U8),
        new((k16, n16 // 2), dtype=_U8),
        new((k16, n16 // 16), dtype=_U8),
        new(1, dtype=torch.float32),
    )


@torch.library.custom_op("hf_nvfp4::dequantize", mutates_args=())
def dequantize(
    data: Tensor,
    scale: Tensor,
    global_scale: Optional[Tensor],  # noqa: UP045
    rows: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """See :func:`.dequantize.dequantize_nvfp4`."""
    return dequantize_nvfp4(data, scale, global_scale, rows, out_dtype)


@dequantize.register_fake
def _(data, scale, global_scale, rows, out_dtype):
    return data.new_empty((rows, data.shape[1] * 2), dtype=out_dtype)


@torch.library.custom_op("hf_nvfp4::gemm", mutates_args=())
def gemm(
    a_data: Tensor,
    a_scale: Tensor,
    a_global: Tensor,
    a_rows: int,
    b_data: Tensor,
    b_scale: Tensor,
    b_global: Tensor,
    b_rows: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """See :func:`.gemm.gemm_nvfp4`."""
    return gemm_nvfp4(
        (a_data, a_scale, a_global, a_rows), (b_data, b_scale, b_global, b_rows), out_dtype
    )


@gemm.register_fake
def _(a_data, a_scale, a_global, a_rows, b_data, b_scale, b_global, b_rows, out_dtype):
    return a_data.new_empty((a_rows, b_rows), dtype=out_dtype)
