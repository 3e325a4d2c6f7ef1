"""Grouped NVFP4 kernels for MoE experts: every expert's quantization or GEMM together.

Each expert ``g`` is an independent quantized linear with its own tensor scales, so these
kernels give, bit for bit, what the per-tensor kernels give on each expert's tensors alone.

Token layout (:class:`GroupLayout`): ``x`` [S, K] holds the rows sorted by expert, expert
``g``'s ``count[g]`` rows from row ``start[g]``. Each expert's rows are split into blocks of
16 (the last one padded with zeros, as the per-expert column copy pads M to ``M16``), and a
program covers ``BB`` consecutive blocks of all experts together; a block finds its expert
by comparing its index with the experts' cumulative block counts (the device ``meta``).

* Row copies (``x`` along K) are written as BF16 block values at ``x``'s rows, [S, K].
* Column copies (``x^T`` along tokens, optionally after the RHT) of expert ``g`` are one
  contiguous [K, M16_g] matrix at element ``K * off16[g]`` of a flat buffer, where
  ``off16[g]`` is the sum of the previous experts' ``M16``: packed codes and E4M3 bytes, or
  BF16 block values.
* Stochastic rounding hashes each element's index *within its expert's copy* (row copy
  ``r * K + c``, column copy ``c * M16_g + r``, ``r`` the row within the expert) with the
  expert's key ``keys[g, 0]`` (row) / ``keys[g, 1]`` (column), as the per-expert kernel.

Weights [G, N, K] (any strides) are quantized in 16x16 tiles with one global scale per
expert: fprop block values [G, N, K] and the packed transpose [G, K, N/2] for dgrad.

:func:`grouped_gemm` runs every expert's ``A_g @ B_g^T`` in one launch with FP32
accumulation and the two global decode scales (from the amaxes) applied to the FP32 result
before the single rounding, as :func:`.gemm.gemm_scaled`: equal to the per-expert GEMMs up
to the FP32 summation order.

The RHT column copies and maxima follow the dense kernels' exactness scheme: a fast path in
the main launch and, for BF16, a second launch that redoes exactly only what the main one
could not decide (the programs the interval butterfly flagged; the blocks whose maximum may be
an expert's). FP16 inputs take the exact sum in the main launch, for every program.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import (
    bf16_exact,
    block_scale,
    cdiv,
    e2m1_decode_scaled,
    e2m1_nearest,
    e4m3_decode,
    encode_e2m1,
    encode_e2m1_scaled,
    global_scales,
    join8,
    pack8,
    pack_pairs,
    rht16,
    rht16_exact,
    rht16_fp32,
    round_bf16,
    sign_mask,
)

_BB = 4  # 16-token blocks per program of the token kernels
_BK = 64  # features per program of the token kernels
# the amax fix-up launch's warps (its exact path, as the dense pass's: .amax._FIX_WARPS)
_FIX_WARPS = 8
_GEMM_BM, _GEMM_BN, _GEMM_BK = 128, 128, 64
_BIG = 2**31 - 1
# meta rows (int32 [5, GP]): first row of the expert, its rows, cumulative 16-row blocks
# (inclusive), cumulative GEMM row tiles (inclusive), padded rows before it (off16)
_START, _COUNT, _BLOCK_END, _TILE_END, _OFF16 = range(5)


@dataclass(frozen=True)
class GroupLayout:
    """Where each expert's rows are, on the host and (``meta``) on the device.

    Attributes:
        counts: rows per expert.
        starts: first row of each expert in the token matrix.
        off16: each expert's first row in the padded (16-row-aligned) token order.
        blocks: total 16-row blocks (``sum(ceil(count / 16))``).
        rows16: total padded rows (``16 * blocks``).
        meta: int32 [5, GP] on the device (GP: the experts padded to a power of two).
    """

    counts: tuple[int, ...]
    starts: tuple[int, ...]
    off16: tuple[int, ...]
    blocks: int
    rows16: int
    meta: torch.Tensor

    @property
    def gp(self) -> int:
        """The padded number of experts (the width of ``meta``)."""
        return self.meta.shape[1]

    @staticmethod
    def build(counts: list[int] | tuple[int, ...], device: torch.device) -> GroupLayout:
        """The layout of ``counts`` rows per expert (one host-to-device copy)."""
        g = len(counts)
        gp = max(16, triton.next_power_of_2(g))
        starts, off16, ends, tiles = [], [], [], []
        row = pad = blk = tile = 0
        for n in counts:
            starts.append(row)
            off16.append(pad)
            row += n
            pad += -(-n // 16) * 16
            blk += -(-n // 16)
            tile += -(-n // _GEMM_BM)
            ends.append(blk)
            tiles.append(tile)
        fill = [0] * (gp - g)
        big = [_BIG] * (gp - g)
        host = torch.tensor([starts + fill, list(counts) + fill, ends + big, tiles + big,
                             off16 + fill], dtype=torch.int32)
        meta = host.to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
        return GroupLayout(tuple(counts), tuple(starts), tuple(off16), blk, pad, meta)


@triton.jit
def _find(ends_ptr, idx, G, GP: tl.constexpr):
    """The expert of each global index ``idx`` from the experts' inclusive cumulative ends."""
    g = tl.arange(0, GP)
    ends = tl.load(ends_ptr + g, mask=g < G, other=2147483647)
    e = tl.sum((ends[None, :] <= idx[:, None]).to(tl.int32), axis=1)
    return tl.minimum(e, G - 1)


