"""hf_nvfp4: NVFP4 4-bit training for the Hugging Face stack.

Importing the package registers the ``"hf_nvfp4"`` quantization method with transformers,
so ``from_pretrained(..., quantization_config=NVFP4Config())`` and checkpoints saved with it
load as NVFP4 models.
"""

from .accelerate_plugin import NVFP4Plugin
from .callbacks import LateSwitchCallback, QuantTelemetryCallback
from .config import NVFP4Config
from .convert import ConversionSummary, convert
from .hf_quantizer import from_config, prepare_model
from .hf_quantizer import register as _register
from .nn import NVFP4Linear
from .numerics import QTensor, hadamard_transform, quantize
from .recipe import PRESETS, Recipe, get_recipe
from .schedule import (
    PrecisionSchedule,
    quantization_disabled,
    restore_quantization,
    switch_to_high_precision,
)
from .trainer import NVFP4Trainer, NVFP4TrainingArguments, Trainer

__version__ = "0.1.0"

_register()

__all__ = [
    "LateSwitchCallback",
    "NVFP4Plugin",
    "NVFP4Trainer",
    "NVFP4TrainingArguments",
    "QuantTelemetryCallback",
    "Trainer",
    "PRESETS",
    "ConversionSummary",
    "NVFP4Config",
    "NVFP4Linear",
    "PrecisionSchedule",
    "QTensor",
    "Recipe",
    "__version__",
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
