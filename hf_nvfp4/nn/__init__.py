"""Quantized modules: NVFP4Linear, NVFP4Conv1D (GPT-2's Conv1D) and their autograd function."""

from .conv1d import NVFP4Conv1D
from .functional import LinearPlan, QuantizedLinearFunction, quantized_linear
from .linear import NVFP4Linear

__all__ = [
    "LinearPlan",
    "NVFP4Conv1D",
    "NVFP4Linear",
    "QuantizedLinearFunction",
    "quantized_linear",
]
