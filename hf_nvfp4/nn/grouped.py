"""Grouped quantized linears: one weight matrix per group of rows (MoE experts).

``y[rows of group g] = x[rows of group g] @ W[g]^T + b[g]`` where ``x`` holds the rows
sorted by group and ``counts[g]`` says how many belong to group ``g``. Each group is an
independent quantized linear (the numerics of :func:`hf_nvfp4.nn.functional.quantized_linear`)
with its own tensor scales: the activation and gradient amaxes are taken over the rows routed
to that group in this call, the weight's over ``W[g]``. An expert's GEMMs are therefore
exactly what an :class:`~hf_nvfp4.nn.linear.NVFP4Linear` of that expert's weight would run on
the tokens routed to it, and a group's numerics do not depend on how many tokens the other
experts got.

All groups are one autograd node (:class:`QuantizedGroupedLinearFunction`), per group:

* forward: ``y_g  = x_row_g @ W_g^T``        x_g [M_g, K] 1x16 RTN; W_g [N, K] 16x16 RTN
* dgrad:   ``dx_g = dy_row_g @ (W_g^T)^T``   dy_g [M_g, N] 1x16 SR; W_g^T from W_g's tiles
* wgrad:   ``dW_g = dy_t_g @ x_t_g^T``       dy_g^T, x_g^T along M_g after the RHT

Two executions with the same codes and scales: on the ``triton`` backend with the paper's
NVFP4 roles, grouped kernels (:mod:`hf_nvfp4.kernels.grouped`) quantize every group's
copies in one launch per tensor and run every group's GEMM in one launch; otherwise each
group calls the plan's backend (quantize and GEMM) in turn.

Stochastic rounding draws from one key pair per group and GEMM stage, derived on the device
from the owner's ``[seed, step]`` state (:func:`expert_keys`).
"""

from __future__ import annotations

import torch

from ..backends import backend_instance
from ..kernels import interpreting
from ..numerics.rng import derive_keys, draw_seed, generator_keys
from ..recipe import QuantSpec
from .functional import LinearPlan, pack_qtensor, unpack_qtensor

# 16-bit inputs only: the grouped amax pass takes the RHT with the encode pass's butterfly,
# which gives the reference's bits for 16-bit inputs (exact products); FP32 groups run per group.
_FLOATS = (torch.bfloat16, torch.float16)


def expert_keys(
    state: torch.Tensor, rank: int, num_groups: int, stages: int
) -> torch.Tensor:
    """Advance ``state = [seed, step]`` by one call and return int32 keys
    [stages, num_groups, 2]: a distinct stream per data-parallel rank, stage and group."""
    with torch.no_grad():
        state[1] += 1
    streams = torch.arange(stages * num_groups, device=state.device, dtype=torch.int64)
    streams = streams + rank * stages * num_groups
    return derive_keys(state, streams, 2).view(stages, num_groups, 2)


def _nvfp4(spec: QuantSpec | None, tile: tuple[int, int], rht: bool | None = False) -> bool:
    return (spec is not None and spec.fmt == "nvfp4" and tuple(spec.tile) == tile
            and (rht is None or spec.rht == rht))


def _grouped_kernels_run(plan: LinearPlan, x: torch.Tensor, out_features: int) -> bool:
    """Whether the grouped Triton kernels run this call: the triton backend, the paper's
    NVFP4 roles (activations RTN, 2D weights shared by fprop and dgrad), no amax all-reduce,
    a BF16/FP16 ``x`` on a CUDA device (or the interpreter) and dimensions multiples of 16."""
    s = plan.specs
    return (
        plan.backend == "triton" and not plan.reduce_amax
        and _nvfp4(s.x, (1, 16)) and s.x.rounding == "nearest"
        and _nvfp4(s.w, (16, 16)) and s.w.rounding == "nearest" and s.w_dgrad == s.w
        and _nvfp4(s.dy, (1, 16)) and _nvfp4(s.dy_t, (1, 16), None)
        and _nvfp4(s.x_t, (1, 16), None) and s.x_t.rounding == "nearest"
        and x.dtype in _FLOATS and x.shape[1] % 16 == 0 and out_features % 16 == 0
        and (x.device.type == "cuda" or (x.device.type == "cpu" and interpreting()))
    )


