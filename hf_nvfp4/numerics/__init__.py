"""Reference NVFP4 / MXFP4 / FP8-block numerics in pure PyTorch (any device).

The single source of truth for every kernel and backend. Formulas: each module's docstring
(:mod:`.scales` for the two-level scales).
"""

from .e2m1 import E2M1_VALUES
from .formats import FORMATS, FP8_BLOCK, MXFP4, MXFP8, NVFP4, BlockFormat, get_format
from .hadamard import TE_RHT_SIGN, hadamard_transform, rht_matrix
from .quantize import QTensor, fake_quantize, quantize

__all__ = [
    "E2M1_VALUES",
    "FORMATS",
    "FP8_BLOCK",
    "MXFP4",
    "MXFP8",
    "NVFP4",
    "BlockFormat",
    "QTensor",
    "TE_RHT_SIGN",
    "fake_quantize",
    "get_format",
    "hadamard_transform",
    "quantize",
    "rht_matrix",
]
