"""Global amax pass: ``max|x|`` and, optionally, ``max|RHT(x^T)|`` in one read of ``x``.

The first phase of two-phase quantization: the global encode scale must be known before any
element is encoded. Each program reduces one tile and folds it in with an atomic max.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, rht_blockdiag, rht_columns
from ._tuning import pick

_BM = 64  # the RHT block-diagonal size; the encode kernels use the same
_CONFIGS = ((128, 8), (256, 8), (128, 4), (64, 4))  # (BK, num_warps), measured per shape


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
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BK + tl.arange(0, BK)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    if DO_ROW:
        tl.atomic_max(out_ptr, tl.max(tl.max(tl.abs(xf), axis=1), axis=0))
    if DO_COL:
        if COL_RHT:
            y = rht_columns(x, bd_ptr, BM, INTERPRET)
        else:
            y = xf
        tl.atomic_max(out_ptr + 1, tl.max(tl.max(tl.abs(y), axis=1), axis=0))


def amax_rowcol(
    x: torch.Tensor, row: bool, col: bool, rht_sign: tuple[int, ...] | None
) -> torch.Tensor:
    """``[max|x|, max|RHT(x^T)|]`` (FP32 [2]) of a contiguous 2D ``x``.

    Entry 0 is computed when ``row``; entry 1 when ``col``, after the RHT (rounded to
    ``x.dtype``) when ``rht_sign`` is given. Skipped entries are 0.
    """
    m, k = x.shape
    out = torch.zeros(2, dtype=torch.float32, device=x.device)
    bd = rht_blockdiag(rht_sign, _BM, x.dtype, x.device) if rht_sign is not None else out

    def launch(bk: int, warps: int) -> None:  # idempotent: atomic max into `out`
        _amax_kernel[(triton.cdiv(m, _BM), triton.cdiv(k, bk))](
            x, out, bd, m, k, x.stride(0),
            DO_ROW=row, DO_COL=col, COL_RHT=rht_sign is not None, INTERPRET=interpreting(),
            BM=_BM, BK=bk, num_warps=warps,
        )

    key = ("amax", m, k, x.dtype, row, col, rht_sign is not None, x.device)
    names = [f"BK={bk},warps={w}" for bk, w in _CONFIGS]
    cands = lambda: {n: (lambda c=c: launch(*c)) for n, c in zip(names, _CONFIGS, strict=True)}
    bk, warps = _CONFIGS[names.index(pick(key, cands, x.device))]
    launch(bk, warps)
    return out