def _sign(spec: QuantSpec) -> tuple[int, ...] | None:
    return tuple(spec.rht_sign) if spec.rht else None


def _fresh_keys(groups: int, device: torch.device) -> torch.Tensor:
    """int32 [groups, 2] keys from torch's default generator (SR asked for without keys)."""
    gen = torch.Generator().manual_seed(draw_seed())
    return generator_keys(gen, 2 * groups).view(groups, 2).to(device)


def _bias_grad(dy: torch.Tensor, counts: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``db[g] = sum of dy over g's rows`` in FP32, as one linear sums its rows."""
    db = dy.new_zeros((len(counts), dy.shape[1]), dtype=dtype)
    for g, (rows, n) in enumerate(zip(dy[: sum(counts)].split(counts), counts, strict=True)):
        if n:
            db[g] = rows.float().sum(0).to(dtype)
    return db


class _Batched:
    """The grouped Triton kernels: each step one launch for all groups."""

    @staticmethod
    def forward(ctx, x, w, keys, counts, plan):
        from ..kernels.grouped import (
            GroupLayout,
            grouped_amax,
            grouped_gemm,
            grouped_quantize_rowcol,
            grouped_quantize_weight,
        )

        specs = plan.specs
        layout = GroupLayout.build(counts, x.device)
        need_col = ctx.needs_input_grad[1]
        sign = _sign(specs.x_t)
        aw, w_vals, wt_data, wt_scale = grouped_quantize_weight(w)
        ax = grouped_amax(x, layout, True, need_col, sign)
        x_row, xt_data, xt_scale = grouped_quantize_rowcol(
            x, layout, ax, None, row=True, col=need_col, col_rht_sign=sign, row_sr=False,
            col_sr=False, col_values=False)
        # forward: y = x_row @ W^T   (per group)
        y = grouped_gemm(x_row, w_vals, torch.empty((x.shape[0], w.shape[1]), dtype=x.dtype,
                                                    device=x.device),
                         ax[:, 0], aw, layout, wgrad=False)
        ctx.save_for_backward(keys, ax, aw, wt_data, wt_scale, xt_data, xt_scale)
        ctx.layout = layout
        return y

    @staticmethod
    def backward(ctx, dy, w_shape, transposed):
        from ..kernels.dequantize import dequantize_fp4
        from ..kernels.grouped import grouped_amax, grouped_gemm, grouped_quantize_rowcol

        keys, ax, aw, wt_data, wt_scale, xt_data, xt_scale = ctx.saved_tensors
        layout, specs = ctx.layout, ctx.plan.specs
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        groups, n_out, k_in = w_shape
        sr = (need_dx and specs.dy.rounding == "stochastic",
              need_dw and specs.dy_t.rounding == "stochastic")
        if any(sr) and keys is None:
            keys = _fresh_keys(groups, dy.device)
        dy = dy.contiguous()
        sign = _sign(specs.dy_t)
        ady = grouped_amax(dy, layout, need_dx, need_dw, sign)
        dy_row, dy_col, _ = grouped_quantize_rowcol(
            dy, layout, ady, keys, row=need_dx, col=need_dw, col_rht_sign=sign,
            row_sr=sr[0], col_sr=sr[1], col_values=True)
        dx = dw = None
        if need_dx:
            # dgrad: dx = dy_row @ (W^T)^T   (W^T block values from the saved codes)
            wt_vals = dequantize_fp4(wt_data.view(groups * k_in, n_out // 2),
                                       wt_scale.view(groups * k_in, n_out // 16), None,
                                       groups * k_in).view(groups, k_in, n_out)
            dx = torch.empty((dy.shape[0], k_in), dtype=ctx.x_dtype, device=dy.device)
            grouped_gemm(dy_row, wt_vals, dx, ady[:, 0], aw, layout, wgrad=False)
            if sum(layout.counts) < dx.shape[0]:
                dx[sum(layout.counts):].zero_()
        if need_dw:
            # wgrad: dW = dy_t @ x_t^T   (every group's column copies: one flat buffer, whose
            # 16-element blocks each have their scale byte: dequantized as rows of 256)
            rows = xt_scale.numel() // 16
            xt_vals = dequantize_fp4(xt_data.view(rows, 128), xt_scale.view(rows, 16), None,
                                       rows).view(-1) if rows else dy_col
            shape = (groups, k_in, n_out) if transposed else (groups, n_out, k_in)
            dw = torch.empty(shape, dtype=ctx.w_dtype, device=dy.device)
            grouped_gemm(dy_col, xt_vals, dw.transpose(1, 2) if transposed else dw,
                         ady[:, 1], ax[:, 1], layout, wgrad=True)
        return dx, dw


class _PerGroup:
    """Each group through the plan's backend in turn (any backend and recipe)."""

    @staticmethod
    def forward(ctx, x, w, keys, counts, plan):
        specs, backend = plan.specs, backend_instance(plan.backend)
        need_col = ctx.needs_input_grad[1]
        outs, saved, metas = [], [], []
        for g, (rows, n) in enumerate(zip(x[: sum(counts)].split(counts), counts, strict=True)):
            if n == 0:
                continue
            q_w = plan.weight(w[g])
            q_x = plan.input(rows, col=need_col)
            # forward: y = x_row @ W^T
            outs.append(rows @ w[g].t().to(rows.dtype) if specs.x is None
                        else backend.gemm(q_x.row, q_w.row, x.dtype))
            for q in (q_x.col, q_w.col):
                tensors, meta = pack_qtensor(q)
                saved += tensors
                metas.append(meta)
        if sum(counts) < x.shape[0]:
            outs.append(x.new_zeros((x.shape[0] - sum(counts), w.shape[1])))
        y = torch.cat(outs) if outs else x.new_zeros((x.shape[0], w.shape[1]))
        ctx.save_for_backward(keys, x if specs.x_t is None else None,
                              w if specs.w_dgrad is None else None, *saved)
        ctx.metas = metas
        return y

    @staticmethod
    def backward(ctx, dy, w_shape, transposed):
        keys, x, w, *saved = ctx.saved_tensors
        counts, specs = ctx.counts, ctx.plan.specs
        backend = backend_instance(ctx.plan.backend)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        groups, n_out, k_in = w_shape
        dxs = []
        dw = dy.new_zeros((groups, k_in, n_out) if transposed else (groups, n_out, k_in),
                          dtype=ctx.w_dtype) if need_dw else None
        xs = x[: sum(counts)].split(counts) if x is not None else (None,) * groups
        i = 0
        for g, (dy_g, rows, n) in enumerate(zip(dy[: sum(counts)].split(counts), xs, counts,
                                                strict=True)):
            if n == 0:
                continue
            q_x_t, q_w_t = (unpack_qtensor(saved[3 * j:3 * j + 3], ctx.metas[j])
                            for j in (2 * i, 2 * i + 1))
            i += 1
            q = ctx.plan.grad_output(dy_g, keys[g] if keys is not None else None,
                                     row=need_dx, col=need_dw)
            q_dy, q_dy_t = q.row, q.col
            if need_dx:
                # dgrad: dx = dy_row @ (W^T)^T
                dxs.append(dy_g @ w[g].to(dy_g.dtype) if specs.dy is None
                           else backend.gemm(q_dy, q_w_t, ctx.x_dtype).to(ctx.x_dtype))
            if need_dw:
                # wgrad: dW = dy_t @ x_t^T
                dw_g = (dy_g.t().float() @ rows.float() if specs.dy_t is None
                        else backend.gemm(q_dy_t, q_x_t, ctx.w_dtype)).to(ctx.w_dtype)
                dw[g] = dw_g.t() if transposed else dw_g
        dx = None
        if need_dx:
            if sum(counts) < dy.shape[0]:
                dxs.append(dy.new_zeros((dy.shape[0] - sum(counts), k_in), dtype=ctx.x_dtype))
            dx = torch.cat(dxs) if dxs else dy.new_zeros((dy.shape[0], k_in), dtype=ctx.x_dtype)
        return dx, dw


class QuantizedGroupedLinearFunction(torch.autograd.Function):
    """Every group's quantized linear in one autograd node (see the module docstring).

    Inputs: ``x`` [S, in] rows sorted by group, ``weight`` [G, out, in] (or [G, in, out]
    with ``transposed``), ``bias`` [G, out] or None, ``keys`` int32 [G, 2] or None, host
    ``counts`` (a tuple), the :class:`LinearPlan` and ``transposed``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, keys, counts, plan, transposed):  # noqa: D102
        w = weight.detach()
        w = w.transpose(1, 2) if transposed else w  # [G, out, in]
        impl = _Batched if _grouped_kernels_run(plan, x, w.shape[1]) else _PerGroup
        ctx.impl, ctx.plan, ctx.counts, ctx.transposed = impl, plan, counts, transposed
        ctx.x_dtype, ctx.w_dtype, ctx.w_shape = x.dtype, weight.dtype, tuple(w.shape)
        ctx.has_bias = bias is not None
        y = impl.forward(ctx, x.contiguous(), w, keys, counts, plan)
        used = sum(counts)
        if impl is _Batched and used < y.shape[0]:
            y[used:].zero_()
        if bias is not None:  # as one linear: added to the GEMM output in its dtype
            ids = torch.repeat_interleave(
                torch.arange(len(counts), device=x.device),
                torch.tensor(counts, device=x.device), output_size=used)
            y[:used] += bias.to(y.dtype)[ids]
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        dx, dw = ctx.impl.backward(ctx, dy, ctx.w_shape, ctx.transposed)
        db = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = _bias_grad(dy, ctx.counts, ctx.w_dtype)
        return dx, dw, db, None, None, None, None


def quantized_grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    counts: list[int],
    plan: LinearPlan,
    keys: torch.Tensor | None = None,
    *,
    transposed: bool = False,
) -> torch.Tensor:
    """Per-group quantized linears over group-sorted rows, one autograd node.

    Args:
        x: [S, in] rows sorted by group; rows past ``sum(counts)`` (e.g. expert-parallel
            sentinels) give zero outputs.
        weight: [G, out, in] (or [G, in, out] with ``transposed``).
        bias: [G, out] or None.
        counts: rows per group (host ints), ``len(counts) == G``.
        plan: the :class:`LinearPlan` every group runs.
        keys: int32 [G, 2] stochastic-rounding keys per group, or None: stochastic copies
            then draw fresh keys from torch's default generator (not reproducible).

    Returns:
        [S, out] in ``x``'s dtype.
    """
    if len(counts) != weight.shape[0]:
        raise ValueError(
            f"counts has {len(counts)} groups but the weight has {weight.shape[0]} "
            f"(shape {tuple(weight.shape)})"
        )
    used = sum(counts)
    if used > x.shape[0]:
        raise ValueError(f"counts add up to {used} rows but x has {x.shape[0]}")
    return QuantizedGroupedLinearFunction.apply(x, weight, bias, keys, tuple(counts), plan,
                                                transposed)


__all__ = ["QuantizedGroupedLinearFunction", "expert_keys", "quantized_grouped_linear"]
