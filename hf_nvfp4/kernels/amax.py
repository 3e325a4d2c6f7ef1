"""Global amax pass: ``max|x|`` and, optionally, ``max|RHT(x^T)|`` in one read of ``x``.

The first phase of two-phase quantization: the global encode scale must be known before any
element is encoded. Each program walks a strip of ``TILES`` row tiles of one column block,
keeps elementwise running maxima (``max|x|`` in x's dtype: exact, two per register for 16-bit
inputs), and folds them in with one atomic max per output.

The RHT output is rounded to ``x.dtype`` before its amax in the reference; rounding is
monotone, so the kernel rounds the FP32 maximum once instead of every element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting, rht_blockdiag, round_bf16
from ._tuning import pick, shape_bucket

_BM = 64  # the RHT block-diagonal size
# (BK, TILES, num_warps, num_stages), measured per shape; the last two, one or two row tiles
# per program, fill the GPU for weights (a 768x768 weight is 12x12 tiles: strips of 4-16
# tiles would leave most SMs idle)
_CONFIGS = ((64, 16, 4, 4), (128, 8, 4, 3), (256, 4, 8, 3), (128, 4, 8, 2), (64, 8, 4, 3),
            (64, 1, 4, 2), (64, 2, 4, 3))


@triton.jit
def _amax_kernel(
    x_ptr,
    out_ptr,
    bd_ptr,
    M,
    K,
    stride_m,
    DO_ROW: tl.constexpr,
    DO_COL: tl.constexpr,
    COL_RHT: tl.constexpr,
    INTERPRET: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    TILES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_k * BK + tl.arange(0, BK)
    offs = tl.arange(0, BM)
    if COL_RHT:
        bd = tl.load(bd_ptr + offs[:, None] * BM + offs[None, :])
        if INTERPRET or x_ptr.dtype.element_ty == tl.float32:
            bd = bd.to(tl.float32)
    acc_row = tl.zeros([BM, BK], dtype=x_ptr.dtype.element_ty)
    acc_col = tl.zeros([BM, BK], dtype=tl.float32)
    for t in range(TILES):
        rows = (pid_m * TILES + t) * BM + offs
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :], mask=mask,
                    other=0.0)
        if DO_ROW:
            acc_row = tl.maximum(acc_row, tl.abs(x)).to(acc_row.dtype)
        if DO_COL:
            if COL_RHT:
                if INTERPRET or x.dtype == tl.float32:
                    y = tl.dot(bd, x.to(tl.float32), input_precision="ieee")
                else:
                    y = tl.dot(bd, x)
            else:
                y = x.to(tl.float32)
            acc_col = tl.maximum(acc_col, tl.abs(y))
    if DO_ROW:
        tl.atomic_max(out_ptr, tl.max(tl.max(acc_row.to(tl.float32), axis=1), axis=0))
    if DO_COL:
        cmax = tl.max(tl.max(acc_col, axis=1), axis=0)
        if COL_RHT:
            if INTERPRET and x_ptr.dtype.element_ty == tl.bfloat16:
                cmax = round_bf16(cmax)
            else:
                cmax = cmax.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.atomic_max(out_ptr + 1, cmax)


def prepare_rht(rht_sign: tuple[int, ...], device: torch.device) -> None:
    """Build (and cache) the RHT matrices :func:`amax_rowcol` reads on ``device``, one per
    input dtype, ahead of the first call."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        rht_blockdiag(rht_sign, _BM, dtype, device)


def amax_rowcol(
    x: torch.Tensor, row: bool, col: bool, rht_sign: tuple[int, ...] | None
) -> torch.Tensor:
    """``[max|x|, max|RHT(x^T)|]`` (FP32 [2]) of a contiguous 2D ``x``.

    Entry 0 is computed when ``row``; entry 1 when ``col``, after the RHT (rounded to
    ``x.dtype``) when ``rht_sign`` is given. Skipped entries are 0. The M padding to a
    multiple of 16 is zeros, which the RHT leaves at 0, so it never changes the result.
    """
    x = x.contiguous()
    m, k = x.shape
    out = torch.zeros(2, dtype=torch.float32, device=x.device)
    if not (row or col) or x.numel() == 0:
        return out
    bd = rht_blockdiag(rht_sign, _BM, x.dtype, x.device) if rht_sign is not None else out

    def launch(bk: int, tiles: int, warps: int, stages: int) -> None:  # idempotent
        _amax_kernel[(cdiv(m, _BM * tiles), cdiv(k, bk))](
            x, out, bd, m, k, x.stride(0),
            DO_ROW=row, DO_COL=col, COL_RHT=col and rht_sign is not None,
            INTERPRET=interpreting(), BM=_BM, BK=bk, TILES=tiles,
            num_warps=warps, num_stages=stages,
        )

    key = ("amax2", shape_bucket(m), shape_bucket(k), x.dtype, row, col, rht_sign is not None,
           x.device)
    names = [f"BK={c[0]},tiles={c[1]},warps={c[2]},stages={c[3]}" for c in _CONFIGS]
    cands = lambda: {n: (lambda c=c: launch(*c)) for n, c in zip(names, _CONFIGS, strict=True)}
    launch(*_CONFIGS[names.index(pick(key, cands, x.device))])
    return out
