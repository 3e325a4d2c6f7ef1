"""Weight quantization in square tiles, writing W and W^T from one read.

One block scale per tile serves every row of the tile in both orientations, so the codes of
``W^T`` are exactly the transpose of those of ``W`` (forward/backward agree). The format is
a constexpr of one kernel: NVFP4 (16x16 tiles, E4M3 scales under an FP32 global scale) or
MXFP4 (32x32 tiles, UE8M0 scales, no global scale).

For training, the NVFP4 kernel can write W (the forward's copy, which its GEMM reads at once)
as BF16 block values instead of codes and scales: the GEMM then reads it without a dequantize
launch, while W^T, saved for the backward, stays packed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import (
    abs_max,
    bf16_exact,
    block_scale,
    cdiv,
    e2m1_decode_scaled,
    e2m1_nearest,
    e4m3_decode,
    global_scales,
    pack_pairs,
    ue8m0_scale,
)
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
    TILE: tl.constexpr,
    MX: tl.constexpr,
    VALUES: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # N16 / K16: N and K padded to TILE; VALUES (NVFP4 only): W as BF16 block values [N, K16]
    # at data_ptr, no scales
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BN
    k0 = pid_k * BK
    rows = n0 + tl.arange(0, BN)
    cols = k0 + tl.arange(0, BK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_n + cols[None, :], mask=mask, other=0.0)

    w4 = tl.reshape(w.to(tl.float32), [BN // TILE, TILE, BK // TILE, TILE])
    if MX:  # UE8M0: a NaN in the tile gives the NaN scale byte, so its amax keeps NaN
        byte, mult = ue8m0_scale(abs_max(abs_max(w4, 3, INTERPRET), 1, INTERPRET))
    else:
        mult6, s_dec = global_scales(tl.load(amax_ptr))
        if (pid_n == 0) & (pid_k == 0):
            tl.store(gs_ptr, s_dec)
        tile_amax = tl.max(tl.max(tl.abs(w4), axis=3), axis=1)
        byte, mult = block_scale(tile_amax, mult6, s_dec)
    codes4 = e2m1_nearest(w4 * mult[:, None, :, None])
    codes = tl.reshape(codes4, [BN, BK])

    if VALUES:  # W along K: [N, K16] BF16 block values (padding columns are zero codes)
        vals = e2m1_decode_scaled(codes4, e4m3_decode(byte)[:, None, :, None])
        tl.store(
            data_ptr + rows[:, None].to(tl.int64) * K16 + cols[None, :],
            bf16_exact(tl.reshape(vals, [BN, BK])),
            mask=(rows[:, None] < N) & (cols[None, :] < K16),
        )
    else:  # W along K: [N16, K16 / 2] codes, the tile scale repeated on its TILE rows.
        bcols = k0 // 2 + tl.arange(0, BK // 2)
        tl.store(
            data_ptr + rows[:, None].to(tl.int64) * (K16 // 2) + bcols[None, :],
            pack_pairs(codes, BN, BK),
            mask=(rows[:, None] < N16) & (bcols[None, :] < K16 // 2),
        )
        scols = k0 // TILE + tl.arange(0, BK // TILE)
        rep = tl.reshape(tl.broadcast_to(byte[:, None, :], [BN // TILE, TILE, BK // TILE]),
                         [BN, BK // TILE])
        tl.store(
            scale_ptr + rows[:, None].to(tl.int64) * (K16 // TILE) + scols[None, :],
            rep.to(tl.uint8),
            mask=(rows[:, None] < N16) & (scols[None, :] < K16 // TILE),
        )

    # W^T along N: [K16, N16 / 2], from the same tiles.
    brows = n0 // 2 + tl.arange(0, BN // 2)
    tl.store(
        data_t_ptr + cols[:, None].to(tl.int64) * (N16 // 2) + brows[None, :],
        pack_pairs(tl.trans(codes), BK, BN),
        mask=(cols[:, None] < K16) & (brows[None, :] < N16 // 2),
    )
    srows = n0 // TILE + tl.arange(0, BN // TILE)
    byte_t = tl.trans(byte)
    rep_t = tl.broadcast_to(byte_t[:, None, :], [BK // TILE, TILE, BN // TILE])
    rep_t = tl.reshape(rep_t, [BK, BN // TILE])
    tl.store(
        scale_t_ptr + cols[:, None].to(tl.int64) * (N16 // TILE) + srows[None, :],
        rep_t.to(tl.uint8),
        mask=(cols[:, None] < K16) & (srows[None, :] < N16 // TILE),
    )


def _quantize_2d(w: torch.Tensor, tile: int, mx: bool, amax: torch.Tensor | None = None,
                 values: bool = False) -> tuple[torch.Tensor, ...]:
    """Launch the tile kernel on a contiguous 2D ``w``; see the two wrappers below."""
    n, k = w.shape
    np_, kp = -(-n // tile) * tile, -(-k // tile) * tile
    dev = w.device
    gs = torch.empty(1, dtype=torch.float32, device=dev)
    if mx:
        amax = gs  # MXFP4 reads neither
    elif amax is None:
        amax = amax_rowcol(w, True, False, None)
    if values:
        data = torch.empty((n, kp), dtype=torch.bfloat16, device=dev)
        scale = torch.empty(0, dtype=torch.uint8, device=dev)
    else:
        data = torch.empty((np_, kp // 2), dtype=torch.uint8, device=dev)
        scale = torch.empty((np_, kp // tile), dtype=torch.uint8, device=dev)
    data_t = torch.empty((kp, np_ // 2), dtype=torch.uint8, device=dev)
    scale_t = torch.empty((kp, np_ // tile), dtype=torch.uint8, device=dev)
    grid = (cdiv(np_, _BN), cdiv(kp, _BK))
    _quantize_2d_kernel[grid](
        w, amax, gs, data, scale, data_t, scale_t, n, k, w.stride(0), np_, kp,
        BN=_BN, BK=_BK, TILE=tile, MX=mx, VALUES=values, INTERPRET=interpreting(), num_warps=8,
    )
    return data, scale, data_t, scale_t, gs


def quantize_2d_nvfp4(w: torch.Tensor, amax: torch.Tensor | None = None,
                      values: bool = False) -> tuple[torch.Tensor, ...]:
    """NVFP4 16x16-tile codes of a contiguous 2D ``w`` [N, K] in both orientations.

    ``amax``: the FP32 global amax (first element read) to encode with instead of ``w``'s
    own, e.g. that of the whole weight when ``w`` is a shard of it. ``values``: write W as
    BF16 block values (E2M1 value x E4M3 scale, without the global scale) instead of codes
    and scales; W^T stays packed.

    Returns:
        ``(data [N16, K16/2], scale [N16, K16/16], data_t [K16, N16/2],
        scale_t [K16, N16/16], global_scale [1])``, scales as uint8 E4M3 bytes; with
        ``values``, ``data`` is BF16 [N, K16] and ``scale`` is empty.
    """
    return _quantize_2d(w, 16, False, amax, values)


def quantize_2d_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """MXFP4 32x32-tile codes of a contiguous 2D ``w`` [N, K] in both orientations: the
    QTensor fields of ``quantize(w, "mxfp4", tile=(32, 32))`` and of the same for ``w.t()``.

    A tile containing NaN gets the NaN scale byte 0xFF; the codes of its NaN elements are
    unspecified (the reference writes 0, the kernel saturates them), since the NaN scale
    decodes the whole tile to NaN either way.

    Returns:
        ``(data [N32, K32/2], scale [N32, K32/32], data_t [K32, N32/2],
        scale_t [K32, N32/32])``, scales as uint8 UE8M0 bytes (a tile's byte on each of its
        rows).
    """
    return _quantize_2d(w, 32, True)[:4]
