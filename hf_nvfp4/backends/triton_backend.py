"""The Triton backend: fused NVFP4 quantization kernels and emulated GEMMs (any CUDA GPU).

Returns exactly what :class:`ReferenceBackend` returns (codes, scales and global scales bit
for bit; GEMMs up to FP32 summation order) for NVFP4 QuantSpecs: 1x16 and 16x16 tiles, RHT
on the column copy, nearest and stochastic rounding; for MXFP4 QuantSpecs (1x32 blocks with
RHT on the column copy and nearest or stochastic rounding, :mod:`..kernels.quantize_mxfp4`;
32x32 weight tiles, :mod:`..kernels.quantize_2d`); and for FP8 block QuantSpecs (1x128
blocks and 128x128 tiles, nearest rounding, no RHT: :mod:`..kernels.quantize_fp8`). Other
formats (MXFP8) and unusual combinations quantize with the reference functions (with an FP8
block or MXFP4 copy and one of another format, each copy takes its own path); their GEMMs
run on tensor cores where that is exact up to summation order: MXFP4 block values (an E2M1
value times a power of two) are exact in BF16 and go through the same Triton GEMM as NVFP4,
FP8 block operands through Hopper's FP8 block-scaled GEMM (:mod:`.fp8_gemm`). Unlike the
reference, inputs are not checked for NaN/Inf (a full extra pass and a host sync): like
hardware, the kernels propagate them into the scales.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from ..kernels import interpreting, require_triton
from ..numerics.quantize import QTensor
from ..numerics.rng import draw_seed
from ..recipe import QuantSpec, RoleSpecs
from .base import BlockValues, Operand, Rng, as_keys
from .fp8_gemm import fp8_block_gemm
from .fp8_gemm import prepare as fp8_prepare
from .reference import ReferenceBackend, reference_amax_rowcol, reference_gemm

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _load_ops() -> ModuleType:
    """Import the custom ops once (compiling nothing); raises when Triton cannot run here."""
    require_triton()
    from ..kernels import ops

    return ops


def _is_nvfp4_1x16(spec: QuantSpec) -> bool:
    return spec.fmt == "nvfp4" and tuple(spec.tile) == (1, 16)


def _is_fp8_block(spec: QuantSpec, tile: tuple[int, int] = (1, 128)) -> bool:
    """An ``fp8_block`` spec the FP8 kernels quantize: ``tile``, nearest, no RHT."""
    return (spec.fmt == "fp8_block" and tuple(spec.tile) == tile and not spec.rht
            and spec.rounding == "nearest")


def _is_mxfp4(spec: QuantSpec, tile: tuple[int, int] = (1, 32)) -> bool:
    """An ``mxfp4`` spec of ``tile`` (the kernels' other limits are checked by the caller)."""
    return spec.fmt == "mxfp4" and tuple(spec.tile) == tile


def _tile_pair(
    w: torch.Tensor, spec: QuantSpec, data: torch.Tensor, scale: torch.Tensor,
    data_t: torch.Tensor, scale_t: torch.Tensor, global_scale: torch.Tensor | None = None,
) -> tuple[QTensor, QTensor]:
    """W [N, K] and W^T [K, N] in ``spec``'s square tiles, as a 2D weight kernel wrote them."""
    n, k = w.shape
    return (QTensor(data, scale, global_scale, spec.fmt, torch.Size((n, k)), w.dtype,
                    tuple(spec.tile)),
            QTensor(data_t, scale_t, global_scale, spec.fmt, torch.Size((k, n)), w.dtype,
                    tuple(spec.tile)))


def _fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(draw_seed())


def _sr(spec: QuantSpec | None) -> bool:
    return spec is not None and spec.rounding == "stochastic"


class TritonBackend:
    """Triton kernels for NVFP4, MXFP4 and FP8 block; the reference functions for the rest."""

    name = "triton"

    def __init__(self) -> None:
        self._ops = _load_ops()
        self._reference = ReferenceBackend(check_finite=False)

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
        rng: Rng = None,
        *,
        amax: torch.Tensor | None = None,
        values: tuple[bool, bool] = (False, False),
    ) -> tuple[Operand | None, Operand | None]:
        """See :meth:`Backend.quantize_rowcol`: one encode pass for both copies (taking the
        amaxes itself unless ``amax`` is given); ``values`` copies come back as BlockValues."""
        if not self._fast(x, row, col):
            if self._fast_fp8(x, row, col):  # fp8_block has no global scale: amax unused
                return self._quantize_rowcol_fp8(x, row, col)
            if self._fast_mx(x, row, col):  # nor has MXFP4
                return self._quantize_rowcol_mx(x, row, col, rng)
            if row is not None and col is not None and any(
                fast(x, *copies) for fast in (self._fast_fp8, self._fast_mx)
                for copies in ((row, None), (None, col))
            ):  # an FP8 or MXFP4 copy and one of another format: each its own path (a copy
                # draws with its own key and encodes with its own amax, alone or not; a
                # generator gives its keys once, for both)
                rng = as_keys(rng, x.device)
                q_row = self.quantize_rowcol(x, row, None, rng, amax=amax, values=values)[0]
                q_col = self.quantize_rowcol(x, None, col, rng, amax=amax, values=values)[1]
                return q_row, q_col
            return self._reference.quantize_rowcol(x, row, col, rng, amax=amax)
        keys = None
        if _sr(row) or _sr(col):  # no keys given: fresh ones from torch's default generator
            keys = as_keys(rng if rng is not None else _fresh_generator(), x.device)
        sign = list(col.rht_sign) if col is not None and col.rht else None
        want_row, want_col = values
        rd, rs, cd, cs, gs = self._ops.quantize_rowcol(
            x, row is not None, col is not None, sign, _sr(row), _sr(col), keys, amax,
            want_row, want_col,
        )
        m, k = x.shape
        q_row = q_col = None
        if row is not None:
            q_row = BlockValues(rd, gs[0]) if want_row else QTensor(
                rd, rs, gs[0], "nvfp4", torch.Size((m, k)), x.dtype, (1, 16), False
            )
        if col is not None:
            cols = -(-m // 16) * 16 if col.rht else m
            q_col = BlockValues(cd, gs[1]) if want_col else QTensor(
                cd, cs, gs[1], "nvfp4", torch.Size((k, cols)), x.dtype, (1, 16),
                col.rht,
            )
        return q_row, q_col

    def _fast_fp8(self, x: torch.Tensor, row: QuantSpec | None, col: QuantSpec | None) -> bool:
        """Whether the FP8 kernels quantize these copies of ``x`` (fp8_block 1x128 blocks,
        nearest, no RHT, a 2D float tensor on the GPU)."""
        return ((row is None or _is_fp8_block(row)) and (col is None or _is_fp8_block(col))
                and (row is not None or col is not None) and self._runs_here(x))

    def _quantize_rowcol_fp8(
        self, x: torch.Tensor, row: QuantSpec | None, col: QuantSpec | None
    ) -> tuple[QTensor | None, QTensor | None]:
        """The fp8_block row copy of ``x`` and column copy of ``x^T`` in one pass."""
        rd, rs, cd, cs = self._ops.quantize_rowcol_fp8(x, row is not None, col is not None)
        m, k = x.shape
        q_row = q_col = None
        if row is not None:
            q_row = QTensor(rd, rs, None, "fp8_block", torch.Size((m, k)), x.dtype, (1, 128))
        if col is not None:
            q_col = QTensor(cd, cs, None, "fp8_block", torch.Size((k, m)), x.dtype, (1, 128))
        return q_row, q_col

    def _fast_mx(self, x: torch.Tensor, row: QuantSpec | None, col: QuantSpec | None) -> bool:
        """Whether the MXFP4 kernel quantizes these copies of ``x`` (1x32 blocks, RHT only on
        the column copy, any rounding, a 2D float tensor on the GPU)."""
        return ((row is None or (_is_mxfp4(row) and not row.rht))
                and (col is None or _is_mxfp4(col))
                and (row is not None or col is not None) and self._runs_here(x))

    def _quantize_rowcol_mx(
        self, x: torch.Tensor, row: QuantSpec | None, col: QuantSpec | None, rng: Rng
    ) -> tuple[QTensor | None, QTensor | None]:
        """The MXFP4 row copy of ``x`` and column copy of ``x^T`` in one pass (always packed
        QTensors: MXFP4 operands reach the GEMM as QTensors, see :meth:`gemm`)."""
        keys = None
        if _sr(row) or _sr(col):  # no keys given: fresh ones from torch's default generator
            keys = as_keys(rng if rng is not None else _fresh_generator(), x.device)
        sign = list(col.rht_sign) if col is not None and col.rht else None
        rd, rs, cd, cs = self._ops.quantize_rowcol_mxfp4(
            x, row is not None, col is not None, sign, _sr(row), _sr(col), keys)
        m, k = x.shape
        q_row = q_col = None
        if row is not None:
            q_row = QTensor(rd, rs, None, "mxfp4", torch.Size((m, k)), x.dtype, (1, 32))
        if col is not None:
            cols = -(-m // 32) * 32 if col.rht else m  # the RHT mixes the padding in
            q_col = QTensor(cd, cs, None, "mxfp4", torch.Size((k, cols)), x.dtype, (1, 32),
                            col.rht)
        return q_row, q_col

    def amax_rowcol(
        self, x: torch.Tensor, row: QuantSpec | None, col: QuantSpec | None
    ) -> torch.Tensor:
        """See :meth:`Backend.amax_rowcol`: one Triton pass for both copies."""
        if not self._fast(x, row, col):
            return reference_amax_rowcol(x, row, col)
        sign = list(col.rht_sign) if col is not None and col.rht else None
        return self._ops.amax_rowcol(x, row is not None, col is not None, sign)

    def _fast(self, x: torch.Tensor, row: QuantSpec | None, col: QuantSpec | None) -> bool:
        """Whether the kernels quantize these copies of ``x`` (NVFP4 1x16, RHT only on the
        column copy, a 2D float tensor on the GPU)."""
        ok_row = row is None or (_is_nvfp4_1x16(row) and not row.rht)
        ok_col = col is None or _is_nvfp4_1x16(col)
        return ok_row and ok_col and self._runs_here(x) and (row is not None or col is not None)

    def prepare(self, specs: RoleSpecs, device: torch.device) -> None:
        """Build the constant device tensors the kernels of ``specs`` read on ``device`` (the
        RHT matrices of the amax pass) now, eagerly: first built inside a CUDA graph's warm-up,
        a cached tensor would live in the graph's memory pool without being one of its
        outputs, which torch's CUDA graph trees refuse. Likewise the FP8 GEMMs' self-check,
        which would break a traced graph."""
        # the FP8 GEMM path's one-time checks (1x128 operands; the weight's tiles): their
        # cached answer is a side effect that a traced autograd.Function cannot contain
        roles = (specs.x, specs.w, specs.dy, specs.dy_t, specs.x_t, specs.w_dgrad)
        if any(s is not None and s.fmt == "fp8_block" for s in roles):
            fp8_prepare(device, ((1, 128), (128, 128)))
        if torch.device(device).type != "cuda":
            return
        for spec in (specs.x_t, specs.dy_t):
            if spec is not None and spec.rht and _is_nvfp4_1x16(spec):
                self._ops.prepare_rht(tuple(spec.rht_sign), torch.device(device))

    def quantize_weight(
        self, w: torch.Tensor, spec: QuantSpec, *, amax: torch.Tensor | None = None,
        values: bool = False,
    ) -> tuple[Operand, QTensor]:
        """See :meth:`Backend.quantize_weight` (``amax`` matters to NVFP4 only: the other
        formats have no global scale; ``values`` to NVFP4 on the kernels only)."""
        if _is_fp8_block(spec, (128, 128)) and self._runs_here(w):
            return _tile_pair(w, spec, *self._ops.quantize_2d_fp8(w))
        if _is_fp8_block(spec) and self._runs_here(w):
            return self._quantize_rowcol_fp8(w, spec, spec)
        if spec.fmt == "mxfp4" and not spec.rht and not _sr(spec) and self._runs_here(w):
            if _is_mxfp4(spec, (32, 32)):
                return _tile_pair(w, spec, *self._ops.quantize_2d_mxfp4(w))
            return self._quantize_rowcol_mx(w, spec, spec, None)
        if spec.fmt != "nvfp4" or spec.rht or spec.rounding != "nearest" or not self._runs_here(w):
            return self._reference.quantize_weight(w, spec, amax=amax)
        if tuple(spec.tile) == (1, 16):
            pair = None if amax is None else amax.float().reshape(1).repeat(2)
            return self.quantize_rowcol(w, spec, spec, amax=pair, values=(values, False))
        amax = None if amax is None else amax.float().reshape(1)
        data, scale, data_t, scale_t, gs = self._ops.quantize_2d(w, amax, values)
        w_q, w_t = _tile_pair(w, spec, data, scale, data_t, scale_t, gs[0])
        return (BlockValues(data, gs[0]) if values else w_q), w_t

    def gemm(self, a: Operand, b: Operand, out_dtype: torch.dtype) -> torch.Tensor:
        """See :meth:`Backend.gemm`: dequantize packed FP4 operands (NVFP4, MXFP4) to BF16
        block values, then one Triton GEMM that applies both global scales in its epilogue;
        FP8 block operands on the FP8 tensor cores where they run."""
        if not (self._fused(a) and self._fused(b)):
            if isinstance(a, QTensor) and isinstance(b, QTensor):
                out = fp8_block_gemm(a, b, out_dtype)  # FP8 tensor cores where they run
                if out is not None:
                    return out
            return reference_gemm(a, b, out_dtype)
        av, bv = self._values(a), self._values(b)
        if av.shape[1] != bv.shape[1]:
            raise ValueError(
                f"gemm operands disagree on the padded reduction dimension: "
                f"{av.shape[1]} vs {bv.shape[1]}"
            )
        if av.shape[0] == 0 or bv.shape[0] == 0:
            return av.new_zeros((av.shape[0], bv.shape[0]), dtype=out_dtype)
        return self._ops.gemm_scaled_op(av, bv, self._global(a, av), self._global(b, av),
                                        out_dtype)

    def _fused(self, q: Operand) -> bool:
        """Operands the dequantize-then-GEMM path reads: block values, NVFP4 with its global
        scale and MXFP4 (no global scale), 2D on this backend's device. Their block values
        are exact in BF16 (see :mod:`..kernels.dequantize`)."""
        if isinstance(q, BlockValues):
            return True
        nvfp4 = q.fmt == "nvfp4" and q.global_scale is not None
        mxfp4 = q.fmt == "mxfp4" and q.global_scale is None
        return (nvfp4 or mxfp4) and q.data.dim() == 2 and self._on_device(q.data)

    @staticmethod
    def _global(q: Operand, like: torch.Tensor) -> torch.Tensor:
        if q.global_scale is not None:
            return q.global_scale
        return torch.ones((), dtype=torch.float32, device=like.device)

    def _values(self, q: Operand) -> torch.Tensor:
        if isinstance(q, BlockValues):
            return q.values
        return self._ops.dequantize(q.data, q.scale, None, q.shape[0], torch.bfloat16,
                                    q.format.block)
