"""Accelerate integration: convert models to NVFP4 inside ``Accelerator.prepare``.

Why not a kwargs handler: Accelerate looks kwargs handlers up by exact class
(``handler_class_to_attr``), so a new handler class raises, and its recipe classes (TE, AO,
MS-AMP) are closed. Why not an Accelerator subclass: users' scripts and ``accelerate
launch`` build a plain ``Accelerator()``. So the plugin attaches to an existing Accelerator
instance: its ``prepare`` first converts every model it is given (sharing the parameters, so
an optimizer built beforehand keeps working), then runs Accelerate's own ``prepare``, which
wraps the converted model in DDP/FSDP2 as usual.

``accelerate launch`` selects the recipe with the ``HF_NVFP4_RECIPE`` environment variable
(a preset name or a recipe file; see ``integrations/accelerate/``), because Accelerate's
config YAML rejects unknown keys.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from torch import nn

from .config import QUANT_METHOD, RECIPE_ENV, NVFP4Config, resolve_nvfp4

if TYPE_CHECKING:
    from accelerate import Accelerator


class NVFP4Plugin:
    """Makes an ``accelerate.Accelerator`` convert the models it prepares to NVFP4.

    Example::

        accelerator = Accelerator(mixed_precision="bf16")
        NVFP4Plugin(NVFP4Config()).apply(accelerator)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    """

    def __init__(self, config: NVFP4Config | dict[str, Any] | str | None = None) -> None:
        resolved = resolve_nvfp4(config if config is not None else True)
        self.config = resolved if resolved is not None else NVFP4Config()
        self.summaries: list = []

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> NVFP4Plugin | None:
        """A plugin for the recipe named by ``HF_NVFP4_RECIPE``, or None when it is unset."""
        value = (os.environ if environ is None else environ).get(RECIPE_ENV)
        config = resolve_nvfp4(value)
        return None if config is None else cls(config)

    def convert(self, model: nn.Module) -> nn.Module:
        """Convert one model (a no-op for a model that is already an hf_nvfp4 model)."""
        from transformers import PreTrainedModel

        from .convert import convert
        from .hf_quantizer import prepare_model

        quantizer = getattr(model, "hf_quantizer", None)
        if getattr(getattr(quantizer, "quantization_config", None), "quant_method", None) == (
            QUANT_METHOD
        ):
            return model
        if isinstance(model, PreTrainedModel):
            prepare_model(model, self.config)
            self.summaries.append(model.hf_quantizer.summary)
        else:
            self.summaries.append(convert(model, self.config))
        return model

    def apply(self, accelerator: Accelerator) -> Accelerator:
        """Hook this plugin into ``accelerator.prepare`` (idempotent). Returns the accelerator."""
        if getattr(accelerator, "_hf_nvfp4_plugin", None) is not None:
            return accelerator
        original = accelerator.prepare

        @functools.wraps(original)
        def prepare(*args: Any, **kwargs: Any):
            for obj in args:
                if isinstance(obj, nn.Module):
                    self.convert(obj)
            return original(*args, **kwargs)

        accelerator.prepare = prepare
        accelerator._hf_nvfp4_plugin = self
        return accelerator
