"""Triton device helpers shared by the quantize kernels, plus their host-side constants.

Every helper reproduces a step of :mod:`hf_nvfp4.numerics` bit for bit (formulas: its
modules' docstrings). Integer bit manipulation replaces the float compares and tables of the
reference wherever it gives the same result in fewer instructions: the quantize kernels
are memory-bound only if each element costs a few dozen instructions.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..numerics import rng
from ..numerics.hadamard import RHT_SIZE, rht_matrix
from ..numerics.rng import as_int32


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the host-side grids: a plain function, because ``triton.cdiv`` is a
    constexpr function whose host call costs microseconds (a dozen per layer and step)."""
    return -(-a // b)


def seed_key(seed: int) -> int:
    """``fmix32(seed)`` of :func:`numerics.rng.counter_uniform` as a signed int32 argument."""
    return as_int32(rng.seed_key(seed))


@functools.lru_cache(maxsize=32)
def rht_blockdiag(
    sign: tuple[int, ...], rows: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``blockdiag((D H / 4)^T, ...)`` [rows, rows]: ``bd @ x`` applies the RHT to each
    16-row group of ``x`` (column-wise), exactly as ``hadamard_transform`` does on ``x^T``.

    Its entries (+-1/4 and 0) are exact in every float dtype.
    """
    m = rht_matrix(sign).t()
    return torch.block_diag(*([m] * (rows // RHT_SIZE))).to(device=device, dtype=dtype)


@triton.jit
def global_scales(amax):
    """``(S_enc * (1/6), S_dec)`` from a global amax; S_enc = 2688 / amax as in scales.py."""
    s_enc = tl.math.div_rn(tl.full(amax.shape, 2688.0, tl.float32), amax)
    s_enc = tl.minimum(s_enc, 3.4028234663852886e38)
    s_enc = tl.where((amax == 0.0) | (s_enc == 0.0), 1.0, s_enc)
    s_dec = tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), s_enc)
    # TE folds 1/6 into the global multiplier first (0.16666667 is fp32(1/6) exactly).
    return s_enc * 0.1666666716337204, s_dec


@triton.jit
def block_scale(block_amax, mult6, s_dec):
    """E4M3 block scale byte and element multiplier ``min(1 / (fp32(s_b) * S_dec), FLT_MAX)``.

    The E4M3 cast is done on the FP32 bits (round to nearest even; subnormals step 2^-9) so
    it is identical on every device and in the interpreter.
    """
    s = tl.minimum(block_amax * mult6, 448.0)
    bits = s.to(tl.int32, bitcast=True)
    r = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
    byte_n = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)
    q = s * 512.0
    qi = q.to(tl.int32)
    frac = q - qi.to(tl.float32)
    qi = qi + ((frac > 0.5) | ((frac == 0.5) & ((qi & 1) == 1))).to(tl.int32)
    normal = s >= 0.015625
    byte = tl.where(normal, byte_n, qi)
    val = tl.where(normal, r.to(tl.float32, bitcast=True), qi.to(tl.float32) * 0.001953125)
    mult = tl.math.div_rn(tl.full(val.shape, 1.0, tl.float32), val * s_dec)
    return byte, tl.minimum(mult, 3.4028234663852886e38)


@triton.jit
def e2m1_nearest(v):
    """E2M1 codes (int32) of fp32 ``v``, nearest-even, saturating, sign from the sign bit.

    For |v| >= 1 the mantissa is rounded to one bit on the integer bits; below 1 the step
    is 0.5 and two compares do (ties 0.25 -> 0 and 0.75 -> 1.0 go to the even code).
    """
    b = v.to(tl.int32, bitcast=True)
    sign = (b >> 28) & 8
    a = tl.minimum(b & 0x7FFFFFFF, 0x40C00000)
    big = ((a + 0x1FFFFF + ((a >> 22) & 1)) >> 22) - 252
    small = (a > 0x3E800000).to(tl.int32) + (a >= 0x3F400000).to(tl.int32)
    return tl.where(a >= 0x3F800000, big, small) | sign


@triton.jit
def e2m1_stochastic(v, r24):
    """E2M1 codes of fp32 ``v`` rounding up when ``u = r24 * 2^-24 < p`` (e2m1.py's rule).

    For |v| >= 1, p is the low 22 mantissa bits over 2^22, so the compare is on integers.
    """
    b = v.to(tl.int32, bitcast=True)
    sign = (b >> 28) & 8
    a = tl.minimum(b & 0x7FFFFFFF, 0x40C00000)
    big = (a >> 22) - 252 + (r24 < ((a & 0x3FFFFF) << 2)).to(tl.int32)
    m2 = a.to(tl.float32, bitcast=True) * 2.0
    lo = (m2 >= 1.0).to(tl.int32)
    small = lo + ((r24.to(tl.float32) * 5.960464477539063e-08) < (m2 - lo.to(tl.float32))).to(
        tl.int32
    )
    return tl.where(a >= 0x3F800000, big, small) | sign


@triton.jit
def counter_hash(idx, key):
    """``fmix32(idx * GOLDEN + key)`` of rng.counter_uniform for uint32 indices (uint32)."""
    h = idx * 0x9E3779B9 + key.to(tl.uint32, bitcast=True)
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def uniform24(idx, key):
    """The 24 random bits of rng.counter_uniform for uint32 indices (u = bits * 2^-24)."""
    return (counter_hash(idx, key) >> 8).to(tl.int32)


@triton.jit
def pack_pairs(codes, R: tl.constexpr, C: tl.constexpr):
    """Pack int32 codes [R, C] along the last dimension, the even element in the low nibble."""
    lo, hi = tl.split(tl.reshape(codes, [R, C // 2, 2]))
    return (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def unpack_pairs(packed, R: tl.constexpr, C: tl.constexpr):
    """Inverse of :func:`pack_pairs`: uint8 [R, C // 2] to int32 codes [R, C]."""
    p = packed.to(tl.int32)
    return tl.reshape(tl.join(p & 15, p >> 4), [R, C])


@triton.jit
def e2m1_decode(c):
    """FP32 values of int32 E2M1 codes, built on the bits (exact)."""
    mag = c & 7
    e = mag >> 1
    m = mag & 1
    bits = tl.where(e == 0, m * 0x3F000000, ((e + 126) << 23) | (m << 22))
    return (bits | ((c & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_decode(b):
    """FP32 values of int32 E4M3 bytes of non-negative scales (exact)."""
    e = (b >> 3) & 15
    m = b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)


@triton.jit
def round_bf16(y):
    """FP32 ``y`` rounded to BF16 (nearest even) on the bits, returned as FP32.

    Used in the interpreter only, whose FP32 -> BF16 casts truncate.
    """
    b = y.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def sr_offsets(idx, key):
    """``2^26 + 2^24 - 1 - r24`` of the draws of :func:`uniform24` (uint32), for
    :func:`e2m1_stochastic_fast`: the complement folded into the last xor-shift (as an xor
    with the mask: Triton 3.8's interpreter cannot invert a uint32)."""
    return ((counter_hash(idx, key) >> 8) & 0x04FFFFFF) ^ 0x04FFFFFF


@triton.jit
def e2m1_stochastic_fast(v, t):
    """:func:`e2m1_stochastic` with ``t = sr_offsets(...)``: the same codes in fewer instructions.

    Rounding up when ``r24 < p * 2^24`` is a carry into bit 24 of ``X + 2^24 - 1 - r24``,
    where ``X`` is the magnitude in fixed point with the code above bit 24 and the fraction
    ``ceil(p * 2^24)`` below. From 2 up (steps 1 and 2: one mantissa bit) ``X`` is the
    magnitude's bits times 4, less the exponent bias (the ``2^26`` of ``t``); below 2 (step
    0.5) it is ``ceil(|v| * 2^25)``.
    """
    m = tl.minimum(tl.abs(v), 6.0)
    big = m.to(tl.uint32, bitcast=True) * 4 + t
    small = tl.math.ceil(m * 33554432.0).to(tl.uint32) + (t - 0x04000000)
    code = (tl.where(m < 2.0, small, big) >> 24).to(tl.int32)
    return code | ((v.to(tl.int32, bitcast=True) >> 28) & 8)


@triton.jit
def e2m1_nearest_fma(v):
    """:func:`e2m1_nearest` as one rounding FMA: the same codes for every input.

    ``|v|`` (saturated at 6) times the inverse grid step ``s`` (2 below 2, then 1, then 1/2:
    ``2^(128 - max(e, 127))``, e the biased exponent) plus ``2^23`` rounds to the nearest
    integer, ties to even; the code is that integer plus ``2 * (max(e, 127) - 127)``.
    """
    m = tl.minimum(tl.abs(v), 6.0)
    e = tl.maximum(m, 1.0).to(tl.int32, bitcast=True) & 0x7F800000
    r = (m * (0x7F800000 - e).to(tl.float32, bitcast=True) + 8388608.0).to(tl.int32,
                                                                            bitcast=True)
    return (r + (e >> 22) - (0x4B000000 + 254)) | ((v.to(tl.int32, bitcast=True) >> 28) & 8)


@triton.jit
def e2m1_nearest_value(v):
    """FP32 value of :func:`e2m1_nearest_fma`'s code of ``v`` (the E2M1 value, signed), without
    the code: the same rounding in two additions.

    Adding ``C = 2^22 * step`` (``step`` the grid step of ``|v|``'s interval, 0.5 / 1 / 2;
    ``C``'s exponent is the same ``max(e, 127)`` offset) rounds ``|v|`` (saturated at 6) to a
    multiple of ``step``, ties to even: the sum's last bit is worth ``step``. Subtracting
    ``C`` is exact, and the sign bit is ``v``'s (so ``-0.1`` gives ``-0``, code 8).
    """
    m = tl.minimum(tl.abs(v), 6.0)
    c = ((tl.maximum(m, 1.0).to(tl.int32, bitcast=True) & 0x7F800000) + 0x0B000000).to(
        tl.float32, bitcast=True)
    r = (m + c) - c
    return (r.to(tl.int32, bitcast=True) | (v.to(tl.int32, bitcast=True) & -2147483648)).to(
        tl.float32, bitcast=True)


@triton.jit
def e2m1_decode_scaled(c, scale):
    """FP32 ``e2m1_value(c) * scale`` for int32 codes, exact when the product is a BF16.

    ``(c & 7) << 22`` read as FP32 is the E2M1 magnitude times 2^-126 (subnormal below
    code 2), so two multiplications replace the decode.
    """
    bits = ((c & 7) << 22) | ((c & 8) << 28)
    return bits.to(tl.float32, bitcast=True) * 8.507059173023462e37 * scale


@triton.jit
def bf16_exact(y):
    """FP32 ``y`` that is exactly a BF16 value, as BF16 (its high 16 bits, no rounding)."""
    return (y.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def pack_words(codes, R: tl.constexpr, C: tl.constexpr):
    """int32 codes [R, C, 8] to int32 words [R, C]: code j in nibble j (the byte layout of
    :func:`pack_pairs`, read little-endian), by shift-adds within each thread."""
    lo, hi = tl.split(tl.reshape(codes, [R, C, 4, 2]))
    lo, hi = tl.split(tl.reshape(lo + (hi << 4), [R, C, 2, 2]))
    lo, hi = tl.split(lo + (hi << 8))
    return lo + (hi << 16)


def sign_mask(sign: tuple[int, ...]) -> int:
    """The RHT sign vector (16 entries +-1) as the bit mask :func:`rht16` takes."""
    return sum(1 << i for i, d in enumerate(sign) if d < 0)


@triton.jit
def bf16x2_word(a, b):
    """FP32 ``a`` and ``b`` rounded to BF16 (nearest even) and packed in an int32, ``a`` in
    the low half: one ``cvt.rn.bf16x2.f32`` (an ALU instruction) for two elements instead of
    two ``F2F`` on the quarter-rate conversion pipe. Compiled code only (inline PTX)."""
    return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [a, b],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _rht_signs(SIGN: tl.constexpr):
    """The 16 factors ``d_i / 4`` (+-1/4) of the bit mask ``SIGN`` (:func:`sign_mask`)."""
    c = ()
    for i in tl.static_range(16):
        c = c + (0.25 - 0.5 * ((SIGN >> i) % 2),)
    return c


@triton.jit
def rht16_fp32(v, SIGN: tl.constexpr):
    """The 16-point RHT of the BF16 tuple ``v`` (16 tensors: the tokens of each block) in
    FP32, every sum of the butterfly rounded to nearest, no exactness test: each output lies
    within ``2^-22 T`` of the exact one (``T`` its block's sum of |products|; four roundings,
    each of a partial sum bounded by ``T``). For maxima that are rounded afterwards, where
    only the global one needs the exact treatment (the amax passes' fix-up launches)."""
    c = _rht_signs(SIGN)
    t = ()
    for i in tl.static_range(16):
        t = t + (v[i].to(tl.float32) * c[i],)
    for s in tl.static_range(4):
        n = ()
        for i in tl.static_range(16):
            if (i >> s) % 2 == 0:
                n = n + (t[i] + t[i + (1 << s)],)
            else:
                n = n + (t[i - (1 << s)] - t[i],)
        t = n
    return t


@triton.jit
def round_to_odd_fp32(z):
    """FP64 ``z`` to FP32 by round-to-odd (toward zero, last bit set when inexact), as
    ``numerics.hadamard.round_to_odd_fp32``: then one nearest-even rounding to BF16/FP16
    gives the nearest-even rounding of ``z``."""
    f = z.to(tl.float32)
    back = f.to(tl.float64)
    bits = f.to(tl.int32, bitcast=True) - (tl.abs(back) > tl.abs(z)).to(tl.int32)
    return (bits | (back != z).to(tl.int32)).to(tl.float32, bitcast=True)


@triton.jit
def _round_exact(acc, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """An FP64 sum rounded once to ``dtype`` (FP32: nearest even; BF16/FP16: through
    :func:`round_to_odd_fp32`), returned as FP32."""
    if dtype == tl.float32:
        return acc.to(tl.float32)
    f = round_to_odd_fp32(acc)
    if dtype != tl.bfloat16:
        return f.to(dtype).to(tl.float32)
    if INTERPRET:
        return round_bf16(f)
    return f.to(tl.bfloat16).to(tl.float32)


@triton.jit
def rht16_exact_one(p, stride_m, lim, ok, j: tl.constexpr, SIGN: tl.constexpr,
                    INTERPRET: tl.constexpr):
    """Output ``j`` of :func:`rht16_exact` (FP32 value of the rounded output)."""
    sign = tl.full([], SIGN, tl.int32)
    acc = tl.zeros(p.shape, tl.float64)
    # a trip count the compiler cannot see (stride_m >= 0): a loop, not 16 unrolled loads
    # hoisted and kept live across the outputs
    for i in range(tl.minimum(stride_m, 0) + 16):
        x = tl.load(p + i * stride_m, mask=ok & (lim > i), other=0.0)
        par = i & j
        par = par ^ (par >> 2)
        par = (par ^ (par >> 1) ^ (sign >> i)) & 1
        acc = acc + x.to(tl.float64) * (0.25 - 0.5 * par.to(tl.float64))
    return _round_exact(acc, p.dtype.element_ty, INTERPRET)


@triton.jit
def rht16_exact_tokens(p, stride_m, lim, ok, SIGN: tl.constexpr, INTERPRET: tl.constexpr):
    """The interpreter's :func:`rht16_exact`: all 16 outputs at once, as one
    ``[R, 16, C]`` tensor (output j of the block at ``[r, c]`` in ``[r, j, c]``) for ``p`` of
    shape ``[R, C]``. The same FP64 sums in token order from +0, each token's products
    for the 16 outputs in one operation (the interpreter's time goes to operations, not to
    their size)."""
    k = tl.arange(0, 16)
    par = k[:, None] & k[None, :]
    par = par ^ (par >> 2)
    par = (par ^ (par >> 1) ^ (SIGN >> k[:, None])) & 1
    h = 0.25 - 0.5 * par.to(tl.float64)  # [i, j]: d_i / 4 * (-1)^popcount(i & j)
    acc = tl.zeros([p.shape[0], 16, p.shape[1]], tl.float64)
    for i in tl.static_range(16):
        x = tl.load(p + i * stride_m, mask=ok & (lim > i), other=0.0).to(tl.float64)
        row = tl.sum(tl.where(k[:, None] == i, h, 0.0), axis=0)  # h[i, :], exactly
        acc = acc + x[:, None, :] * row[None, :, None]
    return _round_exact(acc, p.dtype.element_ty, INTERPRET)


@triton.jit
def _unstack16(bits, k, shape):
    """The interpreter's 16 outputs held along axis 1 of ``bits`` (their FP32 bits; ``k`` the
    index 0..15 broadcast along that axis) as a tuple of 16 FP32 tensors of ``shape``: each
    the sum of its own bits and zeros, so -0 and NaN payloads stay as they are."""
    y = ()
    for j in tl.static_range(16):
        yj = tl.sum(tl.where(k == j, bits, 0), axis=1).to(tl.float32, bitcast=True)
        y = y + (tl.reshape(yj, shape),)
    return y


@triton.jit
def rht16_exact(p, stride_m, lim, ok, SIGN: tl.constexpr, INTERPRET: tl.constexpr):
    """:func:`rht16` the slow way, for every input, loading the tokens itself: token i of
    each block at ``p + i * stride_m`` where ``ok & (i < lim)`` (else 0). Each output is the
    sum of its 16 products (exact) in FP64, in token order from +0, rounded once to the
    inputs' dtype (FP32: nearest even; BF16/FP16: through :func:`round_to_odd_fp32`): bit
    for bit ``numerics.hadamard_transform``. Compiled, the tokens are reloaded for every
    output (registers); the interpreter computes all outputs at once
    (:func:`rht16_exact_tokens`) and takes them apart (:func:`_unstack16`)."""
    y = ()
    if INTERPRET:
        if len(p.shape) == 1:  # blocks along one axis: [R, 1] (``lim`` a scalar)
            yy = rht16_exact_tokens(p[:, None], stride_m, lim, ok[:, None], SIGN, INTERPRET)
        else:
            yy = rht16_exact_tokens(p, stride_m, lim, ok, SIGN, INTERPRET)
        return _unstack16(yy.to(tl.int32, bitcast=True), tl.arange(0, 16)[None, :, None],
                          p.shape)
    for j in tl.static_range(16):
        y = y + (rht16_exact_one(p, stride_m, lim, ok, j, SIGN, INTERPRET),)
    return y


@triton.jit
def add_directed(a, b, UP: tl.constexpr, SUB: tl.constexpr, INTERPRET: tl.constexpr):
    """FP32 ``a + b`` (``a - b`` when ``SUB``) rounded toward +inf (``UP``) or -inf: IEEE
    ``add.rp`` / ``add.rm`` compiled (subnormals kept). The interpreter derives it from the
    nearest-even sum and its exact error (TwoSum), with two differences that
    :func:`rht16` makes harmless: an exact zero rounded down is +0 (IEEE: -0 unless both
    terms are +0), and an overflow is infinite in both directions (IEEE: the largest finite
    value toward zero)."""
    if INTERPRET:
        if SUB:
            b = -b
        s = a + b
        bb = s - a
        e = (a - (s - bb)) + (b - bb)
        bits = s.to(tl.int32, bitcast=True)
        if UP:
            return tl.where(e > 0, bits + tl.where(s > 0, 1, -1), bits).to(tl.float32,
                                                                           bitcast=True)
        return tl.where(e < 0, bits + tl.where(s > 0, -1, 1), bits).to(tl.float32,
                                                                       bitcast=True)
    # the subtraction inside the PTX: a negated operand outside it would cost an instruction
    op: tl.constexpr = ("sub" if SUB else "add") + (".rp" if UP else ".rm")
    return tl.inline_asm_elementwise(op + ".f32 $0, $1, $2;", "=f,f,f", [a, b],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _butterfly16_bounds(t):
    """The 4-stage Sylvester butterfly ``y_j = sum_i t_i (-1)^popcount(i & j)`` of the tuple
    ``t`` (16 tensors of exact values), stage s pairing ``i`` with ``i + 2^s`` as
    ``(a + b, a - b)``, in interval arithmetic: ``(lo, hi)`` tuples, every sum of ``lo``
    rounded toward -inf and of ``hi`` toward +inf, so ``lo_j <= y_j <= hi_j`` for the exact
    ``y_j``. A difference takes the subtrahend's other bound: ``lo(a - b) = rd(lo_a - hi_b)``,
    ``hi(a - b) = ru(hi_a - lo_b)``. Compiled code (the interpreter:
    :func:`_rht16_bounds_interpreted`)."""
    lo = t
    hi = t
    for s in tl.static_range(4):
        nlo = ()
        nhi = ()
        for i in tl.static_range(16):
            if (i >> s) % 2 == 0:
                nlo = nlo + (add_directed(lo[i], lo[i + (1 << s)], False, False, False),)
                nhi = nhi + (add_directed(hi[i], hi[i + (1 << s)], True, False, False),)
            else:
                nlo = nlo + (add_directed(lo[i - (1 << s)], hi[i], False, True, False),)
                nhi = nhi + (add_directed(hi[i - (1 << s)], lo[i], True, True, False),)
        lo = nlo
        hi = nhi
    return lo, hi


@triton.jit
def rht16(v, SIGN: tl.constexpr, INTERPRET: tl.constexpr):
    """16-point RHT of the tuple ``v`` of 16 tensors (the 16 tokens of each block), element by
    element: ``y_j = sum_i v_i * (D H / 4)[i, j]`` rounded to v's dtype exactly as
    ``numerics.hadamard_transform`` (one rounding of the exact sum). Returns ``(y, redo)``:
    FP32 values, and a program-wide flag: when ``redo`` is set the caller must replace ``y``
    by :func:`rht16_exact` of the same inputs (which reloads them: keeping ``v`` live across
    the check would cost registers).

    ``SIGN``: the diagonal of D as a bit mask (bit i set: ``d_i = -1``, :func:`sign_mask`);
    ``(D H / 4)[i, j] = d_i / 4 * (-1)^popcount(i & j)``, so every factor is a compile-time
    +-1/4. Each thread holds whole blocks: no shuffles and no tensor cores.

    BF16 inputs: the products are exact in FP32. An interval butterfly sums them twice, every
    sum rounded down for the lower bound ``lo`` and up for the upper bound ``hi``, so the
    exact output lies in ``[lo, hi]``. Where ``lo`` and ``hi`` round to the same BF16 value,
    so does the exact output (rounding is monotone): ``y = RN_bf16(hi)``, the correctly
    rounded value. Otherwise a BF16 midpoint lies in ``[lo, hi]`` (the exact sum is on or
    next to it) and the block sets ``redo``: about 2^-12 of the outputs of the rare inexact
    blocks (wide exponent spreads). ``lo`` is compared after ``+ 0``: an exact zero
    rounded down is -0, and the correctly rounded zero +0. ``hi`` never is -0 for an exact
    zero: term 0 carries a ``+ 0`` and is the first operand of every output's chain of
    sums (a sum rounded up is -0 only from two -0), and a zero's sign as the second operand
    changes no sum of a first operand that is +0 or nonzero, so the signs of ``lo``'s zeros
    never reach ``hi`` or the canonical ``lo``. Where the reference's FP64 token-order sum
    is itself inexact (blocks spanning more than 41 binades), a decisive interval still
    gives its bits: a term lost in that sum is lost in an FP32 sum of this butterfly at the
    same magnitude, which widens the interval past a BF16 ulp of the output (tested on
    blocks spanning 200 binades). FP16 and FP32 inputs always take
    :func:`rht16_exact` (``redo`` the constant 1, ``y`` a placeholder).
    """
    if v[0].dtype != tl.bfloat16:
        y = ()
        for j in tl.static_range(16):
            y = y + (v[j].to(tl.float32),)
        return y, 1
    c = _rht_signs(SIGN)
    t = (v[0].to(tl.float32) * c[0] + 0.0,)
    for i in tl.static_range(1, 16):
        t = t + (v[i].to(tl.float32) * c[i],)
    if INTERPRET:
        return _rht16_bounds_interpreted(t)
    lo, hi = _butterfly16_bounds(t)
    y = ()
    bad = tl.zeros(t[0].shape, tl.int1)
    for j in tl.static_range(0, 16, 2):
        w = bf16x2_word(hi[j], hi[j + 1])
        bad = bad | (w != bf16x2_word(lo[j] + 0.0, lo[j + 1] + 0.0))
        y = y + ((w << 16).to(tl.float32, bitcast=True),
                 (w & -65536).to(tl.float32, bitcast=True))
    return y, tl.max(bad.to(tl.int32))


@triton.jit
def _rht16_bounds_interpreted(t):
    """The interpreter's :func:`rht16` of the BF16 products ``t``: the same interval
    butterfly (the same directed sums of the same operands, stage by stage), on one
    ``[n, 16]`` tensor of the n blocks' 16 terms, so each stage is a few operations on the
    whole tile instead of 64 (the interpreter's time goes to operations, not to their size).
    Stage s pairs the terms whose indices differ in bit s: each stage leaves the index bits
    rotated right by one (the pair's axis moved to the front), which puts bit s + 1 last for
    the next stage, and the four rotations restore the order. Also flags a bound that
    overflowed (:func:`add_directed`'s interpreter version)."""
    n: tl.constexpr = t[0].numel
    x = ()
    for i in tl.static_range(16):
        x = x + (tl.reshape(t[i], [n]),)
    for level in tl.static_range(4):  # joins pairing i with i + 8, 4, 2, 1: index i last
        h: tl.constexpr = 8 >> level
        z = ()
        for k in tl.static_range(h):
            z = z + (tl.join(x[k], x[k + h]),)
        x = z
    lo = tl.reshape(x[0], [n, 16])
    hi = lo
    for _stage in tl.static_range(4):
        a_lo, b_lo = tl.split(tl.reshape(lo, [n, 8, 2]))
        a_hi, b_hi = tl.split(tl.reshape(hi, [n, 8, 2]))
        lo = tl.join(add_directed(a_lo, b_lo, False, False, True),
                     add_directed(a_lo, b_hi, False, True, True))
        hi = tl.join(add_directed(a_hi, b_hi, True, False, True),
                     add_directed(a_hi, b_lo, True, True, True))
        lo = tl.reshape(tl.permute(lo, (0, 2, 1)), [n, 16])
        hi = tl.reshape(tl.permute(hi, (0, 2, 1)), [n, 16])
    rounded = round_bf16(hi).to(tl.int32, bitcast=True)
    bad = ~(tl.abs(lo) < float("inf")) | (
        rounded != round_bf16(lo + 0.0).to(tl.int32, bitcast=True))
    y = _unstack16(rounded, tl.arange(0, 16)[None, :], t[0].shape)
    return y, tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0)


@triton.jit
def e2m1_nearest_word(v, o: tl.constexpr):
    """The codes of :func:`e2m1_nearest_fma` of the 8 FP32 tensors ``v[o:o + 8]`` (a tuple)
    packed into an int32 word, code j in nibble j (the byte layout of :func:`pack_pairs`,
    read little-endian), with the packing fused into the encode: each code is added at its
    nibble (the bias of all 8 codes folds into one constant) and its sign bit shifted there.
    """
    w = tl.zeros(v[o].shape, tl.int32)
    for j in tl.static_range(8):
        x = v[o + j]
        m = tl.minimum(tl.abs(x), 6.0)
        e = tl.maximum(m, 1.0).to(tl.int32, bitcast=True) & 0x7F800000
        r = (m * (0x7F800000 - e).to(tl.float32, bitcast=True) + 8388608.0).to(tl.int32,
                                                                                bitcast=True)
        # code bits 0-2 and the sign bit 3 of nibble j are disjoint: added, not or-ed
        w = w + ((r + (e >> 22)) << (4 * j)) + ((x.to(tl.int32, bitcast=True) >> (28 - 4 * j))
                                                & ((8 << (4 * j)) - ((j // 7) << 32)))
    # 0x16111122 = -sum_j (0x4B000000 + 254) << 4j mod 2^32: the 8 codes' biases
    return w + 0x16111122


@triton.jit
def encode_e2m1(v, idx, key, SR: tl.constexpr):
    """E2M1 codes of scaled values ``v``: nearest, or stochastic with draws hashed from idx."""
    if SR:
        return e2m1_stochastic_fast(v, sr_offsets(idx, key))
    return e2m1_nearest_fma(v)


@triton.jit
def encode_e2m1_scaled(v, idx, key, scale, SR: tl.constexpr):
    """``e2m1_decode_scaled(encode_e2m1(v, idx, key, SR), scale)``: the FP32 words of the BF16
    block values. Nearest rounding skips the codes (:func:`e2m1_nearest_value`: 5 fewer
    instructions per element in x's forward call). Stochastic rounding keeps them: the same
    shortcut for it (the code bits moved straight into the FP32 word) compiled to fewer
    instructions but ran 4-11% slower on an H100 in dy's call."""
    if SR:
        return e2m1_decode_scaled(encode_e2m1(v, idx, key, SR), scale)
    return e2m1_nearest_value(v) * scale


@triton.jit
def pack8(codes, o: tl.constexpr):
    """int32 word of the 8 codes ``codes[o:o + 8]`` (a tuple), code ``o + j`` in nibble j:
    the byte layout of :func:`pack_pairs`, read little-endian."""
    w = codes[o]
    for j in tl.static_range(1, 8):
        w = w | (codes[o + j] << (4 * j))
    return w


@triton.jit
def join8(w, R: tl.constexpr, C: tl.constexpr):
    """The tuple of 8 tensors [R, C] ``w`` as one [R, C, 8], ``w[j]`` at index j (each
    join appends the faster axis, so the first joins pair the tensors 4 apart)."""
    a = tl.join(tl.join(w[0], w[4]), tl.join(w[2], w[6]))
    b = tl.join(tl.join(w[1], w[5]), tl.join(w[3], w[7]))
    return tl.reshape(tl.join(a, b), [R, C, 8])


@triton.jit
def split8(t, R: tl.constexpr, C: tl.constexpr):
    """[R, C, 8] as a tuple of 8 tensors [R, C], element j at index j (in-thread when the
    last dimension is)."""
    a, b = tl.split(tl.reshape(t, [R, C, 4, 2]))
    a0, a1 = tl.split(tl.reshape(a, [R, C, 2, 2]))
    b0, b1 = tl.split(tl.reshape(b, [R, C, 2, 2]))
    a00, a01 = tl.split(a0)
    a10, a11 = tl.split(a1)
    b00, b01 = tl.split(b0)
    b10, b11 = tl.split(b1)
    return a00, b00, a10, b10, a01, b01, a11, b11


@triton.jit
def _nanmax(a, b):
    """``max`` that propagates NaN (``max.NaN.f32``), as torch's amax does."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def abs_max(x, axis: tl.constexpr, INTERPRET: tl.constexpr):
    """``max |x|`` along ``axis``, NaN if any element is NaN (torch's amax). Compiled: a
    ``max.NaN.f32`` reduction (``tl.max`` drops NaN). The interpreter's ``tl.reduce`` calls
    the combine function per element (slow) and its ``tl.max`` is ``np.nanmax``, so there a
    count of NaNs puts them back."""
    if INTERPRET:
        a = tl.abs(x)
        nan = tl.sum((a != a).to(tl.int32), axis) > 0
        out = tl.where(nan, tl.full(nan.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True),
                       tl.max(a, axis))
    else:
        out = tl.reduce(tl.abs(x), axis, _nanmax)
    return out


@triton.jit
def ue8m0_decode(b):
    """FP32 values ``2^(b - 127)`` of int32 UE8M0 bytes (exact; byte 0 is the subnormal
    2^-127, built on the bits so no flush-to-zero can touch it), NaN for the NaN byte 255."""
    normal = (b << 23).to(tl.float32, bitcast=True)
    value = tl.where(b == 0, tl.full(b.shape, 0x400000, tl.int32).to(tl.float32, bitcast=True),
                     normal)
    return tl.where(b == 255, tl.full(b.shape, 0x7FC00000, tl.int32).to(tl.float32,
                                                                          bitcast=True), value)


@triton.jit
def ue8m0_scale(amax):
    """MXFP4 block scale byte (int32) and element multiplier ``2^-k`` (FP32) of FP32 block
    amaxes (non-negative, or NaN): ``k = scales.ue8m0_exponents(amax, 6)``, byte ``k + 127``.

    ``ceil(log2(amax / 6))`` on the bits, no division: with ``amax = 1.f * 2^(E - 127)`` and
    ``6 = 1.5 * 2^2``, it is ``E - 129``, plus one when ``1.f > 1.5`` (mantissa bits above
    0x400000). Zero and subnormal amaxes clamp to -127 (byte 0). The reference's ``frexp``
    makes Inf ``k = -2`` (its exponent 0, its mantissa Inf > 0.75), and NaN ``k = -127``
    with the NaN byte 0xFF; multipliers span 2^-126 .. 2^127, normal FP32 (exact).
    """
    bits = amax.to(tl.int32, bitcast=True)
    k = ((bits >> 23) & 0xFF) - 129 + ((bits & 0x7FFFFF) > 0x400000).to(tl.int32)
    k = tl.maximum(k, -127)
    k = tl.where(bits == 0x7F800000, -2, k)
    nan = amax != amax
    k = tl.where(nan, -127, k)
    mult = ((127 - k) << 23).to(tl.float32, bitcast=True)
    return tl.where(nan, 255, k + 127), mult
