"""NVFP4 weight quantization in 16x16 tiles, writing W and W^T from one read.

One E4M3 scale per 16x16 tile serves every row of the tile in both orientations, so the
codes of ``W^T`` are exactly the transpose of those of ``W`` (forward/backward agree).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_scale, cdiv, e2m1_nearest, global_scales, pack_pairs
from .amax import amax_rowcol

_BN = 64
_BK = 64


@triton.jit
def _quantize_2d_kernel(
    w_ptr,
    amax_ptr,
    gs_ptr,
    data_ptr,
    scale_ptr,
    data_t_ptr,
    scale_t_ptr,
    N,
    K,
    stride_n,
    N16,
    K16,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BN
    k0 = pid_k * BK
    rows = n0 + tl.arange(0, BN)
    cols = k0 + tl.arange(0, BK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_n + cols[None, :], mask=mask, other=0.0)

    mult6, s_dec = global_scales(tl.load(amax_ptr))
    if (pid_n == 0) & (pid_k == 0):
        tl.store(gs_ptr, s_dec)
    w4 = tl.reshape(w.to(tl.float32), [BN // 16, 16, BK // 16, 16])
    tile_amax = tl.max(tl.max(tl.abs(w4), axis=3), axis=1)
    byte, mult = block_scale(tile_amax, mult6, s_dec)
    codes = tl.reshape(e2m1_nearest(w4 * mult[:, None, :, None]), [BN, BK])

    # W along K: [N16, K16 / 2] codes, the tile scale repeated on its 16 rows.
    bcols = k0 // 2 + tl.arange(0, BK // 2)
    tl.store(
        data_ptr + rows[:, None].to(tl.int64) * (K16 // 2) + bcols[None, :],
        pack_pairs(codes, BN, BK),
        mask=(rows[:, None] < N16) & (bcols[None, :] < K16 // 2),
    )
    scols = k0 // 16 + tl.arange(0, BK // 16)
    rep = tl.reshape(tl.broadcast_to(byte[:, None, :], [BN // 16, 16, BK // 16]), [BN, BK // 16])
    tl.store(
        scale_ptr + rows[:, None].to(tl.int64) * (K16 // 16) + scols[None, :],
        rep.to(tl.uint8),
        mask=(rows[:, None] < N16) & (scols[None, :] < K16 // 16),
    )

    # W^T along N: [K16, N16 / 2], from the same tiles.
    brows = n0 // 2 + tl.arange(0, BN // 2)
    tl.store(
        data_t_ptr + cols[:, None].to(tl.int64) * (N16 // 2) + brows[None, :],
        pack_pairs(tl.trans(codes), BK, BN),
        mask=(cols[:, None] < K16) & (brows[None, :] < N16 // 2),
    )
    srows = n0 // 16 + tl.arange(0, BN // 16)
    byte_t = tl.trans(byte)
    rep_t = tl.broadcast_to(byte_t[:, None, :], [BK // 16, 16, BN // 16])
    rep_t = tl.reshape(rep_t, [BK, BN // 16])
    tl.store(
        scale_t_ptr + cols[:, None].to(tl.int64) * (N16 // 16) + srows[None, :],
        rep_t.to(tl.uint8),
        mask=(cols[:, None] < K16) & (srows[None, :] < N16 // 16),
    )


def quantize_2d_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """NVFP4 16x16-tile codes of a contiguous 2D ``w`` [N, K] in both orientations.

    Returns:
        ``(data [N16, K16/2], scale [N16, K16/16], data_t [K16, N16/2],
        scale_t [K16, N16/16], global_scale [1])``, scales as uint8 E4M3 bytes.
    """
    n, k = w.shape
    n16, k16 = -(-n // 16) * 16, -(-k // 16) * 16
    dev = w.device
    amax = amax_rowcol(w, True, False, None)
    gs = torch.empty(1, dtype=torch.float32, device=dev)
    data = torch.empty((n16, k16 // 2), dtype=torch.uint8, device=dev)
    scale = torch.empty((n16, k16 // 16), dtype=torch.uint8, device=dev)
    data_t = torch.empty((k16, n16 // 2), dtype=torch.uint8, device=dev)
    scale_t = torch.empty((k16, n16 // 16), dtype=torch.uint8, device=dev)
    grid = (cdiv(n16, _BN), cdiv(k16, _BK))
    _quantize_2d_kernel[grid](
        w, amax, gs, data, scale, data_t, scale_t, n, k, w.stride(0), n16, k16,
        BN=_BN, BK=_BK, num_warps=8,
    )
    return data, scale, data_t, scale_t, gs
