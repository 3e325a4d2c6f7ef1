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
