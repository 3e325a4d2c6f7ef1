"""transformers integration: the HfQuantizer behind ``NVFP4Config`` (method ``"hf_nvfp4"``).

``from_pretrained(path, quantization_config=NVFP4Config())`` builds the model on the meta
device, where :meth:`NVFP4HfQuantizer._process_model_before_weight_loading` swaps the
Linear modules; the weights then load into the NVFP4Linear modules unchanged (they keep the
``weight``/``bias`` names). The quantizer declares the model trainable (full QAT-style
training, not only PEFT), which Trainer checks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

# Only modules that are fully executed when hf_nvfp4._registration imports this one, from
# inside transformers' own import of transformers.quantizers.auto (see that module).
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer, _assign_is_quantized

from .backends import unavailable_reason
from .config import QUANT_METHOD, NVFP4Config
from .convert import convert, iter_nvfp4_linears
from .experts import iter_nvfp4_experts, reset_sr_state
from .quant.sr import new_state

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)


class NVFP4HfQuantizer(HfQuantizer):
    """Converts a transformers model to NVFP4 training layers while it loads."""

    requires_calibration = False

    def __init__(self, quantization_config: NVFP4Config, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.summary = None
        self.packed_infos = None
        self.saved_sr_states: set[str] | None = None

    @property
    def loads_packed(self) -> bool:
        """True when loading a packed checkpoint (see :mod:`hf_nvfp4.checkpoint`)."""
        return self.pre_quantized and self.quantization_config.checkpoint_format == "packed"

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Any device works (reference numerics on CPU, Triton emulation on CUDA)."""

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        backend = self.quantization_config.backend
        why = unavailable_reason(backend) if self.pre_quantized else None
        if why is not None:
            # The checkpoint names the backend of the machine that saved it.
            logger.warning("hf_nvfp4: the checkpoint's backend %r cannot run here (%s); "
                           "using 'auto' instead", backend, why)
            self.quantization_config.backend = "auto"
        if self.loads_packed:
            from .checkpoint.load import prepare_packed_model

            self.packed_infos = prepare_packed_model(
                model, self.quantization_config, kwargs.get("checkpoint_files")
            )
            return model
        if not self.pre_quantized:
            # Plain checkpoints have no stochastic-rounding state; it is seeded after loading.
            ignore = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
            model._keys_to_ignore_on_load_missing = [*ignore, r"\.sr_state$"]
        # TE's extra state (layers on the te backend, hf_nvfp4.backends.te) is optional both
        # ways: a te layer keeps its initial state when a checkpoint has none, and a layer on
        # another backend has no use for the state a te checkpoint carries.
        te_state = r"\.te_linear\._extra_state$"
        for attr in ("_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_load_unexpected"):
            setattr(model, attr, {*(getattr(model, attr, None) or ()), te_state})
        self.summary = convert(model, self.quantization_config, verbose=False)
        _skip_merged_sr_states(model)
        if self.pre_quantized:
            from .checkpoint.load import check_master_checkpoint

            self.saved_sr_states = check_master_checkpoint(model, kwargs.get("checkpoint_files"))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if self.packed_infos is not None:
            from .checkpoint.load import finalize_packed_model

            finalize_packed_model(model, self.packed_infos)
            return model
        # A checkpoint saved by us carries each layer's stochastic-rounding state; a plain
        # checkpoint does not, and the buffer must be (re)initialized from the seeds (a
        # missing buffer holds uninitialized memory, not a meta tensor, after loading).
        for name, mod in iter_nvfp4_linears(model):
            saved = self.saved_sr_states is None or name in self.saved_sr_states
            if not (self.pre_quantized and saved and not mod.sr_state.is_meta):
                mod.sr_state = new_state(mod._sr_seed, mod.weight.device)
        for _, mod in iter_nvfp4_experts(model):
            if not self.pre_quantized or mod.sr_state.is_meta:
                reset_sr_state(mod)
        if self.quantization_config.fsdp_quantized_all_gather:
            from .convert import gather_quantized_weights

            gather_quantized_weights(model)  # a load may have replaced wrapped parameters
        if self.quantization_config.switched is not None:
            from .schedule import switch_to_high_precision

            switch_to_high_precision(model, self.quantization_config.switched)
        if self.summary is not None:
            print(self.summary.table())
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        """NVFP4 models save with save_pretrained."""
        return True

    @property
    def is_trainable(self) -> bool:
        """Training is supported: of the whole model, or of PEFT adapters on a packed one
        (:mod:`hf_nvfp4.lora`)."""
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """Trainer may train the quantized model without PEFT adapters (not a packed one:
        ``load_packed(mode="train")`` gives its trainable form)."""
        return self.quantization_config.checkpoint_format != "packed"


