"""hf_nvfp4: NVFP4 4-bit training for the Hugging Face stack."""

from .numerics import QTensor, hadamard_transform, quantize

__version__ = "0.1.0"

__all__ = ["QTensor", "__version__", "hadamard_transform", "quantize"]
