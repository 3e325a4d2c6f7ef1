"""NVFP4 dequantization: packed E2M1 codes times E4M3 block scales (times the global scale).

Block values ``fp4(q) * fp32(s_b)`` are exact in BF16, so dequantizing to BF16 without the
global scale loses nothing: that is the operand form of the dequantize-then-GEMM path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, e2m1_decode, e4m3_decode, unpack_pairs

_BR = 32
_BC = 256


@triton.jit
def _dequantize_kernel(
    data_ptr,
    scale_ptr,
    gs_ptr,
    out_ptr,
    R,
    C,
    APPLY_GS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    c0 = tl.program_id(1) * BC
    bcols = c0 // 2 + tl.arange(0, BC // 2)
    scols = c0 // 16 + tl.arange(0, BC // 16)
    rmask = rows[:, None] < R
    packed = tl.load(
        data_ptr + rows[:, None].to(tl.int64) * (C // 2) + bcols[None, :],
        mask=rmask & (bcols[None, :] < C // 2),
        other=0,
    )
    sbytes = tl.load(
        scale_ptr + rows[:, None].to(tl.int64) * (C // 16) + scols[None, :],
        mask=rmask & (scols[None, :] < C // 16),
        other=0,
    )
    vals = tl.reshape(e2m1_decode(unpack_pairs(packed, BR, BC)), [BR, BC // 16, 16])
    vals = tl.reshape(vals * e4m3_decode(sbytes.to(tl.int32))[:, :, None], [BR, BC])
    if APPLY_GS:
        vals = vals * tl.load(gs_ptr)
    cols = c0 + tl.arange(0, BC)
    tl.store(
        out_ptr + rows[:, None].to(tl.int64) * C + cols[None, :],
        vals.to(out_ptr.dtype.element_ty),
        mask=rmask & (cols[None, :] < C),
    )


def dequantize_nvfp4(
    data: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor | None,
    rows: int,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Values of the first ``rows`` rows of packed NVFP4 ``data`` [R, C/2] at the padded width.

    With ``global_scale`` None these are the block values (exact in BF16); otherwise they are
    multiplied by it in FP32 before the cast to ``out_dtype``, as ``QTensor.dequantize``.
    """
    c = data.shape[1] * 2
    out = torch.empty((rows, c), dtype=out_dtype, device=data.device)
    gs = global_scale if global_scale is not None else out
    grid = (cdiv(rows, _BR), cdiv(c, _BC))
    _dequantize_kernel[grid](
        data, scale.view(torch.uint8), gs, out, rows, c,
        APPLY_GS=global_scale is not None, BR=_BR, BC=_BC, num_warps=8,
    )
    return out
