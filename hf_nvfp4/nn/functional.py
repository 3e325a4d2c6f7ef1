"""The autograd function of a quantized linear layer ``y = x W^T + b``.

Three GEMMs, each operand quantized per its role (see :mod:`hf_nvfp4.recipe`):

* forward: ``y  = x_row @ W^T``          x [M, K] 1x16 RTN; W [N, K] 16x16 RTN
* dgrad:   ``dx = dy_row @ (W^T)^T``     dy [M, N] 1x16 SR; W^T [K, N] from W's tiles
* wgrad:   ``dW = dy_t @ x_t^T``         dy^T [N, M] and x^T [K, M] after the RHT along M

Only codes, scales and global scales are saved for backward, never high-precision
activations (unless the wgrad GEMM itself runs in high precision). Copies that a GEMM reads
at once (x_row, W, dy_row, dy_t) may come from the backend as BF16 block values, which its
GEMM reads without a dequantize pass.

Everything the op needs besides tensors is a hashable :class:`LinearPlan` decided once per
layer, holding one :class:`~hf_nvfp4.quant.quantizer.Quantizer` per tensor role (input,
weight, output gradient), and the stochastic-rounding keys are a device tensor: the op traces
under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backends import backend_instance, resolve_backend
from ..numerics.quantize import QTensor, transpose_tiles
from ..quant.fsdp import GatheredWeight, gathered_weight, master_tensor
from ..quant.quantizer import Quantized, Quantizer
from ..quant.shared import quantize_input
from ..recipe import RoleSpecs


@dataclass(frozen=True)
class LinearPlan:
    """The per-layer decisions of a quantized linear (hashable, compile-constant).

    Attributes:
        specs: the QuantSpec of every tensor role.
        backend: the resolved backend name (never ``"auto"``).
        reduce_amax: all-reduce (max) each activation/gradient amax across ranks.
        share_input: reuse the quantized input of the previous layer that read the same
            tensor (:mod:`hf_nvfp4.quant.shared`).
        input / weight / grad_output: the :class:`~hf_nvfp4.quant.quantizer.Quantizer` of
            each role, built from the above.
    """

    specs: RoleSpecs
    backend: str
    reduce_amax: bool = False
    share_input: bool = True
    input: Quantizer = field(init=False, repr=False, compare=False)
    weight: Quantizer = field(init=False, repr=False, compare=False)
    grad_output: Quantizer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s, b, r = self.specs, self.backend, self.reduce_amax
        # x_row, W and dy_row/dy_t are read at once by their GEMM: block values where the
        # backend has them; x^T and W^T are saved for backward: packed.
        quantizers = {
            "input": Quantizer("input", s.x, s.x_t, b, r, values=(True, False)),
            "weight": Quantizer("weight", s.w, s.w_dgrad, b, values=(True, False)),
            "grad_output": Quantizer("grad_output", s.dy, s.dy_t, b, r, values=(True, True)),
        }
        for name, q in quantizers.items():
            object.__setattr__(self, name, q)


def build_plan(
    specs: RoleSpecs, backend: str, device: torch.device | str, *, reduce_amax: bool = False,
    share_input: bool = False, layer: torch.nn.Module | None = None,
) -> LinearPlan:
    """The :class:`LinearPlan` of ``specs`` on ``device``, its backend set up for it.

    ``backend`` is resolved for ``device`` (``"auto"`` picks; a backend that cannot run on
    this machine raises with the reason). The backend's one-time setup happens here, never
    inside a traced forward, CUDA graph or autograd Function: a backend that runs whole
    layers (te) attaches to ``layer`` when one is given, the others prepare their kernels (the
    FP8 GEMM's checks). Every quantized layer builds its plans here and caches them per device.
    """
    dev = torch.device(device)
    plan = LinearPlan(specs, resolve_backend(backend, dev), reduce_amax, share_input)
    instance = backend_instance(plan.backend)
    if layer is not None and hasattr(instance, "attach"):
        instance.attach(layer)
    elif hasattr(instance, "prepare"):
        instance.prepare(plan.specs, dev)
    return plan


_QT_FIELDS = ("data", "scale", "global_scale")


def pack_qtensor(q: QTensor | None) -> tuple[list[torch.Tensor | None], object]:
    """Split a QTensor into tensors (for save_for_backward) and metadata."""
    if q is None:
        return [None, None, None], None
    meta = (q.fmt, q.shape, q.dtype, q.tile, q.rht)
    tensors = [getattr(q, f) for f in _QT_FIELDS]
    gs = tensors[2]
    if gs is not None and gs._base is not None and torch.compiler.is_compiling():
        # An element of a kernel's [2] output: a view of an op's output cannot leave a
        # compiled autograd.Function (eager saves the view: 8 bytes, no extra launch).
        tensors[2] = gs.clone()
    return tensors, meta


def unpack_qtensor(tensors: list[torch.Tensor | None], meta: object) -> QTensor | None:
    """The QTensor :func:`pack_qtensor` split (None when it was None)."""
    if meta is None:
        return None
    fmt, shape, dtype, tile, rht = meta
    data, scale, global_scale = tensors
    return QTensor(data, scale, global_scale, fmt, shape, dtype, tile, rht)


def _quantize_weight(weight: torch.Tensor, plan: LinearPlan) -> Quantized:
    """W and W^T per the plan, by the plan's weight quantizer; for the codes FSDP2 gathered
    (:mod:`hf_nvfp4.quant.fsdp`) W alone: the backward transposes the tiles FSDP2 gathers
    again (or kept), so no W^T is saved."""
    if isinstance(weight, GatheredWeight):
        return Quantized(gathered_weight(weight, plan.specs.w, plan.specs.w_dgrad), None)
    return plan.weight(master_tensor(weight).detach())


class QuantizedLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with every GEMM executed by the plan's backend on quantized operands."""

    @staticmethod
    def forward(ctx, x, weight, bias, keys, plan: LinearPlan):  # noqa: D102
        specs = plan.specs
        backend = backend_instance(plan.backend)
        x2 = x.reshape(-1, x.shape[-1])
        w = _quantize_weight(weight, plan)
        need_col = ctx.needs_input_grad[1]

        # forward: y = x_row @ W^T   (activations round to nearest: no keys)
        q_x = quantize_input(
            x, (plan, need_col), lambda: plan.input(x2, col=need_col), plan.share_input
        )
        if specs.x is None:
            y = x2 @ weight.t().to(x2.dtype)
        else:
            y = backend.gemm(q_x.row, w.row, x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)

        saved_x = x2 if specs.x_t is None else None
        saved_w = weight if specs.w_dgrad is None else None
        x_t_tensors, ctx.x_t_meta = pack_qtensor(q_x.col)
        # FSDP2's gathered codes: save W's buffers (FSDP2 refills them for the backward, or
        # keeps them); the backward transposes their tiles
        ctx.gathered = isinstance(weight, GatheredWeight)
        w_t_tensors, ctx.w_t_meta = pack_qtensor(w.row if ctx.gathered else w.col)
        ctx.save_for_backward(saved_x, saved_w, keys, *x_t_tensors, *w_t_tensors)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        ctx.x_dtype, ctx.w_dtype, ctx.x_shape = x.dtype, weight.dtype, x.shape
        # 2D and not a view: a view made in here could not be modified in place by the
        # caller (Falcon adds into its MLP output); :func:`quantized_linear` reshapes outside.
        return y.clone() if y._base is not None else y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        saved = ctx.saved_tensors
        x2, weight, keys = saved[0], saved[1], saved[2]
        q_x_t = unpack_qtensor(list(saved[3:6]), ctx.x_t_meta)
        q_w_t = unpack_qtensor(list(saved[6:9]), ctx.w_t_meta)
        plan = ctx.plan
        specs, backend = plan.specs, backend_instance(plan.backend)
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        q = plan.grad_output(dy2, keys, row=need_dx, col=need_dw)
        q_dy, q_dy_t = q.row, q.col

        dx = dw = db = None
        if need_dx:
            # dgrad: dx = dy_row @ (W^T)^T
            if specs.dy is None:
                dx = dy2 @ weight.to(dy2.dtype)
            else:
                if ctx.gathered:
                    q_w_t = transpose_tiles(q_w_t)
                dx = backend.gemm(q_dy, q_w_t, ctx.x_dtype)
            dx = dx.to(ctx.x_dtype).reshape(ctx.x_shape)
        if need_dw:
            # wgrad: dW = dy_t @ x_t^T
            if specs.dy_t is None:
                dw = dy2.t().float() @ x2.float()
            else:  # FP32 accumulation, rounded once to the weight's dtype in the epilogue
                dw = backend.gemm(q_dy_t, q_x_t, ctx.w_dtype)
            dw = dw.to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(ctx.w_dtype)
        return dx, dw, db, None, None


def quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: LinearPlan,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Functional form of :class:`QuantizedLinearFunction`.

    ``keys``: int32 [2] stochastic-rounding keys of this call on x's device (row copy of dy,
    column copy of dy^T), e.g. from :func:`hf_nvfp4.quant.sr.advance_keys`; None: the
    recipe's stochastic copies draw fresh keys from torch's default generator (not
    reproducible).
    """
    y = QuantizedLinearFunction.apply(x, weight, bias, keys, plan)
    return y.reshape(*x.shape[:-1], weight.shape[0])
