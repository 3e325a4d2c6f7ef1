"""Fused NVFP4 quantization of activations/gradients: x row-wise and x^T (optionally RHT).

One pass over ``x`` [M, K] (after the amax pass of :mod:`.amax`) writes both copies:

* row copy: ``x`` along K in 1x16 blocks, ``data`` [M, K16/2], ``scale`` [M, K16/16];
* column copy: ``x^T`` along M in 1x16 blocks, after the 16-point RHT of each 16-token
  group when requested, ``data`` [K, M16/2], ``scale`` [K, M16/16] (M16: M padded to 16).

Each copy has its own global scale, and nearest or stochastic rounding. Stochastic draws
hash the element's row-major index in the padded copy, as :func:`numerics.rng.counter_uniform`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    block_scale,
    e2m1_nearest,
    e2m1_stochastic,
    global_scales,
    interpreting,
    pack_pairs,
    rht_blockdiag,
    rht_columns,
    seed_key,
    uniform24,
)
from ._tuning import pick
from .amax import amax_rowcol

_BM = 64  # as amax.py: the RHT block-diagonal size
_CONFIGS = ((64, 8), (128, 8), (64, 4), (32, 4))  # (BK, num_warps), measured per shape


@triton.jit(do_not_specialize=["row_key", "col_key"])
def _rowcol_kernel(
    x_ptr,
    amax_ptr,
    bd_ptr,
    gs_ptr,
    row_data_ptr,
    row_scale_ptr,
    col_data_ptr,
    col_scale_ptr,
    M,
    K,
    stride_m,
    K16,
    M16,
    row_key,
    col_key,
    DO_ROW: tl.constexpr,
    DO_COL: tl.constexpr,
    COL_RHT: tl.constexpr,
    INTERPRET: tl.constexpr,
    ROW_SR: tl.constexpr,
    COL_SR: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    m0 = pid_m * BM
    k0 = pid_k * BK
    rows = m0 + tl.arange(0, BM)
    cols = k0 + tl.arange(0, BK)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :], mask=mask, other=0.0)

    if DO_ROW:
        mult6, s_dec = global_scales(tl.load(amax_ptr))
        if (pid_m == 0) & (pid_k == 0):
            tl.store(gs_ptr, s_dec)
        x3 = tl.reshape(x.to(tl.float32), [BM, BK // 16, 16])
        byte, mult = block_scale(tl.max(tl.abs(x3), axis=2), mult6, s_dec)
        v = x3 * mult[:, :, None]
        if ROW_SR:
            idx = rows[:, None].to(tl.uint32) * K16 + cols[None, :].to(tl.uint32)
            r24 = tl.reshape(uniform24(idx, row_key), [BM, BK // 16, 16])
            codes = e2m1_stochastic(v, r24)
        else:
            codes = e2m1_nearest(v)
        packed = pack_pairs(tl.reshape(codes, [BM, BK]), BM, BK)
        bcols = k0 // 2 + tl.arange(0, BK // 2)
        tl.store(
            row_data_ptr + rows[:, None].to(tl.int64) * (K16 // 2) + bcols[None, :],
            packed,
            mask=(rows[:, None] < M) & (bcols[None, :] < K16 // 2),
        )
        scols = k0 // 16 + tl.arange(0, BK // 16)
        tl.store(
            row_scale_ptr + rows[:, None].to(tl.int64) * (K16 // 16) + scols[None, :],
            byte.to(tl.uint8),
            mask=(rows[:, None] < M) & (scols[None, :] < K16 // 16),
        )

    if DO_COL:
        mult6c, s_decc = global_scales(tl.load(amax_ptr + 1))
        if (pid_m == 0) & (pid_k == 0):
            tl.store(gs_ptr + 1, s_decc)
        if COL_RHT:
            y = rht_columns(x, bd_ptr, BM, INTERPRET)
        else:
            y = x.to(tl.float32)
        y3 = tl.reshape(y, [BM // 16, 16, BK])
        cbyte, cmult = block_scale(tl.max(tl.abs(y3), axis=1), mult6c, s_decc)
        w = y3 * cmult[:, None, :]
        if COL_SR:
            cidx = cols[None, :].to(tl.uint32) * M16 + rows[:, None].to(tl.uint32)
            r24c = tl.reshape(uniform24(cidx, col_key), [BM // 16, 16, BK])
            ccodes = e2m1_stochastic(w, r24c)
        else:
            ccodes = e2m1_nearest(w)
        cpacked = pack_pairs(tl.trans(tl.reshape(ccodes, [BM, BK])), BK, BM)
        brows = m0 // 2 + tl.arange(0, BM // 2)
        tl.store(
            col_data_ptr + cols[:, None].to(tl.int64) * (M16 // 2) + brows[None, :],
            cpacked,
            mask=(cols[:, None] < K) & (brows[None, :] < M16 // 2),
        )
        srows = m0 // 16 + tl.arange(0, BM // 16)
        tl.store(
            col_scale_ptr + cols[:, None].to(tl.int64) * (M16 // 16) + srows[None, :],
            tl.trans(cbyte).to(tl.uint8),
            mask=(cols[:, None] < K) & (srows[None, :] < M16 // 16),
        )


def quantize_rowcol_nvfp4(
    x: torch.Tensor,
    row: bool,
    col: bool,
    col_rht_sign: tuple[int, ...] | None,
    row_seed: int | None,
    col_seed: int | None,
) -> tuple[torch.Tensor, ...]:
    """NVFP4 row and column copies of a contiguous 2D ``x`` [M, K] (two launches).

    Args:
        row / col: which copies to produce (the other's outputs are empty tensors).
        col_rht_sign: the RHT sign vector for the column copy, or None for no RHT.
        row_seed / col_seed: stochastic-rounding seeds (``rng.draw_seed``), None = nearest.

    Returns:
        ``(row_data, row_scale, col_data, col_scale, global_scales)``; scales are uint8
        E4M3 bytes, ``global_scales`` is FP32 [2] (row S_dec, column S_dec).
    """
    m, k = x.shape
    k16, m16 = -(-k // 16) * 16, -(-m // 16) * 16
    dev = x.device
    amax = amax_rowcol(x, row, col, col_rht_sign)
    gs = torch.ones(2, dtype=torch.float32, device=dev)

    def buf(rows: int, cols: int, keep: bool) -> torch.Tensor:
        return torch.empty((rows, cols) if keep else 0, dtype=torch.uint8, device=dev)

    row_data, row_scale = buf(m, k16 // 2, row), buf(m, k16 // 16, row)
    col_data, col_scale = buf(k, m16 // 2, col), buf(k, m16 // 16, col)
    bd = rht_blockdiag(col_rht_sign, _BM, x.dtype, dev) if col_rht_sign is not None else gs

    def launch(bk: int, warps: int) -> None:  # rewrites the same outputs each time
        _rowcol_kernel[(triton.cdiv(m16, _BM), triton.cdiv(k16, bk))](
            x, amax, bd, gs, row_data, row_scale, col_data, col_scale,
            m, k, x.stride(0), k16, m16,
            seed_key(row_seed or 0), seed_key(col_seed or 0),
            DO_ROW=row, DO_COL=col, COL_RHT=col_rht_sign is not None, INTERPRET=interpreting(),
            ROW_SR=row_seed is not None, COL_SR=col_seed is not None,
            BM=_BM, BK=bk, num_warps=warps,
        )

    key = ("rowcol", m, k, x.dtype, row, col, col_rht_sign is not None,
           row_seed is not None, col_seed is not None, dev)
    names = [f"BK={bk},warps={w}" for bk, w in _CONFIGS]
    cands = lambda: {n: (lambda c=c: launch(*c)) for n, c in zip(names, _CONFIGS, strict=True)}
    bk, warps = _CONFIGS[names.index(pick(key, cands, dev))]
    launch(bk, warps)
    return row_data, row_scale, col_data, col_scale, gs
