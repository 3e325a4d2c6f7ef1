"""The ``te`` backend: Transformer Engine's NVFP4BlockScaling recipe on Blackwell.

TE fuses quantization into its own ``te.Linear``, so this backend runs a whole layer: a
``te.Linear`` that shares the NVFP4Linear's weight and bias, inside TE's autocast context
with an ``NVFP4BlockScaling`` recipe built from our :class:`~hf_nvfp4.recipe.Recipe`.

Written against Transformer Engine >= 2.8's documented PyTorch API (``te.Linear``,
``te.autocast`` / ``te.fp8_autocast``, ``transformer_engine.common.recipe.NVFP4BlockScaling``).
NOT run on hardware: TE needs CUDA, builds from source, and asserts compute capability
>= 10.0 for NVFP4; the project had no Blackwell GPU as of 2026-11-23.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..recipe import Recipe

INSTALL = 'pip install --no-build-isolation "transformer_engine[pytorch]"'


def is_te_available() -> tuple[bool, str]:
    """Whether Transformer Engine's NVFP4 path can run here, and why not."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        from transformer_engine.common.recipe import NVFP4BlockScaling  # noqa: F401
    except ImportError as e:
        return False, f"transformer_engine[pytorch] >= 2.8 not importable ({e}); {INSTALL}"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 10:
        return False, f"compute capability {major}.{minor} < 10.0 (TE NVFP4 needs Blackwell)"
    return True, "ok"


def te_recipe_kwargs(recipe: Recipe) -> dict[str, Any]:
    """``NVFP4BlockScaling`` keyword arguments for ``recipe``; raises for what TE lacks."""
    formats = {recipe.fprop_format, recipe.dgrad_format, recipe.wgrad_format}
    if formats != {"nvfp4"}:
        raise ValueError(
            "the te backend runs TE's NVFP4BlockScaling, which quantizes every GEMM in NVFP4; "
            f"got fprop/dgrad/wgrad formats {recipe.fprop_format}/{recipe.dgrad_format}/"
            f"{recipe.wgrad_format} (use the triton or reference backend)"
        )
    if tuple(recipe.rht_sign) != Recipe().rht_sign:
        raise ValueError("the te backend uses TE's fixed RHT sign vector; got a custom rht_sign")
    return {
        "disable_rht": not recipe.rht,
        "disable_stochastic_rounding": not recipe.stochastic_rounding,
        "disable_2d_quantization": not recipe.weight_2d,
    }


class TEBackend:
    """Runs NVFP4Linear layers through ``te.Linear`` (see the module docstring)."""

    name = "te"

    def __init__(self) -> None:
        ok, why = is_te_available()
        if not ok:
            raise RuntimeError(f"the te backend cannot run here: {why}")
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import NVFP4BlockScaling

        self._te = te
        self._recipe_cls = NVFP4BlockScaling

    def _autocast(self, recipe: Recipe):
        te_recipe = self._recipe_cls(**te_recipe_kwargs(recipe))
        if hasattr(self._te, "autocast"):
            return self._te.autocast(enabled=True, recipe=te_recipe)
        return self._te.fp8_autocast(enabled=True, fp8_recipe=te_recipe)

    def linear(self, layer: nn.Linear, x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
        """``layer(x)`` computed by a ``te.Linear`` sharing ``layer``'s parameters."""
        te_layer = getattr(layer, "_hf_nvfp4_te_linear", None)
        if te_layer is None:
            te_layer = self._te.Linear(
                layer.in_features, layer.out_features, bias=layer.bias is not None,
                params_dtype=layer.weight.dtype, device=layer.weight.device,
            )
            te_layer.weight = layer.weight
            if layer.bias is not None:
                te_layer.bias = layer.bias
            # Not a submodule: the parameters stay registered once, on ``layer``.
            object.__setattr__(layer, "_hf_nvfp4_te_linear", te_layer)
        with self._autocast(recipe):
            return te_layer(x)
