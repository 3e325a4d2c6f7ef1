"""Bit-exact assertion helpers for QTensors, free of pytest.

Kernel tests compare their output against :func:`hf_nvfp4.numerics.quantize` with these:
element bytes, block-scale bytes and the global-scale bits must be identical, and a failure
names the first mismatch by index with both values. They raise ``AssertionError`` (not
``assert``, which ``python -O`` strips).

    from hf_nvfp4.numerics.testing import assert_qtensor_equal
    assert_qtensor_equal(triton_quantize(x), quantize(x), name="x")
"""

from __future__ import annotations

import torch

from .quantize import QTensor

_MAX_SHOWN = 5


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor on the CPU, last dimension in bytes (uint8)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.uint8:
        return t
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(torch.uint8)


def _fmt_byte_index(idx: tuple[int, ...], itemsize: int) -> str:
    if itemsize == 1:
        return str(idx)
    elem = (*idx[:-1], idx[-1] // itemsize)
    return f"{elem} (byte {idx[-1] % itemsize} of {itemsize})"


def _compare_bytes(
    what: str, a: torch.Tensor, b: torch.Tensor, describe=None, name: str = ""
) -> None:
    prefix = f"{name}: " if name else ""
    if tuple(a.shape) != tuple(b.shape):
        raise AssertionError(f"{prefix}{what} shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise AssertionError(f"{prefix}{what} dtypes differ: {a.dtype} vs {b.dtype}")
    ab, bb = _bytes(a), _bytes(b)
    diff = ab != bb
    n = int(diff.sum())
    if not n:
        return
    itemsize = a.element_size()
    where = diff.nonzero()[:_MAX_SHOWN].tolist()
    lines = []
    for idx in where:
        idx = tuple(idx)
        x, y = int(ab[idx]), int(bb[idx])
        detail = describe(idx, x, y) if describe else ""
        lines.append(f"  at {_fmt_byte_index(idx, itemsize)}: 0x{x:02x} vs 0x{y:02x}{detail}")
    raise AssertionError(
        f"{prefix}{what} differ in {n} of {diff.numel()} bytes; first mismatches:\n"
        + "\n".join(lines)
    )


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _e2m1(code: int) -> str:
    v = _E2M1[code & 7]
    return f"{'-' if code & 8 else '+'}{v:g}"


def _describe_packed(idx, x, y) -> str:
    col = 2 * idx[-1]
    return (
        f" (elements {col},{col + 1}: a=({_e2m1(x & 15)}, {_e2m1(x >> 4)}) "
        f"b=({_e2m1(y & 15)}, {_e2m1(y >> 4)}))"
    )


def _e4m3_value(b: int) -> float:
    t = torch.tensor([b], dtype=torch.uint8).view(torch.float8_e4m3fn)
    return float(t.float())


def assert_codes_bitwise(a: QTensor, b: QTensor, name: str = "") -> None:
    """The element bytes (packed E2M1 or E4M3) of ``a`` and ``b`` are identical."""
    if a.format.packed:
        describe = _describe_packed
    elif a.data.dtype == torch.float8_e4m3fn:
        describe = lambda idx, x, y: f" ({_e4m3_value(x):g} vs {_e4m3_value(y):g})"
    else:
        describe = None
    _compare_bytes("element bytes", a.data, b.data, describe, name)


def assert_scales_bitwise(a: QTensor, b: QTensor, name: str = "") -> None:
    """Block-scale bytes and global-scale bits of ``a`` and ``b`` are identical."""
    describe = None
    if a.scale.dtype == torch.float8_e4m3fn:
        describe = lambda idx, x, y: f" ({_e4m3_value(x):g} vs {_e4m3_value(y):g})"
    elif a.format.scale == "ue8m0":
        describe = lambda idx, x, y: f" (2^{x - 127} vs 2^{y - 127})"
    _compare_bytes("block scales", a.scale, b.scale, describe, name)
    prefix = f"{name}: " if name else ""
    ga, gb = a.global_scale, b.global_scale
    if (ga is None) != (gb is None):
        raise AssertionError(f"{prefix}global scale present in only one: {ga} vs {gb}")
    if ga is not None:
        ba = _bytes(ga.to(torch.float32)).view(torch.int32)
        bb = _bytes(gb.to(torch.float32)).view(torch.int32)
        if not torch.equal(ba, bb):
            raise AssertionError(
                f"{prefix}global scales differ: {float(ga):.9g} (0x{int(ba) & 0xFFFFFFFF:08x}) "
                f"vs {float(gb):.9g} (0x{int(bb) & 0xFFFFFFFF:08x})"
            )


def assert_qtensor_equal(a: QTensor, b: QTensor, name: str = "") -> None:
    """``a`` and ``b`` are the same quantized tensor: metadata, element and scale bytes."""
    prefix = f"{name}: " if name else ""
    for field in ("fmt", "shape", "dtype", "tile", "rht"):
        va, vb = getattr(a, field), getattr(b, field)
        if tuple(va) != tuple(vb) if field in ("shape", "tile") else va != vb:
            raise AssertionError(f"{prefix}QTensor.{field} differs: {va!r} vs {vb!r}")
    assert_codes_bitwise(a, b, name)
    assert_scales_bitwise(a, b, name)


__all__ = ["assert_codes_bitwise", "assert_scales_bitwise", "assert_qtensor_equal"]


# ----------------------------------------------------------------- RHT rounding test data
_FORMATS = {  # significand bits, smallest normal exponent, largest finite value
    torch.bfloat16: (8, -126, torch.finfo(torch.bfloat16).max),
    torch.float16: (11, -14, torch.finfo(torch.float16).max),
    torch.float32: (24, -126, torch.finfo(torch.float32).max),
}


def _round_scaled_int(n: int, shift: int, dtype: torch.dtype) -> float:
    """``n * 2^-shift`` rounded to nearest even in ``dtype`` (subnormals, overflow to inf)."""
    p, emin, big = _FORMATS[dtype]
    if n == 0:
        return 0.0
    a = abs(n)
    ulp = max(a.bit_length() - 1 - shift, emin) - (p - 1)  # exponent of the result's ulp
    sh = -shift - ulp
    if sh >= 0:
        r = a << sh
    else:
        r, rem = divmod(a, 1 << -sh)
        half = 1 << (-sh - 1)
        r += rem > half or (rem == half and r & 1)
    val = float(r) * 2.0**ulp if r else 0.0
    val = float("inf") if val > big else val
    return -val if n < 0 else val


def exact_rht(x: torch.Tensor, sign=None) -> torch.Tensor:
    """The 16-point RHT of ``x`` (rows of 16 along the last dimension), computed exactly in
    integers and rounded once, to nearest even, to ``x.dtype``: the correctly rounded
    transform, independent of :func:`..numerics.hadamard_transform` (slow: tests only)."""
    from .hadamard import RHT_SIZE, TE_RHT_SIGN

    d = [int(s) for s in (TE_RHT_SIGN if sign is None else sign)]
    # every finite BF16/FP16/FP32 is a multiple of 2^-149: v * 2^149 is an exact integer
    v = [[int(f * 2.0**149) for f in row] for row in x.double().reshape(-1, RHT_SIZE).tolist()]
    out = []
    for row in v:
        t = [d[i] * row[i] for i in range(RHT_SIZE)]
        for j in range(RHT_SIZE):
            e = sum(t[i] if bin(i & j).count("1") % 2 == 0 else -t[i] for i in range(RHT_SIZE))
            out.append(_round_scaled_int(e, 151, x.dtype))  # the 1/4 of D H / 4
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape).to(x.dtype)


def rht_tie_blocks(n: int, dtype: torch.dtype, sign=None, seed: int = 0) -> torch.Tensor:
    """[n, 16] blocks of ``dtype`` (BF16 or FP16) whose exact RHT outputs lie within half an
    FP32 ulp of a midpoint of ``dtype``, on both sides, where an FP32 sum rounds onto the
    midpoint itself (and rounding that to ``dtype`` goes to the even side, wrongly half the
    time).

    Each block holds ``4 d_i a`` (a a random ``dtype`` value with exponent E), ``4 d_j h``
    (h = 2^(E - p), half its ulp) and ``4 d_k delta`` (``|delta| = 2^(E - 25 - r)``, r >= 0,
    either sign) at three random positions, zeros elsewhere: every output is
    ``+-a +- h +- delta``, a midpoint plus a term below half an FP32 ulp. Every fourth block
    puts ``-a`` where ``h`` goes instead, ``+-a +- delta -+ a``: a sum that an FP32 butterfly
    rounds to 0 before the cancellation (exact: ``+-delta`` or ``+-2a +- delta``).
    """
    from .hadamard import RHT_SIZE, TE_RHT_SIGN

    d = [float(s) for s in (TE_RHT_SIGN if sign is None else sign)]
    g = torch.Generator().manual_seed(seed)
    p = _FORMATS[dtype][0]
    lo, hi = (-90, 90) if dtype == torch.bfloat16 else (0, 11)
    out = torch.zeros(n, RHT_SIZE, dtype=torch.float64)
    for b in range(n):
        e = int(torch.randint(lo, hi, (1,), generator=g))
        r = int(torch.randint(0, 8 if dtype == torch.bfloat16 else e + 1, (1,), generator=g))
        a = (1 + int(torch.randint(0, 2 ** (p - 1), (1,), generator=g)) / 2 ** (p - 1)) * 2.0**e
        delta = 2.0 ** (e - 25 - r) * (1 if b % 2 else -1)
        second = -a if b % 4 == 3 else 2.0 ** (e - p)
        i, j, k = torch.randperm(RHT_SIZE, generator=g)[:3].tolist()
        out[b, i], out[b, j], out[b, k] = 4 * d[i] * a, 4 * d[j] * second, 4 * d[k] * delta
    x = out.to(dtype)
    assert torch.equal(x.double(), out), "tie blocks must be exact in the dtype"
    return x


def rht_amax_tie_blocks(n: int, sign=None, seed: int = 0) -> torch.Tensor:
    """[n, 16] BF16 blocks whose exact RHT maximum is 1.2578125 while rounding the FP32 sum
    gives 1.25: ``4 d_i 1.25``, ``4 d_j 2^-8`` and ``4 d_k 2^-(25 + r)`` at three positions
    independent over GF(2) (so every sign combination occurs among the 16 outputs, the
    largest ``1.25 + 2^-8 + 2^-(25 + r)``, just above the midpoint 1.25390625). With a global
    amax of 107 (``S_enc / 6 = 4.1869``) the block's E4M3 scale is 5.5, not 5.0."""
    from .hadamard import RHT_SIZE, TE_RHT_SIGN

    d = [float(s) for s in (TE_RHT_SIGN if sign is None else sign)]
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, RHT_SIZE, dtype=torch.float64)
    for b in range(n):
        while True:
            i, j, k = torch.randperm(RHT_SIZE, generator=g)[:3].tolist()
            if i and j and k and k != i ^ j:
                break
        r = int(torch.randint(0, 8, (1,), generator=g))
        out[b, i], out[b, j], out[b, k] = 4 * d[i] * 1.25, 4 * d[j] * 2**-8, 4 * d[k] * 2.0 ** (
            -25 - r)
    return out.bfloat16()
