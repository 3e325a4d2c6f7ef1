"""FP4 dequantization: packed E2M1 codes times their block scales (times the global scale).

NVFP4: blocks of 16 with E4M3 scales; MXFP4: blocks of 32 with UE8M0 (power-of-two) scales.
Block values ``fp4(q) * s_b`` are exact in BF16 for both (an E2M1 value has two significant
bits, and BF16 keeps them down to its subnormals; a UE8M0 scale of 2^126 or 2^127, which the
quantizer never writes for finite inputs, can overflow to Inf as in the reference), so
dequantizing to BF16 without the global scale loses nothing: that is the operand form of the
dequantize-then-GEMM path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, e2m1_decode, e4m3_decode, ue8m0_decode, unpack_pairs

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
    BLOCK: tl.constexpr,
    BF16_BITS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    c0 = tl.program_id(1) * BC
    bcols = c0 // 2 + tl.arange(0, BC // 2)
    scols = c0 // BLOCK + tl.arange(0, BC // BLOCK)
    rmask = rows[:, None] < R
    packed = tl.load(
        data_ptr + rows[:, None].to(tl.int64) * (C // 2) + bcols[None, :],
        mask=rmask & (bcols[None, :] < C // 2),
        other=0,
    )
    sbytes = tl.load(
        scale_ptr + rows[:, None].to(tl.int64) * (C // BLOCK) + scols[None, :],
        mask=rmask & (scols[None, :] < C // BLOCK),
        other=0,
    ).to(tl.int32)
    if BLOCK == 16:
        scales = e4m3_decode(sbytes)
    else:
        scales = ue8m0_decode(sbytes)
    vals = tl.reshape(e2m1_decode(unpack_pairs(packed, BR, BC)), [BR, BC // BLOCK, BLOCK])
    vals = tl.reshape(vals * scales[:, :, None], [BR, BC])
    if APPLY_GS:
        vals = vals * tl.load(gs_ptr)
    if BF16_BITS:  # exact in BF16: the high half of the FP32 bits (subnormals kept)
        out = (vals.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = vals.to(out_ptr.dtype.element_ty)
    cols = c0 + tl.arange(0, BC)
    tl.store(
        out_ptr + rows[:, None].to(tl.int64) * C + cols[None, :],
        out,
        mask=rmask & (cols[None, :] < C),
    )


def dequantize_fp4(
    data: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor | None,
    rows: int,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 16,
) -> torch.Tensor:
    """Values of the first ``rows`` rows of packed FP4 ``data`` [R, C/2] at the padded width.

    ``block`` 16: NVFP4 (E4M3 scale bytes [R, C/16]); 32: MXFP4 (UE8M0 bytes [R, C/32]).
    With ``global_scale`` None these are the block values (exact in BF16); otherwise they are
    multiplied by it in FP32 before the cast to ``out_dtype``, as ``QTensor.dequantize``.
    """
    if block not in (16, 32):
        raise ValueError(f"block must be 16 (NVFP4) or 32 (MXFP4), got {block}")
    c = data.shape[1] * 2
    out = torch.empty((rows, c), dtype=out_dtype, device=data.device)
    gs = global_scale if global_scale is not None else out
    grid = (cdiv(rows, _BR), cdiv(c, _BC))
    _dequantize_kernel[grid](
        data, scale.view(torch.uint8), gs, out, rows, c,
        APPLY_GS=global_scale is not None, BLOCK=block,
        BF16_BITS=global_scale is None and out_dtype == torch.bfloat16, BR=_BR, BC=_BC, num_warps=8,
    )
    return out
