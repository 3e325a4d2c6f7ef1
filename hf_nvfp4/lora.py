"""LoRA (PEFT) on packed NVFP4 models: adapters over a 4-bit base, as QLoRA over NF4.

A model loaded packed (:func:`hf_nvfp4.checkpoint.load_packed`) keeps each quantized linear's
weight as NVFP4 codes and scales (0.5625 bytes a weight), and its gradients reach the input
exactly as through a frozen NVFP4Linear (:class:`~hf_nvfp4.nn.packed.NVFP4PackedLinear`).
PEFT adapts only the layer types it knows; :func:`packed_lora_config` registers ours with a
``LoraConfig`` (PEFT's custom-module hook), and :func:`load_packed_adapter` does the same for
a saved adapter. Needs ``peft``.

Merging is refused: a packed weight cannot absorb ``B A`` (its codes would have to be
requantized, which is not the model that was trained); merge into the training form instead
(``load_packed(..., mode="train")``, then ``PeftModel.from_pretrained`` and
``merge_and_unload``).
"""

from __future__ import annotations

import os
from typing import Any

from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora.layer import Linear
from torch import nn

from .nn.packed import NVFP4PackedLinear


class PackedLoraLinear(Linear):
    """PEFT's LoRA ``Linear`` over an :class:`NVFP4PackedLinear` base, which cannot merge."""

    def merge(self, *args: Any, **kwargs: Any) -> None:
        """Refused: the base weight is packed NVFP4 codes."""
        raise RuntimeError(
            f"cannot merge a LoRA adapter into {type(self.get_base_layer()).__name__}: its "
            "weight is packed NVFP4 codes, not a tensor to add B A to; load the base with "
            "hf_nvfp4.checkpoint.load_packed(..., mode='train') (or its high-precision "
            "checkpoint), load the adapter there and merge, or keep the adapter separate"
        )


def packed_lora_config(config: LoraConfig) -> LoraConfig:
    """``config`` with LoRA for packed NVFP4 linears registered (returned for chaining)."""
    config._register_custom_module({NVFP4PackedLinear: PackedLoraLinear})
    return config


def load_packed_adapter(
    model: nn.Module, adapter: str | os.PathLike, **kwargs: Any
) -> PeftModel:
    """``PeftModel.from_pretrained(model, adapter)`` for a packed ``model``: the saved
    LoRA config with packed linears registered. ``kwargs`` go to ``from_pretrained``."""
    config = PeftConfig.from_pretrained(str(adapter))
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{adapter}: a {type(config).__name__} adapter, not LoRA")
    return PeftModel.from_pretrained(model, str(adapter), config=packed_lora_config(config),
                                     **kwargs)


__all__ = ["PackedLoraLinear", "load_packed_adapter", "packed_lora_config"]
