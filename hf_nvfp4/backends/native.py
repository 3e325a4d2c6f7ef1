"""The ``native`` backend: NVFP4 GEMMs on Blackwell tensor cores through ``torch._scaled_mm``.

Quantization is the Triton backend's (bit-identical to the reference); the GEMM hands the
packed codes to cuBLAS as ``torch.float4_e2m1fn_x2`` with the E4M3 block scales rearranged
into cuBLAS's block-scaling layout, and multiplies the FP32 output by the two global scales.

Written against the documented ``torch._scaled_mm`` FP4 path (torch >= 2.8, cuBLAS >= 12.8)
and cuBLAS's 1D block-scaling factor layout. NOT run on hardware: the project had no
Blackwell (sm100+) GPU as of 2026-11-23; on other GPUs the Triton backend is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..numerics.quantize import QTensor
from ..recipe import QuantSpec, RoleSpecs
from .base import Rng, cuda_capability_at_least

_TILE_ROWS, _TILE_COLS = 128, 4
_K_MULTIPLE, _ROW_MULTIPLE = 32, 16  # cuBLAS FP4 GEMM: K in 32s, M and N in 16s


def is_native_fp4_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether FP4 ``_scaled_mm`` can run on ``device``, and why not."""
    if not hasattr(torch, "float4_e2m1fn_x2") or not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no float4_e2m1fn_x2 / _scaled_mm"
    return cuda_capability_at_least(device, 10, "FP4 tensor cores: Blackwell")


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """Rearrange row-major block scales ``[rows, cols]`` into cuBLAS's block-scaling layout.

    The matrix is zero-padded to multiples of 128 rows and 4 columns and cut into 128x4
    tiles, tiles ordered row-major; inside a tile, row ``r`` (= ``32 * i + j``, ``i < 4``,
    ``j < 32``) and column ``c`` land at ``j * 16 + i * 4 + c``. Returns a flat tensor.
    """
    rows, cols = scales.shape
    padded = F.pad(scales.view(torch.uint8), (0, -cols % _TILE_COLS, 0, -rows % _TILE_ROWS))
    r_tiles, c_tiles = padded.shape[0] // _TILE_ROWS, padded.shape[1] // _TILE_COLS
    tiles = padded.view(r_tiles, _TILE_ROWS, c_tiles, _TILE_COLS).permute(0, 2, 1, 3)
    out = tiles.reshape(-1, 4, 32, _TILE_COLS).transpose(1, 2).reshape(-1)
    return out.view(scales.dtype)


def from_blocked(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`to_blocked` (cropping the padding)."""
    r_tiles, c_tiles = -(-rows // _TILE_ROWS), -(-cols // _TILE_COLS)
    tiles = flat.view(torch.uint8).reshape(-1, 32, 4, _TILE_COLS).transpose(1, 2)
    tiles = tiles.reshape(r_tiles, c_tiles, _TILE_ROWS, _TILE_COLS).permute(0, 2, 1, 3)
    full = tiles.reshape(r_tiles * _TILE_ROWS, c_tiles * _TILE_COLS)
    return full[:rows, :cols].contiguous().view(flat.dtype)


class NativeFP4Backend:
    """Triton quantization + cuBLAS FP4 GEMMs (Blackwell). Not run on hardware yet."""

    name = "native"

    def __init__(self) -> None:
        from .triton_backend import TritonBackend

        self._quantizer = TritonBackend()

    def prepare(self, specs: RoleSpecs, device: torch.device) -> None:
        """The Triton quantizer's one-time device setup (see :meth:`TritonBackend.prepare`):
        built eagerly here, not first inside a traced or CUDA-graphed step."""
        self._quantizer.prepare(specs, device)

    def quantize_rowcol(
        self,
        x: torch.Tensor,
        row: QuantSpec | None,
        col: QuantSpec | None,
        rng: Rng = None,
        *,
        amax: torch.Tensor | None = None,
        values: tuple[bool, bool] = (False, False),
    ) -> tuple[QTensor | None, QTensor | None]:
        """See :meth:`Backend.quantize_rowcol` (the Triton kernels; always packed: the FP4
        GEMM reads codes)."""
        return self._quantizer.quantize_rowcol(x, row, col, rng, amax=amax)

    def amax_rowcol(
        self, x: torch.Tensor, row: QuantSpec | None, col: QuantSpec | None
    ) -> torch.Tensor:
        """See :meth:`Backend.amax_rowcol` (the Triton kernel)."""
        return self._quantizer.amax_rowcol(x, row, col)

    def quantize_weight(
        self, w: torch.Tensor, spec: QuantSpec, *, amax: torch.Tensor | None = None,
        values: bool = False,
    ) -> tuple[QTensor, QTensor]:
        """See :meth:`Backend.quantize_weight` (the Triton kernels; always packed: the FP4
        GEMM reads codes)."""
        return self._quantizer.quantize_weight(w, spec, amax=amax)

    def gemm(self, a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
        """``a @ b^T`` on FP4 tensor cores; other formats use the Triton GEMM.

        cuBLAS's FP4 GEMM needs the reduction dimension in multiples of 32 and the outer ones
        in multiples of 16: operands are zero-padded (zero codes with zero block scales add
        nothing) and the output is cropped, so a 1,000-token micro-batch works.
        """
        if a.fmt != "nvfp4" or b.fmt != "nvfp4":
            return self._quantizer.gemm(a, b, out_dtype)
        if a.data.shape[-1] != b.data.shape[-1]:
            raise ValueError(
                f"gemm operands disagree on the padded reduction dimension: "
                f"{2 * a.data.shape[-1]} vs {2 * b.data.shape[-1]}"
            )
        a_data, a_scale = pad_operand(a.data, a.scale)
        b_data, b_scale = pad_operand(b.data, b.scale)
        fp4 = torch.float4_e2m1fn_x2
        out = torch._scaled_mm(
            a_data.view(fp4),
            b_data.view(fp4).t(),
            scale_a=to_blocked(a_scale),
            scale_b=to_blocked(b_scale),
            out_dtype=torch.float32,
        )
        out = out * (a.global_scale * b.global_scale)
        return out[: a.shape[0], : b.shape[0]].to(out_dtype)


def pad_operand(
    data: torch.Tensor, scale: torch.Tensor, rows: int = _ROW_MULTIPLE, k: int = _K_MULTIPLE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes [R, K/2] and block scales [R, K/16] zero-padded to rows a multiple of
    ``rows`` and K a multiple of ``k`` (no copy when already aligned)."""
    pad_r = -data.shape[0] % rows
    pad_k = -(2 * data.shape[1]) % k
    if not (pad_r or pad_k):
        return data, scale
    data = F.pad(data, (0, pad_k // 2, 0, pad_r))
    scale = F.pad(scale.view(torch.uint8), (0, pad_k // 16, 0, pad_r)).view(scale.dtype)
    return data, scale
