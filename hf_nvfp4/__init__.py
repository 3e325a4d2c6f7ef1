"""hf_nvfp4: NVFP4 4-bit training for the Hugging Face stack.

The core (``numerics``, ``kernels``, ``quant``, ``backends``, ``nn``, ``recipe``) imports
with torch alone. The public names below are resolved lazily (PEP 562): ``import hf_nvfp4``
imports neither torch nor transformers nor accelerate, and ``hf_nvfp4.NVFP4Config`` or
``hf_nvfp4.Trainer`` imports its module (and transformers) on first access.

Importing the package still registers the ``"hf_nvfp4"`` quantization method with
transformers, so ``from_pretrained(..., quantization_config=NVFP4Config())`` and checkpoints
saved with it load as NVFP4 models, whether transformers is imported before or after
``hf_nvfp4``: see :mod:`hf_nvfp4._registration` (an import hook that registers as soon as
transformers loads its quantizer registry).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ._registration import install as _install_registration

if TYPE_CHECKING:
    from .accelerate_plugin import NVFP4Plugin
    from .callbacks import BypassCheckCallback, LateSwitchCallback, QuantTelemetryCallback
    from .compile import compile_blocks
    from .config import NVFP4Config
    from .convert import ConversionSummary, convert
    from .hf_quantizer import from_config, prepare_model
    from .nn import NVFP4Conv1D, NVFP4Linear
    from .numerics import QTensor, hadamard_transform, quantize
    from .recipe import PRESETS, Recipe, get_recipe
    from .schedule import (
        PrecisionSchedule,
        quantization_disabled,
        restore_quantization,
        switch_to_high_precision,
    )
    from .telemetry import QuantProbe
    from .trainer import NVFP4Trainer, NVFP4TrainingArguments, Trainer

__version__ = "0.1.0"

# Public name -> the submodule that defines it (the TYPE_CHECKING imports above, for tools).
_LAZY = {
    "NVFP4Plugin": "accelerate_plugin",
    "BypassCheckCallback": "callbacks",
    "LateSwitchCallback": "callbacks",
    "QuantTelemetryCallback": "callbacks",
    "QuantProbe": "telemetry",
    "compile_blocks": "compile",
    "NVFP4Config": "config",
    "ConversionSummary": "convert",
    "convert": "convert",
    "from_config": "hf_quantizer",
    "prepare_model": "hf_quantizer",
    "NVFP4Conv1D": "nn",
    "NVFP4Linear": "nn",
    "QTensor": "numerics",
    "hadamard_transform": "numerics",
    "quantize": "numerics",
    "PRESETS": "recipe",
    "Recipe": "recipe",
    "get_recipe": "recipe",
    "PrecisionSchedule": "schedule",
    "quantization_disabled": "schedule",
    "restore_quantization": "schedule",
    "switch_to_high_precision": "schedule",
    "NVFP4Trainer": "trainer",
    "NVFP4TrainingArguments": "trainer",
    "Trainer": "trainer",
}

__all__ = [
    "BypassCheckCallback",
    "LateSwitchCallback",
    "NVFP4Plugin",
    "NVFP4Trainer",
    "NVFP4TrainingArguments",
    "QuantProbe",
    "QuantTelemetryCallback",
    "Trainer",
    "PRESETS",
    "ConversionSummary",
    "NVFP4Config",
    "NVFP4Conv1D",
    "NVFP4Linear",
    "PrecisionSchedule",
    "QTensor",
    "Recipe",
    "__version__",
    "compile_blocks",
    "convert",
    "from_config",
    "get_recipe",
    "prepare_model",
    "hadamard_transform",
    "quantization_disabled",
    "quantize",
    "restore_quantization",
    "switch_to_high_precision",
]


def __getattr__(name: str) -> Any:
    """Import the submodule behind a public name, or a submodule, on first access (PEP 562).

    Submodules stay reachable as attributes (``hf_nvfp4.recipe.PRESETS``), as they were when
    this module imported them all.
    """
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name.isidentifier() and not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's attributes, the lazy public names included."""
    return sorted({*globals(), *__all__})


class _Package(ModuleType):
    """``hf_nvfp4.convert`` is the function, as with eager imports, not the submodule.

    Importing a submodule sets it as an attribute of its package; for ``convert``, the one
    public name that is also a submodule's name, the function it defines is kept instead.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "convert" and isinstance(value, ModuleType):
            value = value.convert
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
_install_registration()
