"""Block-scaled number formats, described as data.

Every format is an element type plus a block (group) size plus a scale type. One quantizer
(:func:`hf_nvfp4.numerics.quantize`) handles them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
FLT_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class BlockFormat:
    """A block-scaled format.

    Attributes:
        name: registry name (``"nvfp4"``, ``"mxfp4"``, ``"fp8_block"``, ``"mxfp8"``).
        element: ``"e2m1"`` (4-bit, packed two per byte) or ``"e4m3"`` (float8_e4m3fn).
        block: elements per scale along the quantized (last) dimension.
        scale: ``"e4m3"`` (NVFP4), ``"ue8m0"`` (power of two, MX) or ``"fp32"``.
        global_scale: whether a per-tensor FP32 scale sits above the block scales.
        tiles: the tile shapes allowed, (rows, cols); rows > 1 is 2D scaling.
    """

    name: str
    element: str
    block: int
    scale: str
    global_scale: bool
    tiles: tuple[tuple[int, int], ...]

    @property
    def element_max(self) -> float:
        """Largest finite magnitude of the element type."""
        return E2M1_MAX if self.element == "e2m1" else E4M3_MAX

    @property
    def packed(self) -> bool:
        """Whether two elements share one byte (4-bit elements)."""
        return self.element == "e2m1"


NVFP4 = BlockFormat("nvfp4", "e2m1", 16, "e4m3", True, ((1, 16), (16, 16)))
MXFP4 = BlockFormat("mxfp4", "e2m1", 32, "ue8m0", False, ((1, 32), (32, 32)))
FP8_BLOCK = BlockFormat("fp8_block", "e4m3", 128, "fp32", False, ((1, 128), (128, 128)))
MXFP8 = BlockFormat("mxfp8", "e4m3", 32, "ue8m0", False, ((1, 32), (32, 32)))

FORMATS: dict[str, BlockFormat] = {f.name: f for f in (NVFP4, MXFP4, FP8_BLOCK, MXFP8)}


def get_format(fmt: str | BlockFormat) -> BlockFormat:
    """Look a format up by name; raises ``ValueError`` naming the known formats."""
    if isinstance(fmt, BlockFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown block format {fmt!r}; expected one of {sorted(FORMATS)}"
        ) from None
