"""Stochastic-rounding state on the device: ``[seed, step]`` in, this call's keys out.

:func:`advance_keys` is one ``torch.library`` custom op that increments a layer's step
counter in place and returns the int32 keys of the call (one per quantized copy, see
:func:`hf_nvfp4.numerics.rng.derive_keys`). It needs no host generator and no host sync, so
training forwards trace under ``torch.compile(fullgraph=True)`` and replay in CUDA graphs.
On CUDA one Triton launch does it; elsewhere the reference torch ops.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..distributed import refuse_data_parallel_replica
from ..numerics.rng import derive_keys

N_KEYS = 2  # row copy (dgrad operand), column copy (wgrad operand)


def _use_triton(state: Tensor) -> bool:
    return state.device.type == "cuda" and _triton_on_cuda()


@functools.cache
def _triton_on_cuda() -> bool:
    """Probed once: it imports Triton and queries the device (every layer asks, every step)."""
    from ..kernels import is_triton_available

    return is_triton_available()[0]


def _advance(state: Tensor, rank: int) -> Tensor:
    if _use_triton(state):
        from ..kernels.sr_keys import advance_keys_triton

        return advance_keys_triton(state, rank, N_KEYS)
    state[1] += 1
    return derive_keys(state, rank, N_KEYS)


@torch.library.custom_op("hf_nvfp4::advance_keys", mutates_args=("state",))
def _advance_op(state: Tensor, rank: int) -> Tensor:
    return _advance(state, rank)


@_advance_op.register_fake
def _(state, rank):
    return state.new_empty(N_KEYS, dtype=torch.int32)


def advance_keys(state: Tensor, rank: int) -> Tensor:
    """``state[1] += 1``, then the int32 [2] keys of ``(state, rank)`` (see module docstring).

    A custom op under torch.compile; eager calls skip the dispatcher (~10-20 us a call).
    """
    if torch.compiler.is_compiling() or state.is_meta:
        return _advance_op(state, rank)
    return _advance(state, rank)


def new_state(seed: int, device: torch.device | str | None = None) -> Tensor:
    """A fresh ``[seed, 0]`` int64 state."""
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


def layer_seed() -> int:
    """A seed for a layer built without one: 62 bits from torch's default CPU generator, so
    ``torch.manual_seed`` before building a model fixes its layers' streams."""
    return int(torch.randint(0, 2**62, (1,), device="cpu"))


def draws_keys(module: torch.nn.Module, stochastic_rounding: bool) -> bool:
    """Whether this forward of ``module`` draws stochastic-rounding keys: a training forward
    (``module.training`` with grad enabled) of a recipe that rounds stochastically.

    Not ``torch.is_grad_enabled()`` alone: evaluation forwards, which data-parallel ranks may
    run a different number of times, leave the stream where it is. Raises for a replica of
    ``torch.nn.DataParallel``, whose copies would share one stream.
    """
    if not (module.training and torch.is_grad_enabled() and stochastic_rounding):
        return False
    refuse_data_parallel_replica(module)
    return True


__all__ = ["N_KEYS", "advance_keys", "draws_keys", "layer_seed", "new_state"]
