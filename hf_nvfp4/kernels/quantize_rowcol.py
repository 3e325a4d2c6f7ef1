"""Fused NVFP4 quantization of activations/gradients: x row-wise and x^T (optionally RHT).

One pass over ``x`` [M, K] (after the amax pass of :mod:`.amax`, or with the caller's amax)
writes both copies:

* row copy: ``x`` along K in 1x16 blocks, ``data`` [M, K16/2], ``scale`` [M, K16/16];
* column copy: ``x^T`` along M in 1x16 blocks, after the 16-point RHT of each 16-token
  group when requested, ``data`` [K, M16/2], ``scale`` [K, M16/16] (M16: M padded to 16).

Each copy has its own global scale, and nearest or stochastic rounding. Stochastic draws
hash the element's row-major index in the padded copy with a 32-bit key read from device
memory, as :func:`numerics.rng.counter_uniform` with ``key = fmix32(seed)``. Either copy
can instead be written as BF16 block values (E2M1 value times E4M3 block scale, without the
global scale), the operands of the emulated GEMM.

Layout: a program covers one [BM, BK] tile. The row copy loads it as two [BM, BK/16, 8]
halves (the first and last 8 elements of each 1x16 block), so each thread holds whole
blocks: the block amax, scale and packing into two int32 words per block are in-thread. The
column copy loads the tile again (an L2 hit) as 16 tensors [BM/16, BK], token j of every
16-token block, so each thread holds whole column blocks too: the RHT is an in-register
butterfly (:func:`._common.rht16`), and the block amax, E4M3 scale and reciprocal are
computed once per block, without shuffles. It is written as int32 words (8 codes, or 2 BF16
values).

The RHT output is rounded as the reference rounds it (one rounding of the exact sum). The
BF16 butterfly runs in interval arithmetic and flags each program holding an output whose
bounds round to different BF16 values (an exact sum on or next to a midpoint: rare); a
second launch of the same kernel (``FIX=1``) redoes the column copy of just the
flagged programs with the exact sum (:func:`._common.rht16_exact`), the others return at
once. Keeping the exact path out of the main pass keeps that pass free of register spills.
FP16/FP32 inputs take the exact sum in the one launch (``FIX=2``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import interpreting
from ._common import (
    bf16_exact,
    block_scale,
    cdiv,
    e2m1_decode_scaled,
    e2m1_nearest_word,
    e4m3_decode,
    encode_e2m1,
    encode_e2m1_scaled,
    global_scales,
    join8,
    pack8,
    pack_words,
    rht16,
    rht16_exact,
    sign_mask,
    split8,
)
from ._tuning import pick, shape_bucket
from .amax import amax_rowcol

# (BM, BK, num_warps): BM tokens (the RHT block-diagonal size) x BK features per program
_CONFIGS = ((64, 128, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8))


@triton.jit
def _rowcol_kernel(
    x_ptr,
    amax_ptr,
    keys_ptr,
    gs_ptr,
    row_data_ptr,
    row_scale_ptr,
    col_data_ptr,
    col_scale_ptr,
    flags_ptr,
    M,
    K,
    stride_m,
    M16,
    FIX: tl.constexpr,
    DO_ROW: tl.constexpr,
    DO_COL: tl.constexpr,
    COL_RHT: tl.constexpr,
    RHT_SIGN: tl.constexpr,
    INTERPRET: tl.constexpr,
    ROW_SR: tl.constexpr,
    COL_SR: tl.constexpr,
    ROW_VALUES: tl.constexpr,
    COL_VALUES: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    flag = flags_ptr + pid_m * tl.num_programs(1) + pid_k
    if FIX == 1:  # the fix-up pass: only the programs the main pass flagged
        if tl.load(flag) == 0:
            return
    m0 = pid_m * BM
    k0 = pid_k * BK
    rows = m0 + tl.arange(0, BM)
    cols = k0 + tl.arange(0, BK)
    first = (pid_m == 0) & (pid_k == 0)
    if first and FIX != 1:  # a copy not produced keeps global scale 1
        if not DO_ROW:
            tl.store(gs_ptr, 1.0)
        if not DO_COL:
            tl.store(gs_ptr + 1, 1.0)

    if DO_ROW:
        # Two loads of [BM, BK/16, 8]: the low and high halves of each 16-element block, so
        # a thread holds whole blocks (no shuffles, one block scale per block and thread).
        blk = k0 // 16 + tl.arange(0, BK // 16)
        c3 = blk[None, :, None] * 16 + tl.arange(0, 8)[None, None, :]
        r3 = rows[:, None, None]
        mask3 = (r3 < M) & (c3 < K)
        p = x_ptr + r3.to(tl.int64) * stride_m + c3
        xa = tl.load(p, mask=mask3, other=0.0).to(tl.float32)
        xb = tl.load(p + 8, mask=mask3, other=0.0).to(tl.float32)
        mult6, s_dec = global_scales(tl.load(amax_ptr))
        if first:
            tl.store(gs_ptr, s_dec)
        byte, mult = block_scale(tl.max(tl.maximum(tl.abs(xa), tl.abs(xb)), axis=2), mult6,
                                 s_dec)
        key = tl.load(keys_ptr)
        idx = r3.to(tl.uint32) * K + c3.to(tl.uint32)
        wa = xa * mult[:, :, None]
        wb = xb * mult[:, :, None]
        bmask = (rows[:, None] < M) & (blk[None, :] < K // 16)
        if ROW_VALUES:
            s3 = e4m3_decode(byte)[:, :, None]
            q = row_data_ptr + r3.to(tl.int64) * K + c3
            tl.store(q, bf16_exact(encode_e2m1_scaled(wa, idx, key, s3, ROW_SR)), mask=mask3)
            tl.store(q + 8, bf16_exact(encode_e2m1_scaled(wb, idx + 8, key, s3, ROW_SR)),
                     mask=mask3)
        else:  # row_data_ptr: int32 words, two per block
            if ROW_SR:
                words = tl.join(pack_words(encode_e2m1(wa, idx, key, ROW_SR), BM, BK // 16),
                                pack_words(encode_e2m1(wb, idx + 8, key, ROW_SR), BM, BK // 16))
            else:  # the encode and packing fused
                words = tl.join(e2m1_nearest_word(split8(wa, BM, BK // 16), 0),
                                e2m1_nearest_word(split8(wb, BM, BK // 16), 0))
            w3 = blk[None, :, None] * 2 + tl.arange(0, 2)[None, None, :]
            tl.store(row_data_ptr + r3.to(tl.int64) * (K // 8) + w3, words, mask=bmask[:, :, None])
            tl.store(row_scale_ptr + rows[:, None].to(tl.int64) * (K // 16) + blk[None, :],
                     byte.to(tl.uint8), mask=bmask)

    if DO_COL:
        # 16 loads of [BM/16, BK]: token j of every 16-token block, so a thread holds whole
        # column blocks (rows past M are the zero padding to M16)
        brow = m0 + 16 * tl.arange(0, BM // 16)
        kin = cols[None, :] < K
        p = x_ptr + brow[:, None].to(tl.int64) * stride_m + cols[None, :]
        mult6c, s_decc = global_scales(tl.load(amax_ptr + 1))
        if first:
            tl.store(gs_ptr + 1, s_decc)
        if COL_RHT and FIX != 0:  # the exact sum (reloading the tokens)
            y = rht16_exact(p, stride_m, M - brow[:, None], kin, RHT_SIGN, INTERPRET)
        else:
            v = ()
            for j in tl.static_range(16):
                v = v + (tl.load(p + j * stride_m, mask=kin & (brow[:, None] + j < M),
                                 other=0.0),)
        if COL_RHT and FIX == 0:
            y, redo = rht16(v, RHT_SIGN, INTERPRET)
            tl.store(flag, redo)
        elif not COL_RHT:
            y = ()
            for j in tl.static_range(16):
                y = y + (v[j].to(tl.float32),)
        bamax = tl.abs(y[0])
        for j in tl.static_range(1, 16):
            bamax = tl.maximum(bamax, tl.abs(y[j]))
        cbyte, cmult = block_scale(bamax, mult6c, s_decc)
        ckey = tl.load(keys_ptr + 1)
        cidx = cols[None, :].to(tl.uint32) * M16 + brow[:, None].to(tl.uint32)
        w = ()
        for j in tl.static_range(16):
            w = w + (y[j] * cmult,)
        bmask = kin & (brow[:, None] < M16)
        if not (COL_SR or COL_VALUES):  # the encode and packing fused
            w3 = brow[:, None, None] // 8 + tl.arange(0, 2)[None, None, :]
            tl.store(col_data_ptr + cols[None, :, None].to(tl.int64) * (M16 // 8) + w3,
                     tl.join(e2m1_nearest_word(w, 0), e2m1_nearest_word(w, 8)),
                     mask=bmask[:, :, None])
        else:
            codes = ()
            for j in tl.static_range(16):
                codes = codes + (encode_e2m1(w[j], cidx + j, ckey, COL_SR),)
        if COL_VALUES:  # col_data_ptr: int32 words of BF16 pairs
            s = e4m3_decode(cbyte)
            words = ()
            for j in tl.static_range(0, 16, 2):
                lo = e2m1_decode_scaled(codes[j], s).to(tl.int32, bitcast=True)
                hi = e2m1_decode_scaled(codes[j + 1], s).to(tl.int32, bitcast=True)
                words = words + (((lo >> 16) & 0xFFFF) | (hi & -65536),)
            w3 = brow[:, None, None] // 2 + tl.arange(0, 8)[None, None, :]
            tl.store(col_data_ptr + cols[None, :, None].to(tl.int64) * (M16 // 2) + w3,
                     join8(words, BM // 16, BK), mask=bmask[:, :, None])
        else:  # col_data_ptr: int32 words, two per block
            if COL_SR:
                w3 = brow[:, None, None] // 8 + tl.arange(0, 2)[None, None, :]
                tl.store(col_data_ptr + cols[None, :, None].to(tl.int64) * (M16 // 8) + w3,
                         tl.join(pack8(codes, 0), pack8(codes, 8)), mask=bmask[:, :, None])
            tl.store(col_scale_ptr + cols[None, :].to(tl.int64) * (M16 // 16) + brow[:, None] // 16,
                     cbyte.to(tl.uint8), mask=bmask)


def quantize_rowcol_nvfp4(
    x: torch.Tensor,
    row: bool,
    col: bool,
    col_rht_sign: tuple[int, ...] | None,
    row_sr: bool,
    col_sr: bool,
    keys: torch.Tensor | None,
    *,
    amax: torch.Tensor | None = None,
    row_values: bool = False,
    col_values: bool = False,
) -> tuple[torch.Tensor, ...]:
    """NVFP4 row and column copies of a contiguous 2D ``x`` [M, K] (bf16, fp16 or fp32).

    Args:
        row / col: which copies to produce (the other's outputs are empty tensors).
        col_rht_sign: the RHT sign vector for the column copy, or None for no RHT.
        row_sr / col_sr: stochastic rounding of the row / column copy (else nearest).
        keys: int32 [2] on x's device, the SR keys of the row and column copies
            (``_common.seed_key(seed)`` reproduces ``counter_uniform(seed, ...)``); None when
            neither copy is stochastic.
        amax: FP32 [2] ``[max|x|, max|RHT(x^T)|]`` to use (e.g. all-reduced across ranks),
            as :func:`.amax.amax_rowcol` computes; None computes it here (one more pass).
        row_values / col_values: write that copy as BF16 block values (E2M1 value x E4M3
            scale, no global scale) at its padded shape, [M, K16] / [K, M16], instead of
            packed codes; its scale output is then empty.

    Returns:
        ``(row_data, row_scale, col_data, col_scale, global_scales)``; scales are uint8
        E4M3 bytes, ``global_scales`` is FP32 [2] (row S_dec, column S_dec; 1 for a copy
        not produced).
    """
    if (row and row_sr) or (col and col_sr):
        if keys is None or keys.numel() < 2 or keys.dtype != torch.int32:
            raise ValueError("stochastic rounding needs keys: an int32 tensor [2] on x's device")
    m, k = x.shape
    k16, m16 = -(-k // 16) * 16, -(-m // 16) * 16
    dev = x.device
    if amax is None:
        amax = amax_rowcol(x, row, col, col_rht_sign)
    amax = amax.to(device=dev, dtype=torch.float32).contiguous()
    if k != k16:  # the zero padding of the row blocks, as the reference pads
        out = quantize_rowcol_nvfp4(
            F.pad(x, (0, k16 - k)), row, col, col_rht_sign, row_sr, col_sr, keys,
            amax=amax, row_values=row_values, col_values=col_values,
        )
        return out[0], out[1], out[2][:k], out[3][:k], out[4]
    x = x.contiguous()
    gs = torch.empty(2, dtype=torch.float32, device=dev)

    def copy(rows: int, cols: int, keep: bool, values: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not keep:
            return torch.empty(0, dtype=torch.uint8, device=dev), torch.empty(
                0, dtype=torch.uint8, device=dev)
        if values:
            return torch.empty((rows, cols), dtype=torch.bfloat16, device=dev), torch.empty(
                0, dtype=torch.uint8, device=dev)
        return (torch.empty((rows, cols // 2), dtype=torch.uint8, device=dev),
                torch.empty((rows, cols // 16), dtype=torch.uint8, device=dev))

    row_data, row_scale = copy(m, k16, row, row_values)
    col_data, col_scale = copy(k, m16, col, col_values)
    if keys is None:  # never read: any int32 [2] on the device will do
        keys = amax.view(torch.int32)

    row_out = row_data.view(torch.int32) if row and not row_values else row_data
    col_out = col_data.view(torch.int32) if col else col_data  # words: codes or BF16 pairs

    col_rht = col and col_rht_sign is not None
    # FIX: see the module docstring; a BF16 RHT column copy takes a second, fix-up launch
    fix = 0 if not col_rht or x.dtype == torch.bfloat16 else 2

    def launch(bm: int, bk: int, warps: int) -> None:  # idempotent
        grid = (cdiv(m16, bm), cdiv(k16, bk))
        flags = torch.empty(grid[0] * grid[1] if col_rht else 0, dtype=torch.int32, device=dev)
        passes = ((fix, row), (1, False)) if col_rht and fix == 0 else ((fix, row),)
        for fix_pass, do_row in passes:
            _rowcol_kernel[grid](
                x, amax, keys, gs, row_out, row_scale, col_out, col_scale, flags,
                m, k, x.stride(0), m16, FIX=fix_pass,
                DO_ROW=do_row, DO_COL=col, COL_RHT=col_rht_sign is not None,
                RHT_SIGN=sign_mask(col_rht_sign) if col_rht_sign is not None else 0,
                INTERPRET=interpreting(),
                ROW_SR=do_row and row_sr, COL_SR=col and col_sr,
                ROW_VALUES=do_row and row_values, COL_VALUES=col_values,
                BM=bm, BK=bk, num_warps=warps,
            )

    if not (row or col):
        return row_data, row_scale, col_data, col_scale, gs.fill_(1.0)
    key = ("rowcol2", shape_bucket(m), shape_bucket(k), x.dtype, row, col, col_rht_sign is not None,
           row and row_sr, col and col_sr, row_values, col_values, dev)
    names = [f"BM={bm},BK={bk},warps={w}" for bm, bk, w in _CONFIGS]
    cands = lambda: {n: (lambda c=c: launch(*c)) for n, c in zip(names, _CONFIGS, strict=True)}
    launch(*_CONFIGS[names.index(pick(key, cands, dev))])
    return row_data, row_scale, col_data, col_scale, gs
