"""LoRA (PEFT) on NVFP4 models, packed ones included: adapters over a 4-bit base (QLoRA).

PEFT adapts the layer types it knows. Two of ours need telling (:func:`lora_config` registers
both with a ``LoraConfig``, through PEFT's custom-module hook; :func:`load_adapter` does the
same for a saved adapter):

* :class:`~hf_nvfp4.nn.packed.NVFP4PackedLinear` (a model from
  :func:`hf_nvfp4.checkpoint.load_packed`: weights as NVFP4 codes and scales, 0.5625 bytes a
  weight) is not an ``nn.Linear``; its gradients reach the input exactly as through a frozen
  NVFP4Linear. A packed weight cannot absorb ``B A`` (its codes would be requantized, not the
  model that was trained) nor be rewritten, so merging and the initializations that rewrite
  the base weight (PiSSA, CorDA, OLoRA, LoftQ, LoRA-GA) are refused: do those on the
  training form (``load_packed(..., mode="train")``).
* :class:`~hf_nvfp4.nn.NVFP4Conv1D` (GPT-2) is an ``nn.Linear`` to PEFT, which would then
  merge ``B A`` into its ``[in, out]`` weight untransposed; registered, it merges as PEFT
  merges transformers' ``Conv1D``.

Needs ``peft``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora.layer import Linear
from torch import nn

from .nn.conv1d import NVFP4Conv1D
from .nn.packed import NVFP4PackedLinear

#: ``init_lora_weights`` values whose initialization rewrites the base weight.
_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


class PackedLoraLinear(Linear):
    """PEFT's LoRA ``Linear`` over an :class:`NVFP4PackedLinear` base: it neither merges nor
    takes an initialization that rewrites the base weight."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig,
                 **kwargs: Any) -> None:
        init = kwargs.get("init_lora_weights", config.init_lora_weights)
        if isinstance(init, str) and init.lower().startswith(_REWRITING_INITS):
            raise ValueError(
                f"init_lora_weights={init!r} rewrites the base weight, which a packed "
                f"{type(base_layer).__name__} holds as NVFP4 codes; initialize on the training "
                "form (hf_nvfp4.checkpoint.load_packed(..., mode='train')) or use the default "
                "initialization"
            )
        with warnings.catch_warnings():
            # PEFT warns of every base layer type it does not know; this class is what knows
            # this one (in_features and out_features are read as PEFT reads them)
            warnings.filterwarnings("ignore", message="Unsupported layer type .*NVFP4Packed",
                                    category=UserWarning)
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def merge(self, *args: Any, **kwargs: Any) -> None:
        """Refused: the base weight is packed NVFP4 codes."""
        raise RuntimeError(
            f"cannot merge a LoRA adapter into {type(self.get_base_layer()).__name__}: its "
            "weight is packed NVFP4 codes, not a tensor to add B A to; load the base with "
            "hf_nvfp4.checkpoint.load_packed(..., mode='train') (or its high-precision "
            "checkpoint), load the adapter there and merge, or keep the adapter separate"
        )


class Conv1DLoraLinear(Linear):
    """PEFT's LoRA ``Linear`` over an :class:`NVFP4Conv1D` base: its weight is ``[in, out]``,
    so ``B A`` is transposed on merge (``fan_in_fan_out``), as for transformers' Conv1D."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig,
                 **kwargs: Any) -> None:
        config.fan_in_fan_out = True  # read per layer at construction, as PEFT's Conv1D does
        kwargs["is_target_conv_1d_layer"] = True
        super().__init__(base_layer, adapter_name, config=config, **kwargs)


def lora_config(config: LoraConfig) -> LoraConfig:
    """``config`` with LoRA registered for packed NVFP4 linears and NVFP4Conv1D (returned)."""
    config._register_custom_module({NVFP4PackedLinear: PackedLoraLinear,
                                    NVFP4Conv1D: Conv1DLoraLinear})
    return config


def load_adapter(model: nn.Module, adapter: str | os.PathLike, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained(model, adapter, **kwargs)`` with the saved LoRA config
    passed through :func:`lora_config` (read with the same ``subfolder``, ``revision``,
    ``token`` and ``cache_dir``)."""
    hub = {k: kwargs[k] for k in ("subfolder", "revision", "token", "cache_dir") if k in kwargs}
    config = PeftConfig.from_pretrained(str(adapter), **hub)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{adapter}: a {type(config).__name__} adapter, not LoRA")
    return PeftModel.from_pretrained(model, str(adapter), config=lora_config(config), **kwargs)


__all__ = ["Conv1DLoraLinear", "PackedLoraLinear", "load_adapter", "lora_config"]
