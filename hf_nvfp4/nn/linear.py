"""NVFP4Linear: a drop-in ``nn.Linear`` that trains with quantized GEMMs."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..backends import BACKENDS, Backend, get_backend
from ..distributed import rank, world_size
from ..numerics.quantize import QTensor
from ..recipe import Recipe, RoleSpecs, get_recipe
from .functional import LinearContext, quantized_linear

_SEED_MIX = 0x9E3779B97F4A7C15
_RANK_MIX = 0xD1B54A32D192ED03
_MASK63 = (1 << 63) - 1


def _sr_generator_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a layer's stochastic-rounding generator at ``step`` on ``rank``.

    Data-parallel ranks draw independent rounding noise (averaging their gradients then
    averages it down); rank 0, and every single-process run, is unaffected by the rank term.
    """
    return ((seed * _SEED_MIX + step) ^ (rank * _RANK_MIX)) & _MASK63


@functools.lru_cache(maxsize=64)
def _role_specs(recipe: Recipe) -> RoleSpecs:
    return recipe.role_specs()


def _all_reduce_max(amax: torch.Tensor) -> torch.Tensor:
    amax = amax.clone()
    torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX)
    return amax


def _amax_reduce(layer: NVFP4Linear):
    """The cross-rank amax reduction when the layer asks for it, trains and ranks exist.

    Only in training mode: evaluation and generation forwards, which ranks may run a
    different number of times (or on one rank only), must not issue collectives. Not
    ``torch.is_grad_enabled()``: reentrant activation checkpointing runs the first forward
    without grad and would then reduce in the recomputation only.
    """
    if layer.training and layer.reduce_amax and world_size() > 1:
        return _all_reduce_max
    return None


class NVFP4Linear(nn.Linear):
    """``nn.Linear`` whose forward, dgrad and wgrad GEMMs run on NVFP4 (or another format).

    The master weight keeps its dtype (FP32 for training). The weight is quantized once per
    forward call and the same tiles serve the forward and the dgrad GEMMs; only packed
    codes and scales are saved for backward.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        recipe: a :class:`~hf_nvfp4.recipe.Recipe`, a preset name or a dict of fields.
        backend: ``"auto"`` | ``"reference"`` | ``"triton"`` | ``"te"`` | ``"native"``.
        reduce_amax: all-reduce (max) the per-tensor amaxes across data-parallel ranks
            (see :class:`~hf_nvfp4.NVFP4Config`).
        sr_seed: seed of this layer's stochastic rounding; drawn from torch's default
            generator when None. Seed and step counter live in the ``sr_state`` buffer, so a
            checkpoint resumes the exact random stream.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        recipe: Recipe | str | dict[str, Any] | None = None,
        backend: str = "auto",
        sr_seed: int | None = None,
        reduce_amax: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = get_recipe(recipe)
        self.backend_name = backend
        self.reduce_amax = reduce_amax
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if backend == "te" and reduce_amax:
            raise ValueError(
                "reduce_amax is not implemented for the te backend (Transformer Engine takes "
                "its amaxes inside its own kernels); use reduce_amax=False or another backend"
            )
        if sr_seed is None:
            sr_seed = int(torch.randint(0, 2**62, (1,)))
        self.register_buffer(
            "sr_state", torch.tensor([sr_seed, 0], dtype=torch.int64, device=device)
        )
        self._sr_seed, self._sr_step = int(sr_seed), 0

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        recipe: Recipe | str | dict[str, Any] | None = None,
        backend: str = "auto",
        sr_seed: int | None = None,
        reduce_amax: bool = False,
    ) -> NVFP4Linear:
        """Wrap an existing ``nn.Linear``, sharing (not copying) its parameters."""
        if sr_seed is None:
            sr_seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        with torch.device("meta"):
            new = cls(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                recipe=recipe,
                backend=backend,
                sr_seed=sr_seed,
                reduce_amax=reduce_amax,
            )
        new.weight = linear.weight
        new.bias = linear.bias
        new.sr_state = torch.tensor(
            [new._sr_seed, 0], dtype=torch.int64, device=linear.weight.device
        )
        return new

    # ---- stochastic-rounding stream ------------------------------------------------------
    def _next_generator(self) -> torch.Generator:
        """A CPU generator for this call's SR seeds; advances the step counter."""
        self._sr_step += 1
        if not self.sr_state.is_meta:
            self.sr_state[1].fill_(self._sr_step)
        g = torch.Generator()
        g.manual_seed(_sr_generator_seed(self._sr_seed, self._sr_step, rank()))
        return g

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D102
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "sr_state"
        if key in state_dict:
            seed, step = (int(v) for v in state_dict[key].tolist())
            self._sr_seed, self._sr_step = seed, step

    # ---- weight quantization, once per forward, reused by the dgrad GEMM -----------------
    # No cache across calls: fused optimizers and ``.data`` updates change a weight without
    # bumping its version counter, so a cache keyed on it would serve stale weights.
    def _quantized_weight(
        self, backend: Backend, specs: RoleSpecs
    ) -> tuple[tuple[QTensor, QTensor] | None, QTensor | None]:
        wd = self.weight.detach()
        w_q = backend.quantize_weight(wd, specs.w) if specs.w is not None else None
        if specs.w_dgrad is None:
            return w_q, None
        if specs.w_dgrad == specs.w:
            return w_q, w_q[1]
        return w_q, backend.quantize_weight(wd, specs.w_dgrad)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantized ``x W^T + b`` per the recipe (plain ``F.linear`` for the BF16 recipe)."""
        if self.recipe.is_high_precision:
            return nn.functional.linear(x, self.weight, self.bias)
        dev_type = x.device.type
        if torch.is_autocast_enabled(dev_type):
            x = x.to(torch.get_autocast_dtype(dev_type))
        backend = get_backend(self.backend_name, x.device)
        if backend.name == "te":
            return backend.linear(self, x, self.recipe)
        specs = _role_specs(self.recipe)
        with torch.autocast(dev_type, enabled=False):
            w_q, w_dgrad_t = self._quantized_weight(backend, specs)
            gen = self._next_generator() if self.training and torch.is_grad_enabled() else None
            lctx = LinearContext(specs, backend, gen, w_q, w_dgrad_t, _amax_reduce(self))
            return quantized_linear(x, self.weight, self.bias, lctx)

    def extra_repr(self) -> str:  # noqa: D102
        r = self.recipe
        return (
            f"{super().extra_repr()}, fprop={r.fprop_format}, dgrad={r.dgrad_format}, "
            f"wgrad={r.wgrad_format}, 2d={r.weight_2d}, rht={r.rht}, "
            f"sr={r.stochastic_rounding}, backend={self.backend_name}"
        )


__all__ = ["NVFP4Linear"]
