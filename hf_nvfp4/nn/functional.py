"""The autograd function of a quantized linear layer ``y = x W^T + b``.

Three GEMMs, each operand quantized per its role (see :mod:`hf_nvfp4.recipe`):

* forward: ``y  = x_row @ W^T``          x [M, K] 1x16 RTN; W [N, K] 16x16 RTN
* dgrad:   ``dx = dy_row @ (W^T)^T``     dy [M, N] 1x16 SR; W^T [K, N] from W's tiles
* wgrad:   ``dW = dy_t @ x_t^T``         dy^T [N, M] and x^T [K, M] after the RHT along M

Only codes, scales and global scales are saved for backward, never high-precision
activations (unless the wgrad GEMM itself runs in high precision).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backends.base import Backend
from ..backends.reference import quantize_rowcol_reduced
from ..numerics.quantize import QTensor
from ..recipe import QuantSpec, RoleSpecs


@dataclass
class LinearContext:
    """What the functional op needs besides tensors: specs, backend, RNG, cached weight."""

    specs: RoleSpecs
    backend: Backend
    generator: torch.Generator | None
    w_q: tuple[QTensor, QTensor] | None
    w_dgrad_t: QTensor | None
    amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def rowcol(
        self, x: torch.Tensor, row: QuantSpec | None, col: QuantSpec | None,
        generator: torch.Generator | None,
    ) -> tuple[QTensor | None, QTensor | None]:
        """The backend's fused row/column quantization, or the amax-reduced reference path."""
        if self.amax_reduce is None:
            return self.backend.quantize_rowcol(x, row, col, generator)
        return quantize_rowcol_reduced(x, row, col, generator, self.amax_reduce)


_QT_FIELDS = ("data", "scale", "global_scale")


def _pack_qtensor(q: QTensor | None) -> tuple[list[torch.Tensor | None], object]:
    """Split a QTensor into tensors (for save_for_backward) and metadata."""
    if q is None:
        return [None, None, None], None
    meta = (q.fmt, q.shape, q.dtype, q.tile, q.rht)
    return [getattr(q, f) for f in _QT_FIELDS], meta


def _unpack_qtensor(tensors: list[torch.Tensor | None], meta: object) -> QTensor | None:
    if meta is None:
        return None
    fmt, shape, dtype, tile, rht = meta
    data, scale, global_scale = tensors
    return QTensor(data, scale, global_scale, fmt, shape, dtype, tile, rht)


class QuantizedLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with every GEMM executed by ``backend`` on quantized operands."""

    @staticmethod
    def forward(ctx, x, weight, bias, lctx: LinearContext):  # noqa: D102
        specs, backend = lctx.specs, lctx.backend
        out_shape = (*x.shape[:-1], weight.shape[0])
        x2 = x.reshape(-1, x.shape[-1])

        # forward: y = x_row @ W^T   (activations always round to nearest: no generator)
        q_x, q_x_t = lctx.rowcol(x2, specs.x, specs.x_t, None)
        if specs.x is None:
            y = x2 @ weight.t().to(x2.dtype)
        else:
            y = backend.gemm(q_x, lctx.w_q[0], x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)

        saved_x = x2 if specs.x_t is None else None
        saved_w = weight if specs.w_dgrad is None else None
        x_t_tensors, ctx.x_t_meta = _pack_qtensor(q_x_t)
        w_t_tensors, ctx.w_t_meta = _pack_qtensor(lctx.w_dgrad_t)
        ctx.save_for_backward(saved_x, saved_w, *x_t_tensors, *w_t_tensors)
        ctx.lctx = LinearContext(specs, backend, lctx.generator, None, None, lctx.amax_reduce)
        ctx.has_bias = bias is not None
        ctx.x_dtype, ctx.w_dtype, ctx.x_shape = x.dtype, weight.dtype, x.shape
        ctx.in_features = weight.shape[1]
        return y.reshape(out_shape)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        saved = ctx.saved_tensors
        x2, weight = saved[0], saved[1]
        q_x_t = _unpack_qtensor(list(saved[2:5]), ctx.x_t_meta)
        q_w_t = _unpack_qtensor(list(saved[5:8]), ctx.w_t_meta)
        specs, backend = ctx.lctx.specs, ctx.lctx.backend
        dy2 = dy.reshape(-1, dy.shape[-1])
        q_dy, q_dy_t = ctx.lctx.rowcol(dy2, specs.dy, specs.dy_t, ctx.lctx.generator)

        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # dgrad: dx = dy_row @ (W^T)^T
            if specs.dy is None:
                dx = dy2 @ weight.to(dy2.dtype)
            else:
                dx = backend.gemm(q_dy, q_w_t, ctx.x_dtype)
            dx = dx.to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            # wgrad: dW = dy_t @ x_t^T
            if specs.dy_t is None:
                dw = dy2.t().float() @ x2.float()
            else:
                dw = backend.gemm(q_dy_t, q_x_t, torch.float32)
            dw = dw.to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(ctx.w_dtype)
        return dx, dw, db, None


def quantized_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lctx: LinearContext
) -> torch.Tensor:
    """Functional form of :class:`QuantizedLinearFunction`."""
    return QuantizedLinearFunction.apply(x, weight, bias, lctx)
