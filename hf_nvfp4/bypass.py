"""Quantized layers whose matmul runs outside their forward.

Model code can use a converted layer's ``weight`` without calling the layer: Mamba's mixer
computes ``dt_proj.weight @ x``, and its fused CUDA training kernel takes the ``x_proj``,
``dt_proj`` and ``out_proj`` weights. That matmul then runs in high precision with the
master weight, whatever :func:`hf_nvfp4.convert` reported. A layer's stochastic-rounding step
counts its training forwards, so after a training backward such a layer is the one whose
weight has a gradient while its step did not move. Recipes without stochastic rounding keep
no count, and the te backend rounds inside Transformer Engine: neither is checked.
"""

from __future__ import annotations

import logging

from torch import nn

from ._names import shown_names
from .experts import ExpertsQuantization, expert_params
from .nn.linear import NVFP4Linear

logger = logging.getLogger(__name__)


def _checked(model: nn.Module):
    """``(name, module, weight)`` of each quantized layer whose training forwards are counted."""
    for name, mod in model.named_modules():
        if isinstance(mod, NVFP4Linear):
            recipe = mod.recipe
            if (recipe.is_high_precision or not recipe.stochastic_rounding
                    or mod.plan().backend == "te"):
                continue
            yield name, mod, mod.weight
        else:
            quant = getattr(mod, "_hf_nvfp4", None)
            if isinstance(quant, ExpertsQuantization) and quant.recipe.stochastic_rounding:
                yield name, mod, getattr(mod, expert_params(mod)[0])


def forward_counts(model: nn.Module) -> dict[str, int]:
    """Each checked quantized layer's training forwards so far (its SR step; reads the
    device once per layer): take it before a training step."""
    return {name: int(mod.sr_state[1]) for name, mod, _ in _checked(model)}


def bypassed_layers(model: nn.Module, before: dict[str, int]) -> list[str]:
    """After a training backward: the quantized layers whose weight got a gradient although
    their forward did not run since ``before`` (:func:`forward_counts`)."""
    return [name for name, mod, weight in _checked(model)
            if name in before and weight.grad is not None
            and int(mod.sr_state[1]) == before[name]]


def warn_bypassed(names: list[str], model_name: str) -> None:
    """One warning naming the layers :func:`bypassed_layers` found (nothing when none)."""
    if not names:
        return
    shown = shown_names(names)
    logger.warning(
        "hf_nvfp4: %d quantized layer(s) of %s had their weight used outside their forward in "
        "this training step, so that matmul ran in high precision with the master weight: %s. "
        "The model reads their weight directly (e.g. Mamba's dt_proj, or its fused CUDA "
        "kernel's x_proj/dt_proj/out_proj); exclude them from the conversion to make the "
        "summary say so.", len(names), model_name, shown,
    )


__all__ = ["bypassed_layers", "forward_counts", "warn_bypassed"]
