"""Backends that execute NVFP4Linear's quantizations and GEMMs, chosen per device."""

from __future__ import annotations

from .base import Backend
from .reference import ReferenceBackend

BACKENDS = ("auto", "reference", "triton", "te", "native")


def get_backend(name: str, device: object = None) -> Backend:
    """The backend called ``name``; ``"auto"`` picks the fastest one that runs on ``device``.

    ``auto``: ``triton`` on CUDA devices when Triton imports, else ``reference``.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    if name == "auto":
        name = _auto(device)
    if name == "reference":
        return ReferenceBackend()
    if name == "triton":
        from .triton_backend import TritonBackend

        return TritonBackend()
    raise NotImplementedError(f"backend {name!r} is not available in this build")


def _auto(device: object) -> str:
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        from ..kernels import is_triton_available

        if is_triton_available()[0]:
            return "triton"
    return "reference"


__all__ = ["BACKENDS", "Backend", "ReferenceBackend", "get_backend"]
