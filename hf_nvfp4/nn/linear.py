"""NVFP4Linear: a drop-in ``nn.Linear`` that trains with quantized GEMMs."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..backends import BACKENDS, backend_instance
from ..backends import te as _te
from ..distributed import rank, world_size
from ..quant.fsdp import (
    gathers_codes,
    is_gathered_quantized,
    register_state_dict_hooks,
    wrap_weight,
)
from ..quant.sr import advance_keys, draws_keys, layer_seed, new_state
from ..recipe import Recipe, RoleSpecs, get_recipe
from .functional import LinearPlan, build_plan, quantized_linear


@functools.lru_cache(maxsize=64)
def _role_specs(recipe: Recipe) -> RoleSpecs:
    return recipe.role_specs()


class NVFP4Linear(nn.Linear):
    """``nn.Linear`` whose forward, dgrad and wgrad GEMMs run on NVFP4 (or another format).

    The master weight keeps its dtype (FP32 for training). The weight is quantized once per
    forward call and the same tiles serve the forward and the dgrad GEMMs; only packed
    codes and scales are saved for backward.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        recipe: a :class:`~hf_nvfp4.recipe.Recipe`, a preset name or a dict of fields.
        backend: ``"auto"`` | ``"reference"`` | ``"triton"`` | ``"te"`` | ``"native"``. On
            ``"te"`` the layer registers a ``te.Linear`` submodule, ``te_linear``, that shares
            its ``weight`` and ``bias`` (see :mod:`hf_nvfp4.backends.te`; never run on
            hardware).
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
            sr_seed = layer_seed()
        self.register_buffer("sr_state", new_state(sr_seed, device))
        self._sr_seed = int(sr_seed)  # re-initializes a buffer left on meta by a lazy load
        self.share_input = True
        self._plans: dict[tuple, LinearPlan] = {}
        self._warm_plan()

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
            sr_seed = layer_seed()
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
        new.sr_state = new_state(sr_seed, linear.weight.device)
        new._warm_plan()
        return new

    def gather_quantized(self) -> bool:
        """Let FSDP2 all-gather this layer's weight as codes and tile scales
        (:mod:`hf_nvfp4.quant.fsdp`); call before ``fully_shard``. Returns False, changing
        nothing, when the recipe does not quantize W in square round-to-nearest tiles (W^T
        then cannot come from W's codes)."""
        if self.backend_name == "te":
            raise ValueError(
                "gather_quantized is not implemented for the te backend (Transformer Engine "
                "quantizes inside its own module); use another backend"
            )
        specs = _role_specs(self.recipe)
        if not gathers_codes(specs.w, specs.w_dgrad):
            return False
        if is_gathered_quantized(self.weight):
            return True
        from torch.distributed.tensor import DTensor  # imported when used: ~1 s

        if isinstance(self.weight, DTensor):
            raise ValueError(
                "gather_quantized() must be called before fully_shard: this layer's weight is "
                "already an FSDP2 DTensor (NVFP4Config(fsdp_quantized_all_gather=True) and "
                "hf_nvfp4.convert.gather_quantized_weights do it at load)"
            )
        self.weight = wrap_weight(self.weight, specs.w, self.backend_name)
        register_state_dict_hooks(self)
        return True

    # ---- decisions made once per device, not per forward ------------------------------
    def plan(self, device: torch.device | str | None = None) -> LinearPlan:
        """The :class:`~hf_nvfp4.nn.functional.LinearPlan` this layer runs on ``device``
        (default: the weight's): specs, resolved backend, amax reduction. Cached.

        The amax is reduced only in training: evaluation and generation forwards, which ranks
        may run a different number of times (or on one rank only), issue no collectives.
        """
        dev = torch.device(device) if device is not None else self.weight.device
        reduce = self.reduce_amax and self.training and world_size() > 1
        key = (str(dev), reduce, self.share_input, self.recipe, self.backend_name)
        plan = self._plans.get(key)
        if plan is None:
            plan = build_plan(
                _role_specs(self.recipe), self.backend_name, dev, reduce_amax=reduce,
                share_input=self.share_input, layer=self,
            )
            self._plans[key] = plan
        return plan

    def _apply(self, fn, recurse=True):  # noqa: D102 - a move or cast re-decides the plan
        self._plans = {}
        out = super()._apply(fn, recurse)
        self._tie_te()  # a move that made new Parameter objects made two of each
        self._warm_plan()
        return out

    def __setattr__(self, name: str, value: Any) -> None:  # noqa: D105
        super().__setattr__(name, value)
        if name in ("weight", "bias"):  # a loader or from_linear assigning a new Parameter
            self._tie_te()

    def _tie_te(self) -> None:
        """On the te backend: keep ``te_linear`` on this layer's weight and bias objects."""
        te_module = self.__dict__.get("_modules", {}).get(_te.TE_MODULE)
        if te_module is not None:
            _te.tie_parameters(self, te_module)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D102
        # Checkpoints of every backend load here, strict or not (see hf_nvfp4.backends.te).
        _te.before_load(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        _te.after_load(self, state_dict, prefix)

    def _warm_plan(self) -> None:
        """Decide the plan for the weight's device now (eagerly): resolving ``auto`` probes
        the device and imports modules, which must not happen inside a compiled forward.
        On the meta device only the te backend decides (its ``te.Linear`` is built on meta,
        allocating nothing, so that a model converted before its weights load has it)."""
        if not self.weight.is_meta or self.backend_name == "te":
            self.plan()

    @property
    def sr_step(self) -> int:
        """Training forwards run so far (the stochastic-rounding step; reads the device)."""
        return int(self.sr_state[1])

    def _sr_keys(self) -> torch.Tensor | None:
        """This call's stochastic-rounding keys; advances the step (training forwards only,
        see :func:`~hf_nvfp4.quant.sr.draws_keys`)."""
        if not draws_keys(self, self.recipe.stochastic_rounding):
            return None
        return advance_keys(self.sr_state, rank())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantized ``x W^T + b`` per the recipe (plain ``F.linear`` for the BF16 recipe)."""
        if self.recipe.is_high_precision:
            return nn.functional.linear(x, self.weight, self.bias)
        dev_type = x.device.type
        if torch.is_autocast_enabled(dev_type):
            x = x.to(torch.get_autocast_dtype(dev_type))
        plan = self.plan(x.device)
        if plan.backend == "te":
            return backend_instance("te").linear(self, x, self.recipe)
        with torch.autocast(dev_type, enabled=False):
            return quantized_linear(x, self.weight, self.bias, plan, self._sr_keys())

    def extra_repr(self) -> str:  # noqa: D102
        r = self.recipe
        return (
            f"{super().extra_repr()}, fprop={r.fprop_format}, dgrad={r.dgrad_format}, "
            f"wgrad={r.wgrad_format}, 2d={r.weight_2d}, rht={r.rht}, "
            f"sr={r.stochastic_rounding}, backend={self.backend_name}"
        )


__all__ = ["NVFP4Linear"]
