"""The ``te`` backend: Transformer Engine's NVFP4BlockScaling recipe on Blackwell.

TE fuses quantization into its own ``te.Linear``, so this backend runs a whole layer. An
:class:`~hf_nvfp4.nn.NVFP4Linear` on the ``te`` backend owns a ``te.Linear`` as a registered
submodule, ``layer.te_linear`` (:data:`TE_MODULE`), built when the layer's plan is decided (at
construction, conversion, ``.to()``, or the first forward after a lazy load) on the meta device,
so that it allocates nothing, and then given the layer's own ``weight`` and ``bias`` Parameter
objects. So it is visible to ``.to()``, ``named_modules()``, ``state_dict()``, FSDP2 (which
handles parameters shared by two modules) and activation checkpointing, and:

* ``named_parameters()`` lists each parameter once, under the layer's names (``weight``,
  ``bias``): the te.Linear holds the same objects, which PyTorch de-duplicates;
* ``state_dict()`` keys are those of every other backend (``weight``, ``bias``, ``sr_state``)
  plus TE's extra state, ``te_linear._extra_state`` (a uint8 tensor that TE fills with its
  quantizer metadata; empty for NVFP4BlockScaling, which keeps no amax history). The
  te.Linear's duplicate ``te_linear.weight`` / ``te_linear.bias`` entries are dropped;
* ``load_state_dict`` accepts checkpoints of any backend, ``strict`` included: a layer on the
  te backend takes its weight and bias from ``weight`` / ``bias`` and keeps its current TE state
  when the checkpoint has no ``te_linear._extra_state``; a layer on another backend ignores
  that key (TE's state has nowhere to go without TE).

The forward runs the te.Linear inside TE's autocast context with an ``NVFP4BlockScaling``
recipe built from our :class:`~hf_nvfp4.recipe.Recipe` (:func:`te_recipe_kwargs`).

Written against Transformer Engine >= 2.8's documented PyTorch API (``te.Linear``,
``te.autocast`` / ``te.fp8_autocast``, ``transformer_engine.common.recipe.NVFP4BlockScaling``)
and tested on CPU against a stub of that API only. NEVER run on hardware: TE needs CUDA, builds
from source, and asserts compute capability >= 10.0 for NVFP4; the project had no Blackwell GPU
as of 2026-11-23.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..recipe import Recipe

INSTALL = 'pip install --no-build-isolation "transformer_engine[pytorch]"'

#: The name under which an NVFP4Linear on the te backend registers its ``te.Linear``.
TE_MODULE = "te_linear"
_SHARED = ("weight", "bias")


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
    """Runs NVFP4Linear layers through their ``te.Linear`` submodule (see the module
    docstring)."""

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

    def attach(self, layer: nn.Linear) -> nn.Module:
        """``layer``'s te.Linear, registered as ``layer.te_linear`` on first call.

        Built on the meta device (TE defers its initialization there: no memory) and given
        ``layer``'s ``weight`` and ``bias``. Later calls re-tie parameters that were replaced
        on ``layer`` since (a loader's assignment, ``load_state_dict(assign=True)``, a move
        that made new Parameter objects), so the two modules never hold different tensors.
        Raises for a recipe TE cannot run (:func:`te_recipe_kwargs`).
        """
        recipe = getattr(layer, "recipe", None)
        if recipe is not None and not recipe.is_high_precision:
            te_recipe_kwargs(recipe)
        te_layer = layer._modules.get(TE_MODULE)
        if te_layer is None:
            te_layer = self._te.Linear(
                layer.in_features, layer.out_features, bias=layer.bias is not None,
                params_dtype=layer.weight.dtype, device="meta",
            )
            layer.register_module(TE_MODULE, te_layer)
            layer.register_state_dict_post_hook(_drop_shared_keys)
        tie_parameters(layer, te_layer)
        return te_layer

    def linear(self, layer: nn.Linear, x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
        """``layer(x)`` computed by ``layer.te_linear`` inside TE's autocast (attached when the
        plan was decided; only the identity check of the shared parameters per call)."""
        te_layer = layer._modules.get(TE_MODULE)
        if te_layer is None:
            te_layer = self.attach(layer)
        tie_parameters(layer, te_layer)
        with self._autocast(recipe):
            return te_layer(x)


def tie_parameters(layer: nn.Module, te_layer: nn.Module) -> None:
    """Make ``te_layer``'s weight and bias the very Parameter objects of ``layer``."""
    for name in _SHARED:
        param = layer._parameters.get(name)
        if param is not None and te_layer._parameters.get(name) is not param:
            setattr(te_layer, name, param)


def _drop_shared_keys(layer: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook: the shared parameters are saved once, as ``weight`` and
    ``bias`` (the te.Linear's duplicate entries are dropped; its ``_extra_state`` stays)."""
    te_layer = layer._modules.get(TE_MODULE)
    for name in _SHARED:
        key = f"{prefix}{TE_MODULE}.{name}"
        if key in state_dict and te_layer is not None and (
            te_layer._parameters.get(name) is layer._parameters.get(name)
        ):
            del state_dict[key]


def before_load(layer: nn.Module, state_dict: dict, prefix: str) -> None:
    """Before ``layer`` loads its keys of ``state_dict`` (a layer-local dict, see
    ``nn.Module.load_state_dict``): without a te.Linear, drop the keys a te layer saved
    (TE's extra state), which would be unexpected."""
    if TE_MODULE not in layer._modules:
        head = f"{prefix}{TE_MODULE}."
        for key in [k for k in state_dict if k.startswith(head)]:
            del state_dict[key]


def after_load(layer: nn.Module, state_dict: dict, prefix: str) -> None:
    """After ``layer`` loaded its own keys and before its te.Linear loads: hand the te.Linear
    the layer's (just loaded) weight and bias, and its current extra state when the
    checkpoint has none, so that checkpoints of any backend load with ``strict=True``."""
    te_layer = layer._modules.get(TE_MODULE)
    if te_layer is None:
        return
    head = f"{prefix}{TE_MODULE}."
    for name in _SHARED:
        param = layer._parameters.get(name)
        if param is not None:
            # The very Parameter: loading copies it onto itself, ``assign=True`` re-ties it.
            state_dict[head + name] = param
    if type(te_layer).get_extra_state is not nn.Module.get_extra_state:
        key = head + "_extra_state"
        if key not in state_dict:
            state_dict[key] = te_layer.get_extra_state()


__all__ = [
    "INSTALL",
    "TEBackend",
    "TE_MODULE",
    "is_te_available",
    "te_recipe_kwargs",
    "tie_parameters",
]