def _skip_merged_sr_states(model: PreTrainedModel) -> None:
    """Leave out of ``save_pretrained`` the ``sr_state`` buffers that transformers' checkpoint
    conversion would merge with their siblings'.

    Some architectures save fused weights (e.g. q/k/v concatenated into one
    ``query_key_value``) and split them on load by the parameters' shapes; applied to our
    int64 ``[seed, step]`` buffers that split fails and the model does not load. Those layers'
    stochastic-rounding streams restart from their seeds after a reload instead (as with a
    plain checkpoint); every other layer's is saved and restored exactly.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # no checkpoint conversions in this transformers
        return
    keys = [k for k in model.state_dict() if k.endswith(".sr_state")]
    targets: dict[str, list[str]] = {}
    for key in keys:
        try:
            out = list(revert_weight_conversion(model, {key: torch.zeros(2, dtype=torch.int64)}))
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError):
            out = [key]
        targets.setdefault(out[0] if len(out) == 1 else key, []).append(key)
    merged = sorted(k for group in targets.values() if len(group) > 1 for k in group)
    if merged:
        ignore = list(getattr(model, "_keys_to_ignore_on_save", None) or [])
        model._keys_to_ignore_on_save = [*ignore, *merged]
        logger.info("hf_nvfp4: %d sr_state buffers are not saved (%s fuses their layers in its "
                    "checkpoints); their SR streams restart from the seeds after a reload",
                    len(merged), type(model).__name__)


def prepare_model(
    model: PreTrainedModel, config: NVFP4Config | dict[str, Any] | str | bool | None = None
) -> PreTrainedModel:
    """Convert an already built transformers model and mark it as an ``hf_nvfp4`` model.

    Afterwards it is what ``from_pretrained(..., quantization_config=config)`` returns: Trainer
    accepts it for full training, and ``save_pretrained`` writes the quantization config.
    """
    config = NVFP4Config.load(config)
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            f"model is already quantized with "
            f"{model.hf_quantizer.quantization_config.quant_method!r}; load it unquantized first"
        )
    quantizer = NVFP4HfQuantizer(config, pre_quantized=False)
    quantizer.summary = convert(model, config, verbose=True)
    _skip_merged_sr_states(model)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.hf_quantizer = quantizer
    model.config.quantization_config = config
    _assign_is_quantized(model)
    return model


def from_config(
    config: PretrainedConfig,
    quantization_config: NVFP4Config | dict[str, Any] | str | bool | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_config`` followed by :func:`prepare_model`.

    transformers' ``from_config`` takes no quantization config; this is its NVFP4 form, for
    pretraining from scratch.
    """
    from transformers import AutoModelForCausalLM

    return prepare_model(AutoModelForCausalLM.from_config(config, **kwargs), quantization_config)


def register() -> None:
    """Register NVFP4Config and its quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(NVFP4Config)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(NVFP4HfQuantizer)


# When this module is imported before transformers' quantizer registry, its own import above
# runs the registry, whose hook (hf_nvfp4._registration) finds this module half-executed and
# leaves the registration to this line.
register()
