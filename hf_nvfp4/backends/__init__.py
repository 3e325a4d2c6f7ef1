"""Backends that execute NVFP4Linear's quantizations and GEMMs, chosen per device."""

from __future__ import annotations

import warnings

from .base import Backend
from .reference import ReferenceBackend

BACKENDS = ("auto", "reference", "triton", "te", "native")


_INSTANCES: dict[str, Backend] = {}
_RESOLVED: dict[tuple[str, str], str] = {}


def resolve_backend(name: str, device: object = None) -> str:
    """The name of the backend that ``name`` runs on ``device`` (``"auto"`` resolved).

    ``auto``: ``native`` on Blackwell when torch's FP4 ``_scaled_mm`` is usable, else
    ``triton`` on CUDA devices when Triton imports, else ``reference``. ``te`` is opt-in.
    The one place this decision is made; layers call it at construction and on ``.to()``.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    if name != "auto":
        return name
    key = (name, str(device))
    resolved = _RESOLVED.get(key)
    if resolved is None:  # probes the device and imports: once, never inside a traced forward
        resolved = _RESOLVED[key] = _auto(device)
    return resolved


def backend_instance(name: str) -> Backend:
    """The shared instance of the resolved backend ``name`` (built on first use)."""
    backend = _INSTANCES.get(name)
    if backend is None:
        backend = _INSTANCES[name] = _build(name, None)
    return backend


def get_backend(name: str, device: object = None) -> Backend:
    """The backend called ``name``; ``"auto"`` picks the fastest one that runs on ``device``.

    ``native`` and ``te`` were written against the documented APIs and not run on hardware.
    """
    resolved = resolve_backend(name, device)
    if resolved == "native":
        _build(resolved, device)  # raises with the reason when it cannot run on `device`
    return backend_instance(resolved)


def _build(name: str, device: object) -> Backend:
    if name == "reference":
        return ReferenceBackend()
    if name == "triton":
        from .triton_backend import TritonBackend

        return TritonBackend()
    if name == "native":
        from .native import NativeFP4Backend, is_native_fp4_available

        ok, why = is_native_fp4_available(device if device is not None else "cuda")
        if not ok:
            raise RuntimeError(f"the native backend cannot run here: {why}")
        return NativeFP4Backend()
    from .te import TEBackend

    return TEBackend()


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine at all (None when it can, or may).

    ``auto`` and ``reference`` always run; ``triton`` needs Triton and a CUDA device (or
    ``TRITON_INTERPRET=1``); ``native`` a Blackwell GPU; ``te`` Transformer Engine.
    """
    if name in ("auto", "reference"):
        return None
    if name == "triton":
        from ..kernels import is_triton_available

        ok, why = is_triton_available()
    elif name == "native":
        from .native import is_native_fp4_available

        ok, why = is_native_fp4_available()
    else:
        from .te import is_te_available

        ok, why = is_te_available()
    return None if ok else why


def describe_backend(name: str) -> str:
    """What backend ``name`` runs on this machine, in words (the :func:`convert` summary's
    line): for ``auto``, which backend CUDA devices and the CPU get, and why not Triton when
    CUDA is there but Triton cannot run."""
    import torch

    if name != "auto":
        why = unavailable_reason(name)
        return name if why is None else f"{name} (cannot run here: {why})"
    if not torch.cuda.is_available():
        return "auto: reference (pure PyTorch; no CUDA device, the Triton kernels need one)"
    cuda = resolve_backend("auto", torch.device("cuda", torch.cuda.current_device()))
    if cuda == "reference":
        return f"auto: reference everywhere, also on CUDA ({_no_triton_reason()})"
    return f"auto: {cuda} on CUDA devices, reference on the CPU"


def _no_triton_reason() -> str:
    """Why Triton cannot run (asked only once it is known not to)."""
    from ..kernels import is_triton_available

    return f"{is_triton_available()[1]}; the pure-PyTorch reference is many times slower on a GPU"


def _auto(device: object) -> str:
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        from ..kernels import is_triton_available
        from .native import is_native_fp4_available

        if is_native_fp4_available(dev)[0] and is_triton_available()[0]:
            return "native"

        if is_triton_available()[0]:
            return "triton"
        # once per device (the resolution is cached): a user who asked for "auto" on a GPU
        # expects the fast kernels
        warnings.warn(f"hf_nvfp4: backend 'auto' runs the reference backend on {dev}: "
                      f"{_no_triton_reason()}", stacklevel=3)
    return "reference"


__all__ = [
    "BACKENDS",
    "Backend",
    "ReferenceBackend",
    "backend_instance",
    "describe_backend",
    "get_backend",
    "resolve_backend",
    "unavailable_reason",
]
