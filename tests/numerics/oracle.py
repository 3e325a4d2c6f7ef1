"""An independent test oracle for ``hf_nvfp4.numerics``: NUMERICS.md in numpy float32.

This module is test code, not part of the package. It re-derives every format from the
written formulas with deliberately different code paths, so that a shared mistake is unlikely:

* E2M1 rounding searches the 8-value grid for the nearest value and breaks ties towards the
  even code explicitly (the package counts threshold crossings).
* The E4M3 (float8_e4m3fn) cast rounds the FP32 bit pattern by integer arithmetic, with a
  separate subnormal path (multiples of 2^-9) and saturation at 448 (the package uses torch's
  cast).
* UE8M0 exponents come from the float64 bit pattern of ``amax / element_max`` (the package
  uses ``frexp`` on FP32).
* The RHT is an explicit sequential FP32 accumulation over the 16 inputs of each chunk,
  ``acc = fma(x[k], M[k, :], acc)`` for k = 0..15, rounded to the input dtype by bit
  arithmetic (BF16) or numpy's own cast (FP16). NUMERICS.md fixes FP32 accumulation, not its
  order; this order is what torch's CPU matmul produces for a K = 16 product (other orders
  differ in the last FP32 bit for FP32 inputs with a wide dynamic range). For FP32 inputs in
  the FP32 subnormal range (|x| < 2^-124) the sign of an exactly-cancelling zero and the
  rounding of underflowing products depend on the BLAS kernel; the tests avoid them.

Every scalar is a numpy float32 so each operation rounds once in FP32, in the product order
NUMERICS.md gives. Outputs are raw bytes: packed element bytes, block-scale bytes and the
global-scale bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F32 = np.float32
FLT_MAX = np.finfo(np.float32).max
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)
TE_SIGN = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)

# name: (element, block, scale kind, element max)
FORMATS = {
    "nvfp4": ("e2m1", 16, "e4m3", 6.0),
    "mxfp4": ("e2m1", 32, "ue8m0", 6.0),
    "fp8_block": ("e4m3", 128, "fp32", 448.0),
    "mxfp8": ("e4m3", 32, "ue8m0", 448.0),
}


@dataclass
class OracleQ:
    """Raw bytes of a quantized tensor (padded shape; one scale per row and block)."""

    data: np.ndarray  # uint8: packed E2M1 bytes or E4M3 bytes
    scale: np.ndarray  # uint8: E4M3 bytes, UE8M0 bytes, or the FP32 scales' bytes
    global_scale_bits: int | None  # FP32 bit pattern of S_dec (NVFP4 only)


# --- element formats ---------------------------------------------------------------------


def e2m1_codes(v: np.ndarray) -> np.ndarray:
    """Nearest E2M1 code by grid search; ties go to the even code; sign from signbit."""
    m = np.minimum(np.abs(v.astype(np.float64)), 6.0)  # saturate (and keep |m - g| exact)
    dist = np.abs(m[..., None] - E2M1_GRID)  # exact: m is FP32, the grid is dyadic
    dmin = dist.min(axis=-1, keepdims=True)
    cand = dist == dmin
    even = cand & (np.arange(8) % 2 == 0)
    code = np.where(even.any(axis=-1), even.argmax(axis=-1), cand.argmax(axis=-1))
    return code.astype(np.uint8) | (np.signbit(v).astype(np.uint8) << 3)


def e2m1_value(codes: np.ndarray) -> np.ndarray:
    mag = E2M1_GRID[codes & 7].astype(np.float32)
    return np.where(codes & 8, -mag, mag).astype(np.float32)


def pack(codes: np.ndarray) -> np.ndarray:
    """Two codes per byte along the last dimension, the even index in the low nibble."""
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2).astype(np.uint16)
    return (pairs[..., 0] + 16 * pairs[..., 1]).astype(np.uint8)


def e4m3_bytes(v: np.ndarray) -> np.ndarray:
    """Saturating round-to-nearest-even float8_e4m3fn bytes of FP32 values, by bit arithmetic."""
    v = np.ascontiguousarray(v, dtype=np.float32)
    bits = v.view(np.uint32).astype(np.int64)
    sign = (bits >> 31) << 7
    exp = ((bits >> 23) & 0xFF) - 127
    sig = (bits & 0x7FFFFF) | 0x800000  # 1.mmm... with the implicit bit
    # normal E4M3 (|v| >= 2^-6): keep 1 + 3 mantissa bits, round the other 20 to nearest even
    keep = sig >> 20
    rem = sig & 0xFFFFF
    keep = keep + ((rem > 0x80000) | ((rem == 0x80000) & (keep % 2 == 1)))
    e = exp + (keep >> 4)  # a carry out of the mantissa bumps the exponent
    keep = np.where(keep >= 16, keep >> 1, keep)
    normal = ((e + 7) << 3) | (keep & 7)
    # subnormal E4M3: multiples of 2^-9; |v| * 512 is exact in float64
    q = np.minimum(np.abs(v.astype(np.float64)), 1.0) * 512.0  # (larger |v| use `normal`)
    q = np.where(np.isnan(q), 0.0, q)
    fl = np.floor(q)
    frac = q - fl
    sub = (fl + ((frac > 0.5) | ((frac == 0.5) & (fl % 2 == 1)))).astype(np.int64)
    code = np.where(exp >= -6, normal, np.minimum(sub, 8))  # 8 * 2^-9 is the smallest normal
    code = np.minimum(code, 0x7E)  # saturate at 448 (also catches +-Inf)
    code = np.where(np.isnan(v), 0x7F, code)
    return (code | sign).astype(np.uint8)


def e4m3_value(b: np.ndarray) -> np.ndarray:
    """FP32 value of float8_e4m3fn bytes (explicit arithmetic)."""
    b = b.astype(np.int64)
    e = (b >> 3) & 15
    m = (b & 7).astype(np.float64)
    mag = np.where(e == 0, m * 2.0**-9, (1.0 + m / 8.0) * np.exp2(e - 7.0))
    mag = np.where((b & 0x7F) == 0x7F, np.nan, mag)
    return np.where(b & 0x80, -mag, mag).astype(np.float32)


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round FP32 values to bfloat16 / float16 (nearest even), returned as FP32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        bits = x.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        out = bits.astype(np.uint32).view(np.float32)
        return np.where(np.isnan(x), x, out)
    raise ValueError(f"unknown dtype {dtype!r}")


# --- RHT ---------------------------------------------------------------------------------


def rht_matrix(sign=TE_SIGN) -> np.ndarray:
    h = np.array([[1.0]])
    while h.shape[0] < 16:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return (np.asarray(sign, dtype=np.float64)[:, None] * h / 4.0).astype(np.float32)


def rht(x: np.ndarray, dtype: str, sign=TE_SIGN) -> np.ndarray:
    """``chunk @ (D H / 4)`` per 16-chunk of the last dim, rounded once to dtype: each output
    summed in float64 in chunk order from +0 (exact unless the chunk spans > 41 binades),
    then to FP32 by nearest even (float32 inputs) or by round-to-odd followed by the nearest
    even rounding to bfloat16/float16 (the one rounding of the float64 sum)."""
    m = rht_matrix(sign).astype(np.float64)
    c = x.astype(np.float32).reshape(*x.shape[:-1], x.shape[-1] // 16, 16).astype(np.float64)
    acc = np.zeros(c.shape, dtype=np.float64)
    for k in range(16):
        acc = acc + c[..., k : k + 1] * m[k]  # the product (x * +-1/4) is exact
    acc = acc.reshape(x.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        f = acc.astype(np.float32)
        if dtype == "float32":
            return f
        back = f.astype(np.float64)
        inexact = back != acc
        bits = f.view(np.int32) - (inexact & (np.abs(back) > np.abs(acc))).astype(np.int32)
        odd = (bits | inexact.astype(np.int32)).view(np.float32)
    return round_to_dtype(odd, dtype)


# --- scales ------------------------------------------------------------------------------


def ue8m0_exponent(amax: np.ndarray, element_max: float) -> np.ndarray:
    """``ceil(log2(amax / element_max))`` from the float64 bits, clamped to [-127, 127]."""
    r = np.ascontiguousarray(amax.astype(np.float64) / element_max)  # exact enough: see tests
    bits = r.view(np.uint64)
    exp = ((bits >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64) - 1023
    frac = bits & np.uint64((1 << 52) - 1)
    k = exp + (frac != 0)
    k = np.where(r > 0, k, -127)
    return np.clip(k, -127, 127)


def quantize(
    x: np.ndarray,
    fmt: str = "nvfp4",
    tile: tuple[int, int] | None = None,
    rht_on: bool = False,
    dtype: str = "float32",
    sign=TE_SIGN,
) -> OracleQ:
    """Quantize the FP32 values ``x`` (exact copies of a ``dtype`` tensor), rank >= 2."""
    element, block, scale_kind, elem_max = FORMATS[fmt]
    th, tw = (1, block) if tile is None else tile
    x = np.asarray(x, dtype=np.float32)
    rows, cols = x.shape[-2], x.shape[-1]
    pad_r = (-rows) % th
    pad_c = (-cols) % tw
    xp = np.zeros((*x.shape[:-2], rows + pad_r, cols + pad_c), dtype=np.float32)
    xp[..., :rows, :cols] = x
    if rht_on:
        xp = rht(xp, dtype, sign)
    lead = xp.shape[:-2]
    R, C = xp.shape[-2:]
    blocks = xp.reshape(*lead, R // th, th, C // tw, tw)
    bamax = np.abs(blocks).max(axis=(-3, -1), keepdims=True) if xp.size else None
    if bamax is None:
        bamax = np.zeros((*lead, R // th, 1, C // tw, 1), dtype=np.float32)

    gbits = None
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if scale_kind == "e4m3":
            amax = F32(np.abs(xp).max()) if xp.size else F32(0)
            s_enc = np.minimum(F32(448.0 * 6.0) / amax, FLT_MAX)
            if amax == 0 or s_enc == 0:  # TE also returns 1 when S_enc underflows (Inf amax)
                s_enc = F32(1.0)
            s_dec = F32(1.0) / s_enc
            mult_g = s_enc * F32(1.0 / 6.0)  # TE folds 1/6 into the global multiplier first
            s = np.minimum(bamax * mult_g, FLT_MAX)
            sb_bytes = e4m3_bytes(np.clip(s, -448.0, 448.0).astype(np.float32))
            sb = e4m3_value(sb_bytes)
            e = np.minimum(F32(1.0) / (sb * s_dec), FLT_MAX)
            scale_bytes = sb_bytes
            gbits = int(np.array(s_dec, dtype=np.float32).view(np.uint32))
        elif scale_kind == "ue8m0":
            k = ue8m0_exponent(bamax, elem_max)
            e = np.ldexp(np.float32(1.0), -k).astype(np.float32)
            scale_bytes = (k + 127).astype(np.uint8)
        else:
            e = np.minimum(F32(448.0) / bamax, FLT_MAX)
            e = np.where(bamax == 0, F32(1.0), e).astype(np.float32)
            scale_bytes = (F32(1.0) / e).astype(np.float32)
        v = np.clip((blocks * e).astype(np.float32), -elem_max, elem_max).reshape(xp.shape)
    if element == "e2m1":
        data = pack(e2m1_codes(v))
    else:
        data = e4m3_bytes(v)
    n_sc = C // tw
    scale = np.broadcast_to(scale_bytes, (*lead, R // th, th, n_sc, 1)).reshape(*lead, R, n_sc)
    scale = np.ascontiguousarray(scale)
    if scale.dtype != np.uint8:
        scale = scale.view(np.uint8)
    return OracleQ(data=np.ascontiguousarray(data), scale=scale, global_scale_bits=gbits)


def dequantize(q: OracleQ, fmt: str, shape: tuple[int, ...]) -> np.ndarray:
    """FP32 values (cropped to ``shape``): element * block scale * global scale."""
    element, block, scale_kind, _ = FORMATS[fmt]
    if element == "e2m1":
        codes = np.stack([q.data & 15, q.data >> 4], axis=-1).reshape(*q.data.shape[:-1], -1)
        elems = e2m1_value(codes)
    else:
        elems = e4m3_value(q.data)
    if scale_kind == "e4m3":
        sc = e4m3_value(q.scale)
    elif scale_kind == "ue8m0":
        sc = np.ldexp(np.float32(1.0), q.scale.astype(np.int64) - 127).astype(np.float32)
    else:
        sc = q.scale.view(np.float32)
    vals = (elems * np.repeat(sc, block, axis=-1)).astype(np.float32)
    if q.global_scale_bits is not None:
        vals = vals * np.array(q.global_scale_bits, dtype=np.uint32).view(np.float32)
    return vals[tuple(slice(0, s) for s in shape)]
