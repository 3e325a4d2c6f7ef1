"""FP8 block-scaled GEMMs on Hopper's FP8 tensor cores (the paper's FP8 baseline).

``fp8_block`` QTensors (E4M3 elements, FP32 decode scales per 1x128 row block or per 128x128
tile) multiply through ``torch._scaled_mm`` with block scales: the scales are applied per
block. Hopper's FP8 tensor cores accumulate with fewer bits than FP32 (on the H200: ~2.3e-4
of the output's largest magnitude against the exact reference), so the result equals the
reference GEMM of exact block values up to :data:`ACCUMULATION_TOLERANCE`.

All three GEMMs run in ``_scaled_mm``'s 1x128 x 1x128 mode: ``scale_a`` the [M, K/128]
row-block scales with M fastest in memory (``sa.t().contiguous().t()``), ``scale_b`` the
[K/128, N] block scales of b with N fastest (torch's "outer-dim-major" for both operands).
A weight in 128x128 tiles enters that mode unchanged: its QTensor stores each tile's scale on
every row of the tile, which is the same product. (torch 2.11's 1x128 x 128x128 mode on the
H200 gave wrong results whenever K/128 was not a multiple of 4 and rejects the 16-byte
aligned padded layouts; checked there on 2026-12-02, where the 1x128 x 1x128 mode matched the
reference to 2.8e-4 at K = 384.)

Operands: ``fp8_block`` a [M, K] in 1x128 blocks and b [N, K] in 1x128 blocks or 128x128
tiles, rows in multiples of 16. Anything else, and whatever the installed torch rejects,
falls back to the reference GEMM. On first use per device and combination the path checks
itself against the reference on random data and stays off if they disagree.
"""

from __future__ import annotations

import warnings

import torch

from ..numerics.quantize import QTensor
from .base import cuda_capability_at_least

_BLOCK = 128
_ROW, _TILE = (1, _BLOCK), (_BLOCK, _BLOCK)
ACCUMULATION_TOLERANCE = 2e-3
"""Largest error of the FP8 path against the exact reference GEMM, relative to the output's
largest magnitude, that the self-check and tests accept (~9x the error measured on an H200)."""
_CHECKED: dict[tuple, bool] = {}


def block_scaled_mm_available(device: torch.device) -> tuple[bool, str]:
    """Whether FP8 ``_scaled_mm`` with block scales can run on ``device``, and why not."""
    return cuda_capability_at_least(device, 9, "FP8 tensor cores: Hopper")


def tile_scales(q: QTensor) -> torch.Tensor:
    """The FP32 decode scales of an ``fp8_block`` QTensor, one per block, as ``_scaled_mm``
    reads them: [rows, K/128] for 1x128 blocks, [rows/128, K/128] for 128x128 tiles (the
    QTensor repeats a tile's scale on each of its rows)."""
    if tuple(q.tile) == (_BLOCK, _BLOCK):
        return q.scale[::_BLOCK].contiguous()
    return q.scale


def fp8_block_gemm(a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor | None:
    """``a @ b^T`` [a rows, b rows] for ``fp8_block`` a [M, K] in 1x128 blocks and b [N, K]
    in 128x128 tiles or 1x128 blocks, or None when it cannot run here (see the module
    docstring)."""
    if (a.fmt, b.fmt, tuple(a.tile)) != ("fp8_block", "fp8_block", _ROW) or (
        tuple(b.tile) not in (_ROW, _TILE)
    ):
        return None
    if a.data.shape[1] != b.data.shape[1] or a.data.shape[0] % 16 or b.data.shape[0] % 16:
        return None
    if not _usable(a.data.device, tuple(b.tile)):
        return None
    return _scaled_mm(a, b, out_dtype)


def row_block_scales(a: QTensor) -> torch.Tensor:
    """``scale_a`` of ``_scaled_mm``: a's [M, K/128] 1x128-block scales, M-major in memory."""
    return a.scale.t().contiguous().t()


def row_block_scales_b(b: QTensor) -> torch.Tensor:
    """``scale_b`` of ``_scaled_mm``: b's [K/128, N] per-row block scales (a 128x128 tile's
    scale repeated on each of its rows), N fastest in memory."""
    return b.scale.t().contiguous()


def _scaled_mm(a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
    out = torch._scaled_mm(a.data, b.data.t(), scale_a=row_block_scales(a),
                           scale_b=row_block_scales_b(b), out_dtype=out_dtype)
    return out[: a.shape[0], : b.shape[0]]


def prepare(device: torch.device, b_tiles: tuple[tuple[int, int], ...]) -> None:
    """Run the availability and self-checks for ``device`` now, eagerly, so traced code
    (``torch.compile``, CUDA graphs) only reads their results: the self-check draws random
    data and syncs, which would break the graph."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    for tile in b_tiles:
        _usable(device, tile)


def _usable(device: torch.device, b_tile: tuple[int, int]) -> bool:
    """Available, accepted by this torch, and equal to the reference on a random case."""
    key = (device.type, device.index, tuple(b_tile))
    if key not in _CHECKED:
        _CHECKED[key] = block_scaled_mm_available(device)[0] and _self_check(device, b_tile)
    return _CHECKED[key]


def _self_check(device: torch.device, b_tile: tuple[int, int]) -> bool:
    """Whether ``_scaled_mm`` equals the reference on a random case (K = 384, not a multiple
    of 512); warns (once per device and combination) saying why not, since the fallback is
    the slow reference GEMM."""
    from ..numerics.quantize import quantize
    from .reference import reference_gemm

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(256, 384, device=device, generator=g) * 3
    w = torch.randn(272, 384, device=device, generator=g)
    qa = quantize(x, "fp8_block", tile=_ROW)
    qb = quantize(w, "fp8_block", tile=b_tile)
    what = f"1x128 x {b_tile[0]}x{b_tile[1]}"
    try:
        got = _scaled_mm(qa, qb, torch.float32)
    except (RuntimeError, NotImplementedError) as exc:  # a layout this torch does not support
        _warn_off(device, what, f"torch._scaled_mm rejected the block scales: {exc}")
        return False
    want = reference_gemm(qa, qb, torch.float32)
    err = ((got - want).abs().max() / want.abs().max()).item()
    if not err <= ACCUMULATION_TOLERANCE:
        _warn_off(device, what, f"its error against the reference is {err:.3g} of the output's "
                                f"largest magnitude (tolerance {ACCUMULATION_TOLERANCE})")
        return False
    return True


def _warn_off(device: torch.device, what: str, why: str) -> None:
    warnings.warn(
        f"hf_nvfp4: FP8 block-scaled GEMMs ({what} blocks) on {device} fail their self-check "
        f"({why}); those fp8_block GEMMs use the (slow) reference GEMM there. "
        f"torch {torch.__version__}.",
        RuntimeWarning, stacklevel=3,
    )


__all__ = [
    "ACCUMULATION_TOLERANCE", "block_scaled_mm_available", "fp8_block_gemm", "prepare",
    "row_block_scales",
    "row_block_scales_b", "tile_scales",
]
