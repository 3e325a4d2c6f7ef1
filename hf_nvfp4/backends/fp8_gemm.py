"""FP8 block-scaled GEMMs on Hopper's FP8 tensor cores (the paper's FP8 baseline).

``fp8_block`` QTensors (E4M3 elements, FP32 decode scales per 1x128 row block or per 128x128
tile) multiply through ``torch._scaled_mm`` with block scales: the scales are applied per
block. Hopper's FP8 tensor cores accumulate with fewer bits than FP32 (on the H200: ~2.3e-4
of the output's largest magnitude against the exact reference), so the result equals the
reference GEMM of exact block values up to :data:`ACCUMULATION_TOLERANCE`. Scale layouts
(checked on an H200 with torch 2.11, where 8192^3 ran in 0.84 ms against 1.55 ms in BF16):
``scale_a`` the [M, K/128] row-block scales laid out outer-dimension-major
(``sa.t().contiguous().t()``), ``scale_b`` the [N/128, K/128] tile scales zero-padded to
[N/128, L4] (L4: K/128 rounded up to a multiple of 4, which cuBLAS's 128x128 block scaling
requires; without it every K that is not a multiple of 512 gave wrong results on the H200)
and passed transposed with ``b``.

Only that combination (1x128 activations or gradients times 128x128 weight tiles: the
fprop and dgrad GEMMs) runs here; the wgrad GEMM (1x128 x 1x128) and anything the installed
torch rejects fall back to the reference GEMM. On first use per device the path checks
itself against the reference on random data and stays off if they disagree.
"""

from __future__ import annotations

import warnings

import torch

from ..numerics.quantize import QTensor
from .base import cuda_capability_at_least

_BLOCK = 128
ACCUMULATION_TOLERANCE = 2e-3
"""Largest error of the FP8 path against the exact reference GEMM, relative to the output's
largest magnitude, that the self-check and tests accept (~9x the error measured on an H200)."""
_CHECKED: dict[str, bool] = {}


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
    in 128x128 tiles, or None when it cannot run here (see the module docstring)."""
    if (a.fmt, b.fmt, tuple(a.tile), tuple(b.tile)) != (
        "fp8_block", "fp8_block", (1, _BLOCK), (_BLOCK, _BLOCK)
    ):
        return None
    if a.data.shape[1] != b.data.shape[1] or a.data.shape[0] % 16:
        return None
    if not _usable(a.data.device):
        return None
    return _scaled_mm(a, b, out_dtype)


def row_block_scales(a: QTensor) -> torch.Tensor:
    """``scale_a`` of ``_scaled_mm``: a's [M, K/128] 1x128-block scales, M-major in memory."""
    return a.scale.t().contiguous().t()


def weight_tile_scales(b: QTensor) -> torch.Tensor:
    """``scale_b`` of ``_scaled_mm``: b's 128x128 tile scales as cuBLAS reads them,
    [L4, N/128] with the K-block index fastest in memory, where L4 is K/128 rounded up to a
    multiple of 4 (the padding entries are zeros and multiply nothing)."""
    tiles = tile_scales(b)
    pad = -tiles.shape[1] % 4
    if pad:
        tiles = torch.nn.functional.pad(tiles, (0, pad))
    return tiles.t()


def _scaled_mm(a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
    out = torch._scaled_mm(a.data, b.data.t(), scale_a=row_block_scales(a),
                           scale_b=weight_tile_scales(b), out_dtype=out_dtype)
    return out[: a.shape[0], : b.shape[0]]


def _usable(device: torch.device) -> bool:
    """Available, accepted by this torch, and equal to the reference on a random case."""
    key = str(device)
    if key not in _CHECKED:
        _CHECKED[key] = block_scaled_mm_available(device)[0] and _self_check(device)
    return _CHECKED[key]


def _self_check(device: torch.device) -> bool:
    """Whether ``_scaled_mm`` equals the reference on a random case; warns (once per device)
    saying why not, since the fallback is the slow reference GEMM."""
    from ..numerics.quantize import quantize
    from .reference import reference_gemm

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(256, 384, device=device, generator=g) * 3
    w = torch.randn(256, 384, device=device, generator=g)
    qa = quantize(x, "fp8_block", tile=(1, _BLOCK))
    qb = quantize(w, "fp8_block", tile=(_BLOCK, _BLOCK))
    try:
        got = _scaled_mm(qa, qb, torch.float32)
    except (RuntimeError, NotImplementedError) as exc:  # a layout this torch does not support
        _warn_off(device, f"torch._scaled_mm rejected the block scales: {exc}")
        return False
    want = reference_gemm(qa, qb, torch.float32)
    err = ((got - want).abs().max() / want.abs().max()).item()
    if not err <= ACCUMULATION_TOLERANCE:
        _warn_off(device, f"its error against the reference is {err:.3g} of the output's largest "
                          f"magnitude (tolerance {ACCUMULATION_TOLERANCE})")
        return False
    return True


def _warn_off(device: torch.device, why: str) -> None:
    warnings.warn(
        f"hf_nvfp4: FP8 block-scaled GEMMs on {device} fail their self-check ({why}); "
        f"fp8_block GEMMs use the (slow) reference GEMM there. torch {torch.__version__}.",
        RuntimeWarning, stacklevel=3,
    )


__all__ = [
    "ACCUMULATION_TOLERANCE", "block_scaled_mm_available", "fp8_block_gemm", "row_block_scales",
    "tile_scales", "weight_tile_scales",
]
