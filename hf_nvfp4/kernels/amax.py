"""Global amax pass: ``max|x|`` and, optionally, ``max|RHT(x^T)|`` in one read of ``x``.

The first phase of two-phase quantization: the global encode scale must be known before any
element is encoded. Each program walks a strip of ``TILES`` row tiles of one column block,
keeps elementwise running maxima (``max|x|`` in x's dtype: exact, two per register for 16-bit
inputs), and folds them in with one atomic max per output.

The RHT output is rounded to ``x.dtype`` before its amax in the reference
(``numerics.hadamard_transform``: one rounding of the FP64 token-order sum); rounding is
monotone, so only the global maximum's rounding matters. For BF16 the main pass takes the
maximum ``G`` of a tensor-core FP32 transform (each program also stores its strip's), and a
second, tiny launch rounds ``G`` once, unless a BF16 midpoint lies within the FP32 sum's error
of it (2^-15 G: 0.8-1.6% of calls, the window over BF16's spacing at ``G``): then the strips
whose maximum comes that close to ``G`` are redone with the reference's arithmetic
(:func:`._common.rht16_exact`). The main pass carries no exact path, so its code is that of a
plain maximum. FP16 and FP32 inputs always take the exact path, in the main pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import (
    cdiv,
    rht16_exact_one,
    rht16_exact_tokens,
    rht_blockdiag,
    round_bf16,
    sign_mask,
)
from ._tuning import pick, shape_bucket

_BM = 64  # the RHT block-diagonal size
# (BK, TILES, num_warps, num_stages), measured per shape; the last two, one or two row tiles
# per program, fill the GPU for weights (a 768x768 weight is 12x12 tiles: strips of 4-16
# tiles would leave most SMs idle)
_CONFIGS = ((64, 16, 4, 4), (128, 8, 4, 3), (256, 4, 8, 3), (128, 4, 8, 2), (64, 8, 4, 3),
            (64, 1, 4, 2), (64, 2, 4, 3))
# the fix-up launch's warps, whatever the main pass's: its exact path spilled to the stack
# with 4 (Triton 3.8, sm_90)
_FIX_WARPS = 8
# untimed (the interpreter): one tile per program, so that no program walks masked tiles past
# M (every config gives the same bits)
_UNTIMED = (64, 1, 4, 2)


@triton.jit
def _exact_rht_amax(x_ptr, row0, cols, M, K, stride_m, SIGN: tl.constexpr,
                    INTERPRET: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                    TILES: tl.constexpr):
    """``max|RHT(x^T)|`` over the strip from row ``row0`` (``TILES`` tiles of BM rows), each
    output as the reference rounds it (:func:`._common.rht16_exact_one`, on [BM/16, BK] blocks:
    token j of every 16-token block; the interpreter takes all 16 at once,
    :func:`._common.rht16_exact_tokens`)."""
    m = tl.zeros([BM // 16, BK], dtype=tl.float32)
    kin = cols[None, :] < K
    for t in range(TILES):
        brow = row0 + t * BM + 16 * tl.arange(0, BM // 16)
        p = x_ptr + brow[:, None].to(tl.int64) * stride_m + cols[None, :]
        if INTERPRET:
            y = rht16_exact_tokens(p, stride_m, M - brow[:, None], kin, SIGN, INTERPRET)
            m = tl.maximum(m, tl.max(tl.abs(y), axis=1))
        else:
            for j in tl.static_range(16):  # one output at a time: no tuple of 16 in registers
                m = tl.maximum(m, tl.abs(rht16_exact_one(p, stride_m, M - brow[:, None], kin,
                                                         j, SIGN, INTERPRET)))
    return tl.max(tl.max(m, axis=1), axis=0)


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
    RHT_SIGN: tl.constexpr,
    INTERPRET: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    TILES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_k * BK + tl.arange(0, BK)
    offs = tl.arange(0, BM)
    is_bf16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    if COL_RHT and is_bf16:
        bd = tl.load(bd_ptr + offs[:, None] * BM + offs[None, :])
        if INTERPRET:
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
                if is_bf16:
                    if INTERPRET:
                        y = tl.dot(bd, x.to(tl.float32), input_precision="ieee")
                    else:
                        y = tl.dot(bd, x)
                    acc_col = tl.maximum(acc_col, tl.abs(y))
            else:
                acc_col = tl.maximum(acc_col, tl.abs(x.to(tl.float32)))
    if DO_ROW:
        tl.atomic_max(out_ptr, tl.max(tl.max(acc_row.to(tl.float32), axis=1), axis=0))
    if DO_COL:
        cmax = tl.max(tl.max(acc_col, axis=1), axis=0)
        if COL_RHT:
            if is_bf16:  # the FP32 maximum, rounded or redone by _amax_fix_kernel
                tl.store(out_ptr + 3 + pid_m * tl.num_programs(1) + pid_k, cmax)
                tl.atomic_max(out_ptr + 2, cmax)
            else:
                tl.atomic_max(out_ptr + 1, _exact_rht_amax(x_ptr, pid_m * TILES * BM, cols, M,
                                                           K, stride_m, RHT_SIGN, INTERPRET,
                                                           BM, BK, TILES))
        else:
            tl.atomic_max(out_ptr + 1, cmax)


@triton.jit
def _amax_fix_kernel(x_ptr, out_ptr, M, K, stride_m, RHT_SIGN: tl.constexpr,
                     INTERPRET: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                     TILES: tl.constexpr):
    """The BF16 RHT maximum from the main pass's FP32 one ``G`` (``out[2]``; each program's
    strip maximum at ``out[3 + program]``, same grid): ``G`` rounded once by program 0, or,
    when a BF16 midpoint lies within ``eps`` of ``G``, the exact maximum of every strip that
    could hold the exact global maximum.

    Every tensor-core output is within ``2^-16 E`` of its exact value (``E`` the exact global
    maximum): a block's sum of |products| ``T`` is at most 4 max|y| (``||y||_2 = ||x||_2``,
    ``T = ||x||_1 / 4``), and the tensor cores' error is assumed below ``2^-18 T`` (exact
    products, an FP32 sum of 16; the interpreter's IEEE sum: ``16 * 2^-24 T``;
    bench/rht_exactness.py measures it on the GPU). So ``|G - E| < eps = 2^-15 G``: with no
    midpoint that close, ``E`` rounds as ``G`` does; else the strip holding ``E`` has a
    maximum above ``G - 2 eps``, and only those strips are redone (NaN or inf: all)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.load(out_ptr + 2)
    eps = tl.math.fma(g, 3.0517578125e-05, 1.401298464324817e-45)
    mid = ((g.to(tl.int32, bitcast=True) & -65536) | 32768).to(tl.float32, bitcast=True)
    if tl.abs(g - mid) >= eps:
        if (pid_m == 0) & (pid_k == 0):
            if INTERPRET:
                tl.store(out_ptr + 1, round_bf16(g))
            else:
                tl.store(out_ptr + 1, g.to(tl.bfloat16).to(tl.float32))
    else:
        c = tl.load(out_ptr + 3 + pid_m * tl.num_programs(1) + pid_k)
        if ~(c < g - 2 * eps):
            cols = pid_k * BK + tl.arange(0, BK)
            tl.atomic_max(out_ptr + 1, _exact_rht_amax(x_ptr, pid_m * TILES * BM, cols, M, K,
                                                       stride_m, RHT_SIGN, INTERPRET, BM, BK,
                                                       TILES))


