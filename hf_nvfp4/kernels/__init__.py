"""Triton kernels for NVFP4 quantization and emulated GEMMs (the ``triton`` backend).

Nothing here probes the hardware or imports Triton at import time; the kernel modules import
Triton and are loaded lazily by :class:`hf_nvfp4.backends.triton_backend.TritonBackend`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

INSTALL_HINT = "pip install 'triton>=3.2'"


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter, read as Triton reads it
    (``1``, ``true``, ``on`` or ``yes``, in any case)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``). Read once, on
    the first launch: Triton itself fixes each kernel as interpreted or compiled when its
    module is imported, and reading the environment costs microseconds on every launch.
    Here, not in the kernel modules, because modules that must import without Triton ask."""
    return interpret_requested()


def is_triton_available() -> tuple[bool, str]:
    """Whether the Triton kernels can run here, and why (or why not).

    True when Triton imports and either a CUDA device exists or ``TRITON_INTERPRET=1`` is set
    (Triton's CPU interpreter, used by the tests). The reason string is meant for skip
    messages and errors.
    """
    if importlib.util.find_spec("triton") is None:
        return False, f"triton is not installed; {INSTALL_HINT}"
    try:
        import triton
    except Exception as exc:  # a broken install raises anything at import
        return False, f"triton failed to import ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    if interpret_requested():
        return True, (f"triton {triton.__version__} in interpreter mode "
                      f"(TRITON_INTERPRET={os.environ['TRITON_INTERPRET']})")
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device; set TRITON_INTERPRET=1 to run the kernels on the CPU"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def require_triton() -> None:
    """Raise ``RuntimeError`` with the reason when :func:`is_triton_available` is False."""
    ok, reason = is_triton_available()
    if not ok:
        raise RuntimeError(f"the triton backend cannot run: {reason}")


__all__ = ["INSTALL_HINT", "interpreting", "is_triton_available", "require_triton"]
