"""Quantized modules: NVFP4Linear and its autograd function."""

from .functional import LinearPlan, QuantizedLinearFunction, quantized_linear
from .linear import NVFP4Linear

__all__ = ["LinearPlan", "NVFP4Linear", "QuantizedLinearFunction", "quantized_linear"]
