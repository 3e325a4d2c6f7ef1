"""Quantized modules: NVFP4Linear, NVFP4Conv1D (GPT-2's Conv1D), their packed (4-bit codes)
inference forms and their autograd function."""

from .conv1d import NVFP4Conv1D, NVFP4PackedConv1D
from .functional import LinearPlan, QuantizedLinearFunction, quantized_linear
from .linear import NVFP4Linear
from .packed import NVFP4PackedLinear

__all__ = [
    "LinearPlan",
    "NVFP4Conv1D",
    "NVFP4Linear",
    "NVFP4PackedConv1D",
    "NVFP4PackedLinear",
    "QuantizedLinearFunction",
    "quantized_linear",
]
