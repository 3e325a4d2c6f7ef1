"""Fused MXFP4 quantization of activations/gradients: x row-wise and x^T (optionally RHT).

MXFP4: E2M1 elements in blocks of 32 with one UE8M0 (power-of-two) scale per block and no
global scale, bit for bit ``numerics.quantize(x, "mxfp4")``. One pass over ``x`` [M, K]
writes both copies (no amax pass: a block's scale depends on the block alone):

* row copy: ``x`` along K in 1x32 blocks, ``data`` [M, K32/2], ``scale`` [M, K32/32];
* column copy: ``x^T`` along M in 1x32 blocks, after the 16-point RHT of each 16-token group
  when requested, ``data`` [K, M32/2], ``scale`` [K, M32/32] (K32, M32: padded to 32 with
  zeros, as the reference pads before its RHT).

Each copy rounds to nearest or stochastically; stochastic draws hash the element's row-major
index in the padded copy with a 32-bit key read from device memory, the scheme of the NVFP4
kernel (:func:`._common.sr_offsets`, :func:`numerics.rng.keyed_uniform`).

Layout, as :mod:`.quantize_rowcol` (which has NVFP4's global scale, block values and a
16-token block baked into its tuned loads; the 32x32 weight tiles share the NVFP4 tile
kernel, :func:`.quantize_2d.quantize_2d_mxfp4`): a program covers one [BM, BK] tile. The
row copy loads it as four [BM, BK/32, 8] quarters of the 1x32 blocks, so each thread holds
whole blocks: amax, scale and packing into four int32 words per block are in-thread. The
column copy loads it again (an L2 hit) as 32 tensors [BM/32, BK], token j of every 32-token
block, so a thread holds whole column blocks: the RHT is two in-register butterflies
(:func:`._common.rht16`) per block. The RHT output is rounded as the reference rounds it, as
in :mod:`.quantize_rowcol`: the BF16 interval butterfly flags the programs holding an output
whose bounds round apart, and a fix-up launch (``FIX=1``, on tiles 32 columns wide: the
exact path's 32 outputs per block fit the registers) redoes their column copies with the
exact sum; FP16/FP32 inputs take the exact sum in the one launch (``FIX=2``).

Scales (:func:`._common.ue8m0_scale`): ``k = ceil(log2(amax / 6))`` clamped to [-127, 127],
byte ``k + 127``; the element is ``e2m1(clamp(x * 2^-k, -6, 6))``. Block amaxes propagate
NaN (torch's amax): a block with a NaN gets the NaN byte 0xFF, and the codes of its NaN
elements are unspecified (the reference writes code 0, the kernel saturates them to 6), as
the NaN scale decodes the whole block to NaN either way. An Inf makes its block's ``k`` -2
and saturates, as the reference's ``frexp`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import (
    abs_max,
    cdiv,
    e2m1_nearest_word,
    encode_e2m1,
    pack8,
    pack_words,
    rht16,
    rht16_exact,
    sign_mask,
    split8,
    ue8m0_scale,
)
from ._tuning import pick, shape_bucket

BLOCK = 32
# (BM, BK, num_warps): BM tokens (a multiple of the 32-token column block) x BK features
# ((128, 64, 8) left out: its SR variant keeps a register on the stack under Triton 3.6)
_CONFIGS = ((64, 128, 4), (64, 64, 4), (128, 128, 8))


@triton.jit
def _join4(w, R: tl.constexpr, C: tl.constexpr):
    """The 4 tensors [R, C] of the tuple ``w`` as one [R, C, 4], ``w[j]`` at index j."""
    return tl.reshape(tl.join(tl.join(w[0], w[2]), tl.join(w[1], w[3])), [R, C, 4])


@triton.jit
def _mx_rowcol_kernel(
    x_ptr,
    keys_ptr,
    row_data_ptr,
    row_scale_ptr,
    col_data_ptr,
    col_scale_ptr,
    flags_ptr,
    NKF,
    M,
    K,
    stride_m,
    M32,
    K32,
    FIX: tl.constexpr,
    FLAG_BK: tl.constexpr,
    DO_ROW: tl.constexpr,
    DO_COL: tl.constexpr,
    COL_RHT: tl.constexpr,
    RHT_SIGN: tl.constexpr,
    INTERPRET: tl.constexpr,
    ROW_SR: tl.constexpr,
    COL_SR: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    # the main pass's program (NKF programs along K, FLAG_BK columns each) holding this tile
    flag = flags_ptr + pid_m * NKF + (pid_k * BK) // FLAG_BK
    if FIX == 1:  # the fix-up pass: only the programs the main pass flagged
        if tl.load(flag) == 0:
            return
    m0 = pid_m * BM
    k0 = pid_k * BK
    rows = m0 + tl.arange(0, BM)
    cols = k0 + tl.arange(0, BK)

    if DO_ROW:
        # Four loads of [BM, BK/32, 8]: the quarters of each 32-element block.
        blk = k0 // 32 + tl.arange(0, BK // 32)
        c3 = blk[None, :, None] * 32 + tl.arange(0, 8)[None, None, :]
        r3 = rows[:, None, None]
        p = x_ptr + r3.to(tl.int64) * stride_m + c3
        xs = ()
        for q in tl.static_range(4):
            xs = xs + (tl.load(p + 8 * q, mask=(r3 < M) & (c3 + 8 * q < K), other=0.0)
                       .to(tl.float32),)
        a = tl.maximum(tl.maximum(tl.abs(xs[0]), tl.abs(xs[1]), propagate_nan=tl.PropagateNan.ALL),
                       tl.maximum(tl.abs(xs[2]), tl.abs(xs[3]), propagate_nan=tl.PropagateNan.ALL),
                       propagate_nan=tl.PropagateNan.ALL)
        byte, mult = ue8m0_scale(abs_max(a, 2, INTERPRET))
        key = tl.load(keys_ptr)
        idx = r3.to(tl.uint32) * K32 + c3.to(tl.uint32)
        words = ()
        for q in tl.static_range(4):
            v = xs[q] * mult[:, :, None]
            if ROW_SR:
                words = words + (pack_words(encode_e2m1(v, idx + 8 * q, key, ROW_SR), BM,
                                            BK // 32),)
            else:  # the encode and packing fused
                words = words + (e2m1_nearest_word(split8(v, BM, BK // 32), 0),)
        bmask = (rows[:, None] < M) & (blk[None, :] < K32 // 32)
        w3 = blk[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
        tl.store(row_data_ptr + r3.to(tl.int64) * (K32 // 8) + w3, _join4(words, BM, BK // 32),
                 mask=bmask[:, :, None])
        tl.store(row_scale_ptr + rows[:, None].to(tl.int64) * (K32 // 32) + blk[None, :],
                 byte.to(tl.uint8), mask=bmask)

    if DO_COL:
        # 32 loads of [BM/32, BK]: token j of every 32-token block (rows past M are the zero
        # padding to M32), the RHT on each 16-token half.
        brow = m0 + 32 * tl.arange(0, BM // 32)
        kin = cols[None, :] < K
        p = x_ptr + brow[:, None].to(tl.int64) * stride_m + cols[None, :]
        y = ()
        redo = 0
        for h in tl.static_range(2):
            if COL_RHT and FIX != 0:  # the exact sum (reloading the tokens)
                y = y + rht16_exact(p + 16 * h * stride_m, stride_m, M - brow[:, None] - 16 * h,
                                    kin, RHT_SIGN, INTERPRET)
            else:
                v = ()
                for j in tl.static_range(16 * h, 16 * h + 16):
                    v = v + (tl.load(p + j * stride_m, mask=kin & (brow[:, None] + j < M),
                                     other=0.0),)
            if COL_RHT and FIX == 0:
                yh, rh = rht16(v, RHT_SIGN, INTERPRET)
                y = y + yh
                redo = redo | rh
            elif not COL_RHT:
                for j in tl.static_range(16):
                    y = y + (v[j].to(tl.float32),)
        if COL_RHT and FIX == 0:
            tl.store(flag, redo)
        bamax = tl.abs(y[0])
        for j in tl.static_range(1, 32):
            bamax = tl.maximum(bamax, tl.abs(y[j]), propagate_nan=tl.PropagateNan.ALL)
        cbyte, cmult = ue8m0_scale(bamax)
        ckey = tl.load(keys_ptr + 1)
        cidx = cols[None, :].to(tl.uint32) * M32 + brow[:, None].to(tl.uint32)
        w = ()
        for j in tl.static_range(32):
            w = w + (y[j] * cmult,)
        words = ()
        for q in tl.static_range(4):
            if COL_SR:
                codes = ()
                for j in tl.static_range(8 * q, 8 * q + 8):
                    codes = codes + (encode_e2m1(w[j], cidx + j, ckey, COL_SR),)
                words = words + (pack8(codes, 0),)
            else:  # the encode and packing fused
                words = words + (e2m1_nearest_word(w, 8 * q),)
        bmask = kin & (brow[:, None] < M32)
        w3 = brow[:, None, None] // 8 + tl.arange(0, 4)[None, None, :]
        tl.store(col_data_ptr + cols[None, :, None].to(tl.int64) * (M32 // 8) + w3,
                 _join4(words, BM // 32, BK), mask=bmask[:, :, None])
        tl.store(col_scale_ptr + cols[None, :].to(tl.int64) * (M32 // 32) + brow[:, None] // 32,
                 cbyte.to(tl.uint8), mask=bmask)


def _pad(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def quantize_rowcol_mxfp4(
    x: torch.Tensor,
    row: bool,
    col: bool,
    col_rht_sign: tuple[int, ...] | None,
    row_sr: bool,
    col_sr: bool,
    keys: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """MXFP4 row and column copies of a 2D ``x`` [M, K] (bf16, fp16 or fp32; rows may be
    strided, elements contiguous).

    Args:
        row / col: which copies to produce (the other's outputs are empty tensors).
        col_rht_sign: the RHT sign vector for the column copy, or None for no RHT.
        row_sr / col_sr: stochastic rounding of the row / column copy (else nearest).
        keys: int32 [2] on x's device, the SR keys of the row and column copies
            (``_common.seed_key(seed)`` reproduces ``counter_uniform(seed, ...)``); None when
            neither copy is stochastic.

    Returns:
        ``(row_data [M, K32/2], row_scale [M, K32/32], col_data [K, M32/2],
        col_scale [K, M32/32])``, uint8 packed codes and UE8M0 bytes: the QTensor fields of
        ``quantize(x, "mxfp4")`` and of ``quantize(x.t(), "mxfp4", rht=...)``.
    """
    if (row and row_sr) or (col and col_sr):
        if keys is None or keys.numel() < 2 or keys.dtype != torch.int32:
            raise ValueError("stochastic rounding needs keys: an int32 tensor [2] on x's device")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    k32, m32 = _pad(k), _pad(m)
    dev = x.device

    def copy(rows: int, cols: int, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not keep:
            return (torch.empty(0, dtype=torch.uint8, device=dev),
                    torch.empty(0, dtype=torch.uint8, device=dev))
        return (torch.empty((rows, cols // 2), dtype=torch.uint8, device=dev),
                torch.empty((rows, cols // BLOCK), dtype=torch.uint8, device=dev))

    row_data, row_scale = copy(m, k32, row)
    col_data, col_scale = copy(k, m32, col)
    if not (row or col) or m == 0 or k == 0:
        return row_data, row_scale, col_data, col_scale
    row_out, col_out = row_data.view(torch.int32), col_data.view(torch.int32)
    if keys is None:  # never read: any int32 tensor on the device will do
        keys = row_out if row else col_out

    col_rht = col and col_rht_sign is not None
    fix = 0 if not col_rht or x.dtype == torch.bfloat16 else 2  # see the module docstring

    def launch(bm: int, bk: int, warps: int) -> None:  # idempotent
        grid = (cdiv(m32, bm), cdiv(k32, bk))
        flags = torch.empty(grid[0] * grid[1] if col_rht else 0, dtype=torch.int32, device=dev)
        # The exact path holds a block's 32 outputs: it runs on tiles 32 columns wide (the
        # fix-up pass reads the flag of the main-pass program that holds its tile), one
        # element of each output per thread.
        passes = ((fix, row, bk, warps), (1, False, 32, bm // 32)) if col_rht and fix == 0 else \
            ((fix, row, bk, warps),)
        for fix_pass, do_row, pass_bk, pass_warps in passes:
            _mx_rowcol_kernel[(grid[0], cdiv(k32, pass_bk))](
                x, keys, row_out, row_scale, col_out, col_scale, flags, grid[1], m, k,
                x.stride(0), m32, k32, FIX=fix_pass, FLAG_BK=bk, DO_ROW=do_row, DO_COL=col,
                COL_RHT=col_rht_sign is not None,
                RHT_SIGN=sign_mask(col_rht_sign) if col_rht_sign is not None else 0,
                INTERPRET=interpreting(), ROW_SR=do_row and row_sr, COL_SR=col and col_sr,
                BM=bm, BK=pass_bk, num_warps=pass_warps,
            )

    key = ("mxrowcol", shape_bucket(m), shape_bucket(k), x.dtype, row, col,
           col_rht_sign is not None, row and row_sr, col and col_sr, dev)
    names = [f"BM={bm},BK={bk},warps={w}" for bm, bk, w in _CONFIGS]
    cands = lambda: {n: (lambda c=c: launch(*c)) for n, c in zip(names, _CONFIGS, strict=True)}
    launch(*_CONFIGS[names.index(pick(key, cands, dev))])
    return row_data, row_scale, col_data, col_scale
