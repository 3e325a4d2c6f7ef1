"""FP8 block quantization (``fp8_block``: the paper's FP8 baseline) in one pass over memory.

E4M3 elements with one FP32 decode scale per block, bit for bit
``numerics.quantize(x, "fp8_block", tile=...)``:

* :func:`quantize_rowcol_fp8`: activations and gradients ``x`` [M, K] in 1x128 blocks. The
  row copy is ``x`` along K (``data`` [M, K128], ``scale`` [M, K128/128]), the column copy
  ``x^T`` along M (``data`` [K, M128], ``scale`` [K, M128/128]; K128, M128: padded to 128).
  A program reads one [BM, 128] tile of ``x`` once: its rows are whole row blocks and, with
  BM = 128, its columns whole column blocks, so both copies come from the same registers.
* :func:`quantize_2d_fp8`: weights ``w`` [N, K] in 128x128 tiles, the QTensor layouts of
  ``w`` ([N128, K128], each tile's scale on every row of the tile) and of ``w^T``
  ([K128, N128]): one scale per tile serves both orientations, so the kernel writes ``w``
  and ``w^T`` is its codes and tile scales transposed (a byte per element).

Numerics (scales.fp8_block_encode, e4m3.round_nearest), all in FP32:
``enc = min(448 / amax, FLT_MAX)`` (1 when amax == 0), ``dec = 1 / enc``, both IEEE
round-to-nearest divisions (``div_rn``: a plain ``/`` may compile to an approximate
division); the element is ``e4m3(clamp(x * enc, -448, 448))`` rounded to nearest even, with
``x`` widened to FP32 first (exact) as the reference's ``blocks * mult``. Zero padding to
the block (tile) is quantized like data (code 0). NaN and Inf are not checked: a NaN in a
block makes its amax, scales and every element NaN, an Inf gives ``enc = 0``, ``dec = inf``
and NaN at the Inf (``inf * 0``), as in the reference (amax and clamp propagate NaN).

Compiled, the element cast is ``cvt.rn.satfinite.e4m3x2.f32`` (round to nearest even,
subnormals kept, magnitudes past 448 and Inf saturate to 448, NaN stays NaN: the clamp
and cast of the reference in one instruction per two elements). Triton's interpreter
converts FP32 to FP8 by truncating the dropped bits and rounding half up, so under the
interpreter :func:`e4m3_bits` rounds on the FP32 bits instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import abs_max, cdiv
from ._tuning import pick, shape_bucket

BLOCK = 128
# (BM, num_warps) of the row/column kernel: BM rows x 128 columns per program; the column
# copy needs BM = 128 (its blocks are 128 rows).
_CONFIGS_COL = ((128, 8), (128, 4), (128, 16))
_CONFIGS_ROW = ((64, 4), (128, 8), (32, 4))
_TILE_WARPS = 8


def _pad(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


@triton.jit
def fp8_scales(amax):
    """``(enc, dec)`` of block amaxes: scales.fp8_block_encode and its IEEE reciprocal."""
    enc = tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax)
    enc = tl.minimum(enc, 3.4028234663852886e38, propagate_nan=tl.PropagateNan.ALL)
    enc = tl.where(amax == 0.0, 1.0, enc)
    return enc, tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), enc)


@triton.jit
def e4m3_bits(v):
    """float8_e4m3fn bytes (uint8) of FP32 ``v``: clamp to +-448, then round to nearest
    even, on the bits (what torch's ``clamp(-448, 448).to(float8_e4m3fn)`` gives).

    Normal results (|v| >= 2^-6) round the mantissa to 3 bits on the integer bits (a carry
    into the exponent is the next binade); below, the step is 2^-9 and ``|v| * 512`` (exact)
    is rounded to an integer, the subnormal code (8 is the smallest normal, 2^-6). NaN gives
    0x7F with the sign of the NaN, as torch.
    """
    b = v.to(tl.int32, bitcast=True)
    sign = (b >> 24) & 0x80
    a = b & 0x7FFFFFFF
    nan = a > 0x7F800000
    a = tl.minimum(a, 0x43E00000)  # 448 (Inf too)
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - 960  # biased exponent 127 -> 7
    q = a.to(tl.float32, bitcast=True) * 512.0
    qi = q.to(tl.int32)
    frac = q - qi.to(tl.float32)
    qi = qi + ((frac > 0.5) | ((frac == 0.5) & ((qi & 1) == 1))).to(tl.int32)
    code = tl.where(a >= 0x3C800000, normal, qi)
    return (tl.where(nan, 0x7F, code) | sign).to(tl.uint8)


@triton.jit
def e4m3_bytes(v, INTERPRET: tl.constexpr):
    """float8_e4m3fn bytes of ``clamp(v, -448, 448)`` rounded to nearest even (uint8)."""
    if INTERPRET:
        out = e4m3_bits(v)
    else:  # cvt.rn.satfinite.e4m3x2.f32: the clamp is the saturation
        out = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return out


@triton.jit
def _fp8_rowcol_kernel(
    x_ptr,
    row_data_ptr,
    row_scale_ptr,
    col_data_ptr,
    col_scale_ptr,
    M,
    K,
    stride_m,
    K128,
    M128,
    DO_ROW: tl.constexpr,
    DO_COL: tl.constexpr,
    INTERPRET: tl.constexpr,
    BM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * 128 + tl.arange(0, 128)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :],
                mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0).to(tl.float32)
    if DO_ROW:  # 1x128 blocks along K: one scale per row of the tile
        enc, dec = fp8_scales(abs_max(x, 1, INTERPRET))
        tl.store(row_data_ptr + rows[:, None].to(tl.int64) * K128 + cols[None, :],
                 e4m3_bytes(x * enc[:, None], INTERPRET), mask=rows[:, None] < M)
        tl.store(row_scale_ptr + rows.to(tl.int64) * (K128 // 128) + pid_k, dec, mask=rows < M)
    if DO_COL:  # 1x128 blocks of x^T along M: one scale per column of the tile (BM = 128)
        enc_c, dec_c = fp8_scales(abs_max(x, 0, INTERPRET))
        tl.store(col_data_ptr + cols[None, :].to(tl.int64) * M128 + rows[:, None],
                 e4m3_bytes(x * enc_c[None, :], INTERPRET), mask=cols[None, :] < K)
        tl.store(col_scale_ptr + cols.to(tl.int64) * (M128 // 128) + pid_m, dec_c,
                 mask=cols < K)


@triton.jit
def _fp8_tile_kernel(
    w_ptr,
    data_ptr,
    scale_ptr,
    N,
    K,
    stride_n,
    N128,
    K128,
    INTERPRET: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * 128 + tl.arange(0, 128)
    cols = pid_k * 128 + tl.arange(0, 128)
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_n + cols[None, :],
                mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0).to(tl.float32)
    amax = abs_max(abs_max(w, 1, INTERPRET), 0, INTERPRET)
    enc, dec = fp8_scales(amax)
    q = e4m3_bytes(w * enc, INTERPRET)
    # w along K [N128, K128]; the tile's scale on each row
    tl.store(data_ptr + rows[:, None].to(tl.int64) * K128 + cols[None, :], q)
    dec_rows = tl.full([128], 0.0, tl.float32) + dec
    tl.store(scale_ptr + rows.to(tl.int64) * (K128 // 128) + pid_k, dec_rows)


def _empty(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(0, dtype=torch.float8_e4m3fn, device=dev),
            torch.empty(0, dtype=torch.float32, device=dev))


def _copy(rows: int, cols: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=dev),
            torch.empty((rows, cols // BLOCK), dtype=torch.float32, device=dev))


def quantize_rowcol_fp8(x: torch.Tensor, row: bool, col: bool) -> tuple[torch.Tensor, ...]:
    """``fp8_block`` 1x128-block row and column copies of a 2D ``x`` [M, K] (bf16, fp16 or
    fp32; rows may be strided, elements contiguous).

    Returns:
        ``(row_data [M, K128], row_scale [M, K128/128], col_data [K, M128],
        col_scale [K, M128/128])``: float8_e4m3fn codes and FP32 decode scales, the
        QTensor fields of ``quantize(x, "fp8_block")`` and ``quantize(x.t(), "fp8_block")``;
        a copy not asked for is two empty tensors.
    """
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    k128, m128 = _pad(k), _pad(m)
    dev = x.device
    row_data, row_scale = _copy(m, k128, dev) if row else _empty(dev)
    col_data, col_scale = _copy(k, m128, dev) if col else _empty(dev)
    if not (row or col) or m == 0 or k == 0:
        return row_data, row_scale, col_data, col_scale
    row_out, col_out = row_data.view(torch.uint8), col_data.view(torch.uint8)

    def launch(bm: int, warps: int) -> None:  # idempotent
        _fp8_rowcol_kernel[(cdiv(m, bm), k128 // BLOCK)](
            x, row_out, row_scale, col_out, col_scale, m, k, x.stride(0), k128, m128,
            DO_ROW=row, DO_COL=col, INTERPRET=interpreting(), BM=bm, num_warps=warps,
        )

    configs = _CONFIGS_COL if col else _CONFIGS_ROW
    key = ("fp8rowcol", shape_bucket(m), shape_bucket(k), x.dtype, row, col, dev)
    names = [f"BM={bm},warps={w}" for bm, w in configs]
    cands = lambda: {n: (lambda c=c: launch(*c)) for n, c in zip(names, configs, strict=True)}
    launch(*configs[names.index(pick(key, cands, dev))])
    return row_data, row_scale, col_data, col_scale


def quantize_2d_fp8(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``fp8_block`` 128x128-tile codes of a 2D ``w`` [N, K] in both orientations.

    Returns:
        ``(data [N128, K128], scale [N128, K128/128], data_t [K128, N128],
        scale_t [K128, N128/128])``: float8_e4m3fn codes and FP32 decode scales (a tile's
        scale repeated on each of its rows), the QTensor fields of
        ``quantize(w, "fp8_block", tile=(128, 128))`` and of the same for ``w.t()``.
    """
    if w.stride(1) != 1:
        w = w.contiguous()
    n, k = w.shape
    n128, k128 = _pad(n), _pad(k)
    dev = w.device
    data, scale = _copy(n128, k128, dev)
    if n and k:
        _fp8_tile_kernel[(n128 // BLOCK, k128 // BLOCK)](
            w, data.view(torch.uint8), scale, n, k, w.stride(0), n128, k128,
            INTERPRET=interpreting(), num_warps=_TILE_WARPS,
        )
    # A 128x128 tile quantizes the same in either orientation: w^T is w's codes transposed
    # (one byte per element; the kernel's own transposed store of FP32 inputs gave wrong
    # bytes under Triton 3.6 on the H200).
    data_t = data.t().contiguous()
    scale_t = scale[::BLOCK].t().repeat_interleave(BLOCK, dim=0).contiguous()
    return data, scale, data_t, scale_t
