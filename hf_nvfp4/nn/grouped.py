"""Grouped quantized linears: one weight matrix per group of rows (MoE experts).

``y[rows of group g] = x[rows of group g] @ W[g]^T + b[g]`` where ``x`` holds the rows
sorted by group and ``counts[g]`` says how many belong to group ``g``. Each group is an
independent quantized linear (:func:`hf_nvfp4.nn.functional.quantized_linear`) with its own
tensor scales: the activation and gradient amaxes are taken over the rows routed to that
group in this call, the weight's over ``W[g]``. An expert's GEMMs are therefore exactly what
an :class:`~hf_nvfp4.nn.linear.NVFP4Linear` of that expert's weight would run on the tokens
routed to it, and a group's numerics do not depend on how many tokens the other experts got.

Stochastic rounding draws from one key pair per group and GEMM stage, derived on the device
from the owner's ``[seed, step]`` state (:func:`expert_keys`).
"""

from __future__ import annotations

import torch

from ..numerics.rng import derive_keys
from .functional import LinearPlan, quantized_linear


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
    """Per-group quantized linears over group-sorted rows.

    Args:
        x: [S, in] rows sorted by group; rows past ``sum(counts)`` (e.g. expert-parallel
            sentinels) give zero outputs.
        weight: [G, out, in] (or [G, in, out] with ``transposed``).
        bias: [G, out] or None.
        counts: rows per group (host ints), ``len(counts) == G``.
        plan: the :class:`LinearPlan` every group runs.
        keys: int32 [G, 2] stochastic-rounding keys per group, or None (no SR).

    Returns:
        [S, out] in ``x``'s dtype.
    """
    if len(counts) != weight.shape[0]:
        raise ValueError(
            f"counts has {len(counts)} groups but the weight has {weight.shape[0]} "
            f"(shape {tuple(weight.shape)})"
        )
    out_features = weight.shape[1] if not transposed else weight.shape[2]
    used = sum(counts)
    if used > x.shape[0]:
        raise ValueError(f"counts add up to {used} rows but x has {x.shape[0]}")
    weights = weight.unbind(0)  # one backward node: the gradient is stacked once
    biases = bias.unbind(0) if bias is not None else (None,) * len(counts)
    outs = []
    for g, (rows, n) in enumerate(zip(x[:used].split(counts), counts, strict=True)):
        if n == 0:
            continue
        w = weights[g].t() if transposed else weights[g]
        outs.append(quantized_linear(rows, w, biases[g], plan,
                                     keys[g] if keys is not None else None))
    if used < x.shape[0]:
        outs.append(x.new_zeros((x.shape[0] - used, out_features)))
    if not outs:
        return x.new_zeros((x.shape[0], out_features))
    return torch.cat(outs)


__all__ = ["expert_keys", "quantized_grouped_linear"]
