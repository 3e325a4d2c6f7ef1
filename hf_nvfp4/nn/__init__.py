"""Quantized modules: NVFP4Linear and its autograd function."""

from .functional import LinearContext, QuantizedLinearFunction, quantized_linear
from .linear import NVFP4Linear

__all__ = ["LinearContext", "NVFP4Linear", "QuantizedLinearFunction", "quantized_linear"]
