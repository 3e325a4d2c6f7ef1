"""Precision schedule: the late switch to BF16, and turning quantization off and on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from ._names import shown_names
from .config import SWITCH_MODES, NVFP4Config
from .convert import iter_nvfp4_linears
from .experts import iter_nvfp4_experts
from .quant.fsdp import is_gathered_quantized
from .recipe import HIGH_PRECISION, PRESETS, Recipe

_SAVED_RECIPE = "_hf_nvfp4_quantized_recipe"


def _switched(recipe: Recipe, mode: str) -> Recipe:
    if mode == "forward":
        return recipe.replace(fprop_format=HIGH_PRECISION)
    if mode == "all":
        return PRESETS[HIGH_PRECISION]
    raise ValueError(f"switch mode must be one of {SWITCH_MODES}; got {mode!r}")


def _quantized(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """``(name, holder)`` of every NVFP4 layer and converted experts module of ``model``:
    ``holder.recipe`` is what it runs (the layer itself; an experts module's NVFP4 state)."""
    yield from iter_nvfp4_linears(model)
    for name, mod in iter_nvfp4_experts(model):
        yield name, mod._hf_nvfp4


def _config(model: nn.Module) -> NVFP4Config | None:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    return qc if isinstance(qc, NVFP4Config) else None


def _record_switch(model: nn.Module, mode: str | None) -> None:
    """Note the switch in the model's NVFP4Config, so that a saved model reloads switched."""
    qc = _config(model)
    if qc is not None:
        qc.switched = mode


def _refuse_gathered_codes(model: nn.Module) -> None:
    """Raise when a layer of ``model`` all-gathers its weight as codes under FSDP2: BF16
    GEMMs need the weight's values, which that all-gather never delivers."""
    names = [name or "<model>" for name, mod in iter_nvfp4_linears(model)
             if is_gathered_quantized(mod.weight)]
    if names:
        shown = shown_names(names)
        raise ValueError(
            f"cannot switch to BF16: {len(names)} layer(s) all-gather their weights under "
            f"FSDP2 as quantized codes ({shown}), and BF16 GEMMs need the weights' values. "
            "Turn fsdp_quantized_all_gather off (NVFP4Config(fsdp_quantized_all_gather="
            "False), no NVFP4Linear.gather_quantized()) to use the late switch."
        )


def switch_to_high_precision(model: nn.Module, mode: str = "all") -> int:
    """Run the quantized layers' forward (``"forward"``) or every GEMM (``"all"``) in BF16.

    The quantized recipe is remembered, so :func:`restore_quantization` undoes it. A
    transformers model records the switch in its NVFP4Config (``switched``): saved with
    ``save_pretrained``, it loads switched. Returns the number of layers switched (an MoE
    experts module counts once).

    Raises:
        ValueError: some layer all-gathers its weight as quantized codes
            (``fsdp_quantized_all_gather``); nothing is switched.
    """
    _refuse_gathered_codes(model)
    n = 0
    for _, mod in _quantized(model):
        if not hasattr(mod, _SAVED_RECIPE):
            setattr(mod, _SAVED_RECIPE, mod.recipe)
        mod.recipe = _switched(getattr(mod, _SAVED_RECIPE), mode)
        n += 1
    _record_switch(model, mode)
    return n


def is_switched(model: nn.Module) -> bool:
    """True when some NVFP4 layer or experts module of ``model`` runs switched to BF16."""
    return any(hasattr(mod, _SAVED_RECIPE) for _, mod in _quantized(model))


def restore_quantization(model: nn.Module) -> int:
    """Give every switched layer its quantized recipe back. Returns the layers restored."""
    n = 0
    for _, mod in _quantized(model):
        if hasattr(mod, _SAVED_RECIPE):
            mod.recipe = getattr(mod, _SAVED_RECIPE)
            delattr(mod, _SAVED_RECIPE)
            n += 1
    _record_switch(model, None)
    return n


@contextlib.contextmanager
def quantization_disabled(model: nn.Module, mode: str = "all") -> Iterator[nn.Module]:
    """Context manager: the model's NVFP4 layers run in BF16 inside, quantized after.

    Layers already switched before entering get their switched recipe back on exit.
    """
    already = {
        name: mod.recipe for name, mod in _quantized(model) if hasattr(mod, _SAVED_RECIPE)
    }
    qc = _config(model)
    recorded = qc.switched if qc is not None else None
    switch_to_high_precision(model, mode)
    try:
        yield model
    finally:
        _record_switch(model, recorded)
        for name, mod in _quantized(model):
            if name in already:
                mod.recipe = already[name]
            elif hasattr(mod, _SAVED_RECIPE):
                mod.recipe = getattr(mod, _SAVED_RECIPE)
                delattr(mod, _SAVED_RECIPE)


class PrecisionSchedule:
    """Switch to BF16 once ``step >= switch_at * total_steps`` (the paper's late switch).

    Call :meth:`update` every optimizer step; it switches once and reports it.
    """

    def __init__(self, switch_at: float | None, total_steps: int, mode: str = "all") -> None:
        if switch_at is not None and not 0 <= switch_at <= 1:
            raise ValueError(f"switch_at must be a fraction in [0, 1] or None; got {switch_at}")
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive; got {total_steps}")
        _switched(Recipe(), mode)
        self.switch_at, self.total_steps, self.mode = switch_at, total_steps, mode
        self.switched = False

    @property
    def switch_step(self) -> int | None:
        """The first step run in high precision, or None."""
        if self.switch_at is None:
            return None
        return int(round(self.switch_at * self.total_steps))

    def update(self, model: nn.Module, step: int) -> bool:
        """Switch ``model`` if ``step`` reached the switch point; True when it switched now."""
        if self.switched or self.switch_step is None or step < self.switch_step:
            return False
        switch_to_high_precision(model, self.mode)
        self.switched = True
        return True
