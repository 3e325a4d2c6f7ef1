"""The error every checkpoint check raises: it names the tensor, the file and the value."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, has a wrong dtype or shape, is truncated, or was
    written by another quantization method."""


__all__ = ["CheckpointError"]
