"""One quantization of an activation for every sibling layer that consumes it.

Llama's q/k/v projections read the same normed hidden states, gate/up the same MLP input:
quantizing that tensor once per consumer repeats the amax and encode passes and, worse,
saves one column copy per consumer for backward. :func:`quantize_input` remembers the last
input it quantized (by tensor identity and version counter, through a weak reference) and
hands the same copies to the next layer that asks with the same specs; results are the
same objects, so they are bit-identical to quantizing separately, and saved once.

Why a cache and not fusing siblings at conversion (TE's fused QKV): it needs no knowledge
of the model's wiring, works for any architecture that calls several linears on one
tensor, and leaves parameters and checkpoints untouched. Under ``torch.compile`` the cache
is bypassed (the traced graph holds one quantization per call; identical custom-op calls
are deduplicated by the compiler's common-subexpression pass where it applies).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch


class _LastInput:
    """The last input quantized and its copies; dropped when the input is freed."""

    def __init__(self) -> None:
        self.ref: weakref.ref | None = None
        self.key: Hashable = None
        self.value: object = None

    def clear(self, _ref: object = None) -> None:
        self.ref = self.key = self.value = None


_LAST = _LastInput()


def quantize_input(
    x: torch.Tensor, key: Hashable, compute: Callable[[], object], share: bool = True
) -> object:
    """``compute()``, or the result of the previous call for the same ``x`` and ``key``.

    ``x`` matches when it is the same tensor object with the same version counter (an
    in-place change in between invalidates it). ``key`` must capture everything else the
    result depends on (specs, backend, amax reduction, requested layouts). Tensors made
    under ``torch.inference_mode`` have no version counter, so an in-place change could not
    be seen: they are quantized on every call.
    """
    if not share or torch.compiler.is_compiling() or x.is_inference():
        return compute()
    last = _LAST
    if last.ref is not None and last.ref() is x and last.key == (key, x._version):
        return last.value
    value = compute()
    last.clear()
    last.ref = weakref.ref(x, last.clear)
    last.key = (key, x._version)
    last.value = value
    return value


def clear() -> None:
    """Forget the remembered input (tests; freeing memory between phases)."""
    _LAST.clear()


__all__ = ["clear", "quantize_input"]
