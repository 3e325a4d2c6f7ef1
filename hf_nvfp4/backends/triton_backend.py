"""The Triton backend: fused NVFP4 quantization kernels and emulated GEMMs (any CUDA GPU).

Returns exactly what :class:`ReferenceBackend` returns (codes, scales and global scales bit
for bit; GEMMs up to FP32 summation order) for NVFP4 QuantSpecs: 1x16 and 16x16 tiles, RHT
on the column copy, nearest and stochastic rounding. Other formats (MXFP4, FP8 block,
MXFP8) and unusual combinations fall back to the reference functions. Unlike the reference,
inputs are not checked for NaN/Inf (a full extra pass and a host sync): like hardware, the
kernels propagate them into the scales.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from ..kernels import require_triton
from ..kernels._common import interpreting
from ..numerics.quantize import QTensor
from ..numerics.rng import draw_seed, split_generator
from ..recipe import QuantSpec
from .reference import ReferenceBackend, reference_gemm

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_E4M3 = torch.float8_e4m3fn


@functools.cache
def _load_ops() -> ModuleType:
    """Import the custom ops once (compiling nothing); raises when Triton cannot run here."""
    require_triton()
    from ..kernels import ops

    return ops


def _is_nvfp4_1x16(spec: QuantSpec) -> bool:
    return spec.fmt == "nvfp4" and tuple(spec.tile) == (1, 16)


def _seed(spec: QuantSpec, generator: torch.Generator | None) -> int | None:
    return draw_seed(generator) if spec.rounding == "stochastic" else None


class TritonBackend:
    """Triton kernels for NVFP4; the reference functions for everything else."""

    name = "triton"

    def __init__(self) -> None:
        self._ops = _load_ops()
        self._reference = ReferenceBackend()

    @staticmethod
    def _on_device(t: torch.Tensor) -> bool:
        return t.device.type == "cuda" or (t.device.type == "cpu" and interpreting())

    def _runs_here(self, t: torch.Tensor) -> bool:
        return self._on_device(t) and t.dim() == 2 and t.numel() > 0 and t.dtype in _FLOATS

    def quantize_rowcol(
        self,
        x: torch.Tensor,
        row: QuantSpec | None,
        col: QuantSpec | None,
        generator: torch.Generator | None,
    ) -> tuple[QTensor | None, QTensor | None]:
        """See :meth:`Backend.quantize_rowcol` (one child generator per copy, as the reference)."""
        ok_row = row is None or (_is_nvfp4_1x16(row) and not row.rht)
        ok_col = col is None or _is_nvfp4_1x16(col)
        if not (ok_row and ok_col and self._runs_here(x)) or (row is None and col is None):
            return self._reference.quantize_rowcol(x, row, col, generator)
        g_row, g_col = split_generator(generator)
        row_seed = _seed(row, g_row) if row is not None else None
        col_seed = _seed(col, g_col) if col is not None else None
        sign = list(col.rht_sign) if col is not None and col.rht else None
        rd, rs, cd, cs, gs = self._ops.quantize_rowcol(
            x, row is not None, col is not None, sign, row_seed, col_seed
        )
        m, k = x.shape
        q_row = q_col = None
        if row is not None:
            q_row = QTensor(rd, rs.view(_E4M3), gs[0], "nvfp4", torch.Size((m, k)), x.dtype,
                            (1, 16), False)
        if col is not None:
            cols = -(-m // 16) * 16 if col.rht else m
            q_col = QTensor(cd, cs.view(_E4M3), gs[1], "nvfp4", torch.Size((k, cols)), x.dtype,
                            (1, 16), col.rht)
        return q_row, q_col

    def quantize_weight(self, w: torch.Tensor, spec: QuantSpec) -> tuple[QTensor, QTensor]:
        """See :meth:`Backend.quantize_weight`."""
        if spec.fmt != "nvfp4" or spec.rht or spec.rounding != "nearest" or not self._runs_here(w):
            return self._reference.quantize_weight(w, spec)
        if tuple(spec.tile) == (1, 16):
            q_w, q_wt = self.quantize_rowcol(w, spec, spec, None)
            return q_w, q_wt
        n, k = w.shape
        data, scale, data_t, scale_t, gs = self._ops.quantize_2d(w)
        s_dec = gs[0]
        q_w = QTensor(data, scale.view(_E4M3), s_dec, "nvfp4", torch.Size((n, k)), w.dtype,
                      (16, 16), False)
        q_wt = QTensor(data_t, scale_t.view(_E4M3), s_dec, "nvfp4", torch.Size((k, n)),
                       w.dtype, (16, 16), False)
        return q_w, q_wt

    def gemm(self, a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
        """See :meth:`Backend.gemm`."""
        fused = (
            a.fmt == b.fmt == "nvfp4"
            and a.global_scale is not None
            and b.global_scale is not None
            and a.data.dim() == b.data.dim() == 2
            and a.shape[0] > 0
            and b.shape[0] > 0
            and self._on_device(a.data)
        )
        if not fused:
            return reference_gemm(a, b, out_dtype)
        if a.data.shape[1] != b.data.shape[1]:
            raise ValueError(
                f"gemm operands disagree on the padded reduction dimension: "
                f"{a.data.shape[1] * 2} vs {b.data.shape[1] * 2}"
            )
        return self._ops.gemm(
            a.data, a.scale.view(torch.uint8), a.global_scale, a.shape[0],
            b.data, b.scale.view(torch.uint8), b.global_scale, b.shape[0], out_dtype,
        )