def prepare_rht(rht_sign: tuple[int, ...], device: torch.device) -> None:
    """Build (and cache) the RHT matrices :func:`amax_rowcol` reads on ``device``, one per
    input dtype, ahead of the first call."""
    rht_blockdiag(rht_sign, _BM, torch.bfloat16, device)


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
    bf16_rht = col and rht_sign is not None and x.dtype == torch.bfloat16
    # [max|x|, max|RHT(x^T)|] and, for the BF16 RHT, the FP32 maximum and one per program
    grids = [(cdiv(m, _BM * c[1]), cdiv(k, c[0])) for c in _CONFIGS]
    out = torch.zeros(3 + max(a * b for a, b in grids) if bf16_rht else 2, dtype=torch.float32,
                      device=x.device)
    if not (row or col) or x.numel() == 0:
        return out[:2]
    bd = rht_blockdiag(rht_sign, _BM, x.dtype, x.device) if bf16_rht else out
    sign = sign_mask(rht_sign) if rht_sign is not None else 0

    def launch(bk: int, tiles: int, warps: int, stages: int) -> None:  # idempotent
        grid = (cdiv(m, _BM * tiles), cdiv(k, bk))
        _amax_kernel[grid](
            x, out, bd, m, k, x.stride(0),
            DO_ROW=row, DO_COL=col, COL_RHT=col and rht_sign is not None, RHT_SIGN=sign,
            INTERPRET=interpreting(), BM=_BM, BK=bk, TILES=tiles,
            num_warps=warps, num_stages=stages,
        )
        if bf16_rht:
            _amax_fix_kernel[grid](x, out, m, k, x.stride(0), RHT_SIGN=sign,
                                   INTERPRET=interpreting(), BM=_BM, BK=bk, TILES=tiles,
                                   num_warps=_FIX_WARPS)

    key = ("amax2", shape_bucket(m), shape_bucket(k), x.dtype, row, col, rht_sign is not None,
           x.device)
    names = [f"BK={c[0]},tiles={c[1]},warps={c[2]},stages={c[3]}" for c in _CONFIGS]
    cands = lambda: {n: (lambda c=c: launch(*c)) for n, c in zip(names, _CONFIGS, strict=True)}
    fixed = names[_CONFIGS.index(_UNTIMED)]
    launch(*_CONFIGS[names.index(pick(key, cands, x.device, fixed=fixed))])
    return out[:2]