@triton.jit
def _blocks(meta_ptr, pid, NB, G, GP: tl.constexpr, BB: tl.constexpr):
    """Per block of program ``pid``: (valid, expert, first source row, first row within the
    expert, expert rows, expert M16, expert off16)."""
    blk = pid * BB + tl.arange(0, BB)
    valid = blk < NB
    e = _find(meta_ptr + 2 * GP, blk, G, GP)
    start = tl.load(meta_ptr + e)
    count = tl.load(meta_ptr + GP + e)
    m16 = (count + 15) // 16 * 16
    local = 16 * (blk - (tl.load(meta_ptr + 2 * GP + e) - m16 // 16))
    return valid, e, start + local, local, count, m16, tl.load(meta_ptr + 4 * GP + e)


@triton.jit
def _load_blocks(x_ptr, row0, local, count, cols, valid, K, stride_m):
    """The 16 tokens of every block as a tuple of 16 tensors [BB, BK] (zeros past the
    expert's rows: the padding to M16)."""
    kin = cols[None, :] < K
    p = x_ptr + row0[:, None].to(tl.int64) * stride_m + cols[None, :]
    v = ()
    for j in tl.static_range(16):
        ok = kin & (valid & (local + j < count))[:, None]
        v = v + (tl.load(p + j * stride_m, mask=ok, other=0.0),)
    return v


@triton.jit
def _column(v, COL_RHT: tl.constexpr, RHT_SIGN: tl.constexpr, INTERPRET: tl.constexpr):
    """The column copy's FP32 inputs: the RHT of each block (rounded to x's dtype, as
    :func:`._common.rht16`: with its redo flag) or x (flag 0)."""
    if COL_RHT:
        return rht16(v, RHT_SIGN, INTERPRET)
    y = ()
    for j in tl.static_range(16):
        y = y + (v[j].to(tl.float32),)
    return y, 0


@triton.jit
def _max16(t):
    """Elementwise FP32 ``max_j |t_j|`` of a tuple of 16 tensors (the tokens or outputs of
    each block)."""
    m = tl.abs(t[0]).to(tl.float32)
    for j in tl.static_range(1, 16):
        m = tl.maximum(m, tl.abs(t[j]).to(tl.float32))
    return m


@triton.jit
def _exact_block_max(x_ptr, row0, local, count, cols, sel, K, stride_m, RHT_SIGN: tl.constexpr,
                     INTERPRET: tl.constexpr):
    """``max|RHT|`` of each selected block ``sel`` [BB] over the columns ``cols``, every output
    as the reference rounds it (:func:`._common.rht16_exact`; unselected blocks: 0)."""
    y = rht16_exact(x_ptr + row0[:, None].to(tl.int64) * stride_m + cols[None, :], stride_m,
                    tl.where(sel, count - local, 0)[:, None], cols[None, :] < K, RHT_SIGN,
                    INTERPRET)
    return tl.max(_max16(y), axis=1)


@triton.jit
def _grouped_amax_kernel(x_ptr, meta_ptr, amax_ptr, bmax_ptr, K, stride_m, NB, G,
                         DO_ROW: tl.constexpr, DO_COL: tl.constexpr, COL_RHT: tl.constexpr,
                         RHT_SIGN: tl.constexpr, INTERPRET: tl.constexpr, GP: tl.constexpr,
                         BB: tl.constexpr, BK: tl.constexpr):
    valid, e, row0, local, count, m16, off16 = _blocks(meta_ptr, tl.program_id(0), NB, G, GP,
                                                       BB)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    v = _load_blocks(x_ptr, row0, local, count, cols, valid, K, stride_m)
    if DO_ROW:
        tl.atomic_max(amax_ptr + 2 * e, tl.max(_max16(v), axis=1), mask=valid)
    if DO_COL:
        if COL_RHT and x_ptr.dtype.element_ty == tl.bfloat16:
            # each block's FP32 maximum, rounded or redone by _grouped_amax_fix_kernel
            bm = tl.max(_max16(rht16_fp32(v, RHT_SIGN)), axis=1)
            blk = tl.program_id(0) * BB + tl.arange(0, BB)
            tl.store(bmax_ptr + G + blk * tl.num_programs(1) + tl.program_id(1), bm,
                     mask=valid)
            tl.atomic_max(bmax_ptr + e, bm, mask=valid)
        elif COL_RHT:  # FP16: the exact path
            tl.atomic_max(amax_ptr + 2 * e + 1,
                          _exact_block_max(x_ptr, row0, local, count, cols, valid, K, stride_m,
                                           RHT_SIGN, INTERPRET), mask=valid)
        else:
            tl.atomic_max(amax_ptr + 2 * e + 1, tl.max(_max16(v), axis=1), mask=valid)


@triton.jit
def _grouped_amax_fix_kernel(x_ptr, meta_ptr, amax_ptr, bmax_ptr, K, stride_m, NB, G,
                             RHT_SIGN: tl.constexpr, INTERPRET: tl.constexpr,
                             GP: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr):
    """Each expert's BF16 RHT maximum from the main pass's FP32 one ``G_e`` (``bmax[e]``;
    each block's FP32 maximum per column program at ``bmax[G + ...]``, same grid), as
    :func:`.amax._amax_fix_kernel` does for one tensor: ``G_e`` rounded once, or, when a BF16
    midpoint lies within ``eps = 2^-15 G_e`` of it, the exact maximum of every block whose
    maximum could be the exact one (above ``G_e - 2 eps``; inf: all; a NaN is dropped by the
    maxima, as in the dense pass). The FP32 butterfly's error (:func:`._common.rht16_fp32`:
    ``2^-22 T``, ``T <= 4 max|y|`` of the block) is far inside ``eps``. The rounded value is
    written by every program of the expert (the same value)."""
    valid, e, row0, local, count, m16, off16 = _blocks(meta_ptr, tl.program_id(0), NB, G, GP,
                                                       BB)
    g = tl.load(bmax_ptr + e)
    eps = tl.math.fma(g, 3.0517578125e-05, 1.401298464324817e-45)
    mid = ((g.to(tl.int32, bitcast=True) & -65536) | 32768).to(tl.float32, bitcast=True)
    near = ~(tl.abs(g - mid) >= eps)
    if INTERPRET:
        rounded = round_bf16(g)
    else:
        rounded = g.to(tl.bfloat16).to(tl.float32)
    tl.atomic_max(amax_ptr + 2 * e + 1, rounded, mask=valid & ~near)
    blk = tl.program_id(0) * BB + tl.arange(0, BB)
    bm = tl.load(bmax_ptr + G + blk * tl.num_programs(1) + tl.program_id(1), mask=valid,
                 other=0.0)
    redo = valid & near & ~(bm < g - 2 * eps)
    if tl.max(redo.to(tl.int32), axis=0) > 0:
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        tl.atomic_max(amax_ptr + 2 * e + 1,
                      _exact_block_max(x_ptr, row0, local, count, cols, redo, K, stride_m,
                                       RHT_SIGN, INTERPRET), mask=redo)


@triton.jit
def _grouped_rowcol_kernel(x_ptr, meta_ptr, amax_ptr, keys_ptr, row_ptr, col_data_ptr,
                           col_scale_ptr, flags_ptr, K, stride_m, NB, G,
                           DO_ROW: tl.constexpr, DO_COL: tl.constexpr, COL_RHT: tl.constexpr,
                           RHT_SIGN: tl.constexpr, INTERPRET: tl.constexpr,
                           ROW_SR: tl.constexpr, COL_SR: tl.constexpr,
                           COL_VALUES: tl.constexpr, FIX: tl.constexpr, GP: tl.constexpr,
                           BB: tl.constexpr, BK: tl.constexpr):
    """``FIX`` as :func:`.quantize_rowcol._rowcol_kernel`'s: 0 the main launch (a BF16 RHT
    column copy flags the programs whose interval butterfly was not decisive), 1 the fix-up
    launch (the column copy of just the flagged programs, with the exact sum), 2 the exact
    sum in the one launch (FP16)."""
    flag = flags_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    if FIX == 1:
        if tl.load(flag) == 0:
            return
    valid, e, row0, local, count, m16, off16 = _blocks(meta_ptr, tl.program_id(0), NB, G, GP,
                                                       BB)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    kin = cols[None, :] < K
    if DO_ROW or not (COL_RHT and FIX != 0):
        v = _load_blocks(x_ptr, row0, local, count, cols, valid, K, stride_m)

    if DO_ROW:  # token j of every block: [BB, BK/16, 16] blocks along K
        mult6, s_dec = global_scales(tl.load(amax_ptr + 2 * e))
        key = tl.load(keys_ptr + 2 * e)[:, None, None]
        c3 = tl.reshape(cols, [1, BK // 16, 16])
        for j in tl.static_range(16):
            x3 = tl.reshape(v[j].to(tl.float32), [BB, BK // 16, 16])
            byte, mult = block_scale(tl.max(tl.abs(x3), axis=2), mult6[:, None],
                                     s_dec[:, None])
            idx = ((local + j)[:, None, None] * K + c3).to(tl.uint32)
            vals = encode_e2m1_scaled(x3 * mult[:, :, None], idx, key,
                                      e4m3_decode(byte)[:, :, None], ROW_SR)
            ok = kin & (valid & (local + j < count))[:, None]
            tl.store(row_ptr + (row0 + j)[:, None].to(tl.int64) * K + cols[None, :],
                     tl.reshape(bf16_exact(vals), [BB, BK]), mask=ok)

    if DO_COL:  # each thread holds whole column blocks (16 tokens of one feature)
        mult6c, s_decc = global_scales(tl.load(amax_ptr + 2 * e + 1))
        if COL_RHT and FIX != 0:  # the exact sum (reloading the tokens)
            y = rht16_exact(x_ptr + row0[:, None].to(tl.int64) * stride_m + cols[None, :],
                            stride_m, tl.where(valid, count - local, 0)[:, None],
                            cols[None, :] < K, RHT_SIGN, INTERPRET)
        else:
            y, redo = _column(v, COL_RHT, RHT_SIGN, INTERPRET)
            if COL_RHT:
                tl.store(flag, redo)
        bamax = _max16(y)
        cbyte, cmult = block_scale(bamax, mult6c[:, None], s_decc[:, None])
        ckey = tl.load(keys_ptr + 2 * e + 1)[:, None]
        cidx = (cols[None, :] * m16[:, None] + local[:, None]).to(tl.uint32)
        codes = ()
        for j in tl.static_range(16):
            codes = codes + (encode_e2m1(y[j] * cmult, cidx + j, ckey, COL_SR),)
        # element offset of the block's first token in the flat column buffer
        off = (off16.to(tl.int64) * K)[:, None] + cols[None, :].to(tl.int64) * m16[:, None] \
            + local[:, None]
        ok = kin & valid[:, None]
        if COL_VALUES:  # int32 words of BF16 pairs
            s = e4m3_decode(cbyte)
            words = ()
            for j in tl.static_range(0, 16, 2):
                lo = e2m1_decode_scaled(codes[j], s).to(tl.int32, bitcast=True)
                hi = e2m1_decode_scaled(codes[j + 1], s).to(tl.int32, bitcast=True)
                words = words + (((lo >> 16) & 0xFFFF) | (hi & -65536),)
            w3 = (off // 2)[:, :, None] + tl.arange(0, 8)[None, None, :]
            tl.store(col_data_ptr + w3, join8(words, BB, BK), mask=ok[:, :, None])
        else:  # int32 words of packed codes, two per block, and the E4M3 byte
            w3 = (off // 8)[:, :, None] + tl.arange(0, 2)[None, None, :]
            tl.store(col_data_ptr + w3, tl.join(pack8(codes, 0), pack8(codes, 8)),
                     mask=ok[:, :, None])
            tl.store(col_scale_ptr + off // 16, cbyte.to(tl.uint8), mask=ok)


def _token_grid(layout: GroupLayout, k: int) -> tuple[int, int]:
    return cdiv(layout.blocks, _BB), cdiv(k, _BK)


def grouped_amax(x: torch.Tensor, layout: GroupLayout, row: bool, col: bool,
                 col_rht_sign: tuple[int, ...] | None) -> torch.Tensor:
    """Per expert ``[max|x_g|, max|RHT(x_g^T)|]``: FP32 [G, 2] (skipped entries 0).

    Args:
        x: BF16/FP16 [S, K] rows sorted by expert (K-contiguous), K a multiple of 16.
        layout: the experts' rows.
        row / col: which amax to compute; ``col_rht_sign``: RHT sign vector, or None.

    The RHT maximum is the reference's (each output rounded to x's dtype). BF16: a plain FP32
    butterfly, then a small second launch that rounds each expert's maximum once or redoes
    exactly the blocks that may hold it (:func:`_grouped_amax_fix_kernel`); FP16: the exact
    path in the main pass.
    """
    _check_tokens(x)
    g = len(layout.counts)
    amax = torch.zeros((g, 2), dtype=torch.float32, device=x.device)
    if layout.blocks == 0 or not (row or col):
        return amax
    grid = _token_grid(layout, x.shape[1])
    bf16_rht = col and col_rht_sign is not None and x.dtype == torch.bfloat16
    # BF16 RHT: per expert the FP32 maximum (G entries), then each block's per column program
    bmax = (torch.zeros(g + grid[0] * _BB * grid[1], dtype=torch.float32, device=x.device)
            if bf16_rht else amax)
    sign = sign_mask(col_rht_sign) if col_rht_sign is not None else 0
    args = (x, layout.meta, amax, bmax, x.shape[1], x.stride(0), layout.blocks, g)
    _grouped_amax_kernel[grid](
        *args, DO_ROW=row, DO_COL=col, COL_RHT=col_rht_sign is not None, RHT_SIGN=sign,
        INTERPRET=interpreting(), GP=layout.gp, BB=_BB, BK=_BK, num_warps=4,
    )
    if bf16_rht:
        _grouped_amax_fix_kernel[grid](*args, RHT_SIGN=sign, INTERPRET=interpreting(),
                                       GP=layout.gp, BB=_BB, BK=_BK, num_warps=_FIX_WARPS)
    return amax


def grouped_quantize_rowcol(
    x: torch.Tensor,
    layout: GroupLayout,
    amax: torch.Tensor,
    keys: torch.Tensor | None,
    *,
    row: bool,
    col: bool,
    col_rht_sign: tuple[int, ...] | None,
    row_sr: bool,
    col_sr: bool,
    col_values: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Every expert's NVFP4 row copy (as BF16 block values) and column copy: one launch, and a
    second (fix-up) one for a BF16 RHT column copy.

    Args:
        x: BF16/FP16 [S, K] rows sorted by expert (K-contiguous), K a multiple of 16.
        layout: the experts' rows.
        amax: FP32 [G, 2] from :func:`grouped_amax` (row, column per expert).
        keys: int32 [G, 2] SR keys (row, column copy per expert); None without SR.
        row / col: which copies to write; ``col_rht_sign``: RHT sign vector or None.
        row_sr / col_sr: stochastic rounding of the row / column copies.
        col_values: column copies as BF16 block values instead of packed codes and scales.

    Returns:
        ``(row_values [S, K] BF16, col_data, col_scale)``: the column copies flat (see the
        module docstring), BF16 [K * rows16] with ``col_values`` (``col_scale`` None), else
        uint8 codes [K * rows16 / 2] and E4M3 bytes [K * rows16 / 16]; None where not asked.
        Rows of ``row_values`` outside the experts' rows are left unwritten.
    """
    _check_tokens(x)
    if (row and row_sr) or (col and col_sr):
        if keys is None or keys.dtype != torch.int32 or keys.shape != (len(layout.counts), 2):
            raise ValueError(f"stochastic rounding needs int32 keys [{len(layout.counts)}, 2]")
    s, k = x.shape
    dev = x.device
    row_vals = torch.empty((s, k), dtype=torch.bfloat16, device=dev) if row else None
    n = k * layout.rows16
    col_data = col_scale = None
    if col and col_values:
        col_data = torch.empty(n, dtype=torch.bfloat16, device=dev)
    elif col:
        col_data = torch.empty(n // 2, dtype=torch.uint8, device=dev)
        col_scale = torch.empty(n // 16, dtype=torch.uint8, device=dev)
    if layout.blocks == 0 or not (row or col):
        return row_vals, col_data, col_scale
    grid = _token_grid(layout, k)
    col_rht = col and col_rht_sign is not None
    flags = (torch.empty(grid[0] * grid[1], dtype=torch.int32, device=dev) if col_rht
             else layout.meta)
    # FIX (see the kernel): a BF16 RHT column copy takes a second, fix-up launch
    fix = 0 if not col_rht or x.dtype == torch.bfloat16 else 2
    passes = ((fix, row), (1, False)) if col_rht and fix == 0 else ((fix, row),)
    for fix_pass, do_row in passes:
        _grouped_rowcol_kernel[grid](
            x, layout.meta, amax, keys if keys is not None else layout.meta,
            row_vals if do_row else amax, col_data.view(torch.int32) if col else amax,
            col_scale if col_scale is not None else amax, flags, k, x.stride(0),
            layout.blocks, len(layout.counts),
            DO_ROW=do_row, DO_COL=col, COL_RHT=col_rht_sign is not None,
            RHT_SIGN=sign_mask(col_rht_sign) if col_rht_sign is not None else 0,
            INTERPRET=interpreting(), ROW_SR=do_row and row_sr, COL_SR=col and col_sr,
            COL_VALUES=col and col_values, FIX=fix_pass, GP=layout.gp, BB=_BB, BK=_BK,
            num_warps=4,
        )
    return row_vals, col_data, col_scale


def _check_tokens(x: torch.Tensor) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        # the MoE token path is 16-bit (its row copies are BF16 block values)
        raise ValueError(f"grouped token kernels take bf16 or fp16 rows; got {x.dtype}")
    if x.dim() != 2 or x.shape[1] % 16 or (x.stride(1) != 1 and x.shape[0] > 1):
        raise ValueError(f"grouped kernels need a K-contiguous [S, K] with K a multiple of 16; "
                         f"got shape {tuple(x.shape)}, strides {x.stride()}")


@triton.jit
def _slab_amax_kernel(w_ptr, amax_ptr, numel, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """``amax[g] = max|w[g]|`` over each expert's contiguous slab of ``numel`` elements."""
    g = tl.program_id(0)
    offs = tl.program_id(1).to(tl.int64) * (BLOCK * ITERS) + tl.arange(0, BLOCK)
    m = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        o = offs + i * BLOCK
        m = tl.maximum(m, tl.abs(tl.load(w_ptr + g.to(tl.int64) * numel + o, mask=o < numel,
                                         other=0.0).to(tl.float32)))
    tl.atomic_max(amax_ptr + g, tl.max(m, axis=0))


@triton.jit
def _grouped_2d_kernel(w_ptr, amax_ptr, vals_ptr, data_t_ptr, scale_t_ptr, N, K,
                       stride_e, stride_n, stride_k, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    rows = pid_n * BN + tl.arange(0, BN)
    cols = pid_k * BK + tl.arange(0, BK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + g * stride_e + rows[:, None].to(tl.int64) * stride_n
                + cols[None, :].to(tl.int64) * stride_k, mask=mask, other=0.0)
    mult6, s_dec = global_scales(tl.load(amax_ptr + g))
    w4 = tl.reshape(w.to(tl.float32), [BN // 16, 16, BK // 16, 16])
    byte, mult = block_scale(tl.max(tl.max(tl.abs(w4), axis=3), axis=1), mult6, s_dec)
    codes = e2m1_nearest(w4 * mult[:, None, :, None])
    vals = tl.reshape(e2m1_decode_scaled(codes, e4m3_decode(byte)[:, None, :, None]), [BN, BK])
    tl.store(vals_ptr + g * N * K + rows[:, None].to(tl.int64) * K + cols[None, :],
             bf16_exact(vals), mask=mask)
    # W^T along N: [K, N / 2] codes, the tile scale repeated on its 16 rows
    codes_t = tl.trans(tl.reshape(codes, [BN, BK]))
    brows = pid_n * (BN // 2) + tl.arange(0, BN // 2)
    tl.store(data_t_ptr + g * K * (N // 2) + cols[:, None].to(tl.int64) * (N // 2)
             + brows[None, :], pack_pairs(codes_t, BK, BN),
             mask=(cols[:, None] < K) & (brows[None, :] < N // 2))
    srows = pid_n * (BN // 16) + tl.arange(0, BN // 16)
    rep_t = tl.reshape(tl.broadcast_to(tl.trans(byte)[:, None, :], [BK // 16, 16, BN // 16]),
                       [BK, BN // 16])
    tl.store(scale_t_ptr + g * K * (N // 16) + cols[:, None].to(tl.int64) * (N // 16)
             + srows[None, :], rep_t.to(tl.uint8),
             mask=(cols[:, None] < K) & (srows[None, :] < N // 16))


def grouped_quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every expert's 16x16-tile NVFP4 weight, one global scale per expert.

    Args:
        w: [G, N, K] (any strides: a transposed view of a [G, K, N] parameter works), N and
            K multiples of 16.

    Returns:
        ``(amax [G] FP32, values [G, N, K] BF16 block values of W, data_t [G, K, N/2] uint8
        codes of W^T, scale_t [G, K, N/16] E4M3 bytes)``.
    """
    g, n, k = w.shape
    if n % 16 or k % 16:
        raise ValueError(f"grouped weights need N and K multiples of 16; got {tuple(w.shape)}")
    dev = w.device
    amax = torch.zeros(g, dtype=torch.float32, device=dev)
    slab = w if w.is_contiguous() or w.transpose(1, 2).is_contiguous() else w.contiguous()
    base = slab if slab.is_contiguous() else slab.transpose(1, 2)  # same slab per expert
    block, iters = 1024, 8
    _slab_amax_kernel[(g, cdiv(n * k, block * iters))](
        base, amax, n * k, BLOCK=block, ITERS=iters, num_warps=4)
    vals = torch.empty((g, n, k), dtype=torch.bfloat16, device=dev)
    data_t = torch.empty((g, k, n // 2), dtype=torch.uint8, device=dev)
    scale_t = torch.empty((g, k, n // 16), dtype=torch.uint8, device=dev)
    _grouped_2d_kernel[(cdiv(n, 64), cdiv(k, 64), g)](
        slab, amax, vals, data_t, scale_t, n, k, *slab.stride(), BN=64, BK=64, num_warps=8)
    return amax, vals, data_t, scale_t


@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, meta_ptr, N, KR, G,
                         stride_ce, stride_cm, stride_cn, SA_STRIDE: tl.constexpr,
                         SB_STRIDE: tl.constexpr, WGRAD: tl.constexpr,
                         INTERPRET: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr):
    """Tokens (not WGRAD): C[rows of g] = A[rows of g] @ B[g]^T, A [S, KR], B [G, N, KR],
    C [S, N]. WGRAD: C[g] = A_g @ B_g^T over the expert's padded tokens, A_g [N, M16_g] and
    B_g [KR, M16_g] flat at ``N * off16`` and ``KR * off16``, C [G, N, KR] (C strides)."""
    pid_n = tl.program_id(1)
    if WGRAD:
        tiles_m = tl.cdiv(N, BM)
        g = tl.program_id(0) // tiles_m
        pid_m = tl.program_id(0) % tiles_m
        m16 = (tl.load(meta_ptr + GP + g) + 15) // 16 * 16
        off16 = tl.load(meta_ptr + 4 * GP + g).to(tl.int64)
        rows_total, red, n_out = N, m16, KR
        a_base = a_ptr + N * off16
        b_base = b_ptr + KR * off16
        c_base = c_ptr + g.to(tl.int64) * stride_ce
    else:
        g = _find(meta_ptr + 3 * GP, tl.program_id(0) + tl.zeros([1], tl.int32), G, GP)
        g = tl.sum(g, axis=0)
        tile0 = tl.load(meta_ptr + 3 * GP + g) - tl.cdiv(tl.load(meta_ptr + GP + g), BM)
        pid_m = tl.program_id(0) - tile0
        start = tl.load(meta_ptr + g).to(tl.int64)
        rows_total, red, n_out = tl.load(meta_ptr + GP + g), KR, N
        a_base = a_ptr + start * KR
        b_base = b_ptr + g.to(tl.int64) * N * KR
        c_base = c_ptr + start * stride_cm
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, red, BK):
        kk = k0 + ks
        a = tl.load(a_base + rows[:, None].to(tl.int64) * red + kk[None, :],
                    mask=(rows[:, None] < rows_total) & (kk[None, :] < red), other=0.0)
        b = tl.load(b_base + cols[:, None].to(tl.int64) * red + kk[None, :],
                    mask=(cols[:, None] < n_out) & (kk[None, :] < red), other=0.0)
        if INTERPRET:  # the interpreter's BF16 dot is wrong; FP32 is exact on these values
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    _, sa = global_scales(tl.load(sa_ptr + g * SA_STRIDE))
    _, sb = global_scales(tl.load(sb_ptr + g * SB_STRIDE))
    out = acc * (sa * sb)
    if INTERPRET and c_ptr.dtype.element_ty == tl.bfloat16:
        out = round_bf16(out)
    tl.store(c_base + rows[:, None].to(tl.int64) * stride_cm + cols[None, :].to(tl.int64)
             * stride_cn, out.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < rows_total) & (cols[None, :] < n_out))


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    amax_a: torch.Tensor,
    amax_b: torch.Tensor,
    layout: GroupLayout,
    *,
    wgrad: bool,
) -> torch.Tensor:
    """Every expert's ``(A_g @ B_g^T) * (S_dec,a[g] * S_dec,b[g])`` into ``out``, one launch.

    The decode scales come from the amaxes (``S_dec = amax / 2688``, as the quantizers).

    Args:
        a / b: BF16 block values. Token GEMMs (``wgrad`` False): ``a`` [S, KR] rows sorted
            by expert, ``b`` [G, N, KR]. Weight gradients: ``a`` and ``b`` the flat column
            copies of :func:`grouped_quantize_rowcol` ([N * rows16] and [KR * rows16]).
        out: token GEMMs: [S, N] (K-contiguous; rows outside the experts' untouched);
            ``wgrad``: [G, N, KR] with any strides (every expert written, zeros for one
            without rows).
        amax_a / amax_b: FP32 amaxes, one per expert ([G] or a column of [G, 2]).
        layout: the experts' rows.

    Returns:
        ``out``.
    """
    g = len(layout.counts)
    if wgrad:
        n, kr = out.shape[1], out.shape[2]
        stride_ce, stride_cm, stride_cn = out.stride()
        grid = (g * cdiv(n, _GEMM_BM), cdiv(kr, _GEMM_BN))
    else:
        n, kr = b.shape[1], b.shape[2]
        stride_ce, (stride_cm, stride_cn) = 0, out.stride()
        tiles = sum(-(-c // _GEMM_BM) for c in layout.counts)
        grid = (tiles, cdiv(n, _GEMM_BN))
    if grid[0] == 0:
        return out
    _grouped_gemm_kernel[grid](
        a, b, out, amax_a, amax_b, layout.meta, n, kr, g, stride_ce, stride_cm, stride_cn,
        SA_STRIDE=amax_a.stride(0), SB_STRIDE=amax_b.stride(0), WGRAD=wgrad,
        INTERPRET=interpreting(), GP=layout.gp, BM=_GEMM_BM, BN=_GEMM_BN, BK=_GEMM_BK,
        num_warps=8, num_stages=3,
    )
    return out


__all__ = [
    "GroupLayout",
    "grouped_amax",
    "grouped_gemm",
    "grouped_quantize_rowcol",
    "grouped_quantize_weight",
]
