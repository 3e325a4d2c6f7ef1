"""NVFP4PackedLinear: a linear layer whose frozen weight stays packed in memory.

The weight lives as the three tensors of a packed NVFP4 checkpoint, as buffers:

* ``weight_packed``       uint8 ``[out, in/2]``: E2M1 codes, the even element in the low nibble
* ``weight_scale``        float8_e4m3fn ``[out, in/16]``: block DECODE scales (16x16 weight
  tiles repeat their scale on each of their 16 rows)
* ``weight_global_scale`` float32 0-dim: the DECODE global scale
  ``S_dec = 1 / fp32(2688 / amax)``

That is 0.5625 bytes per weight (0.28x of BF16). Each forward quantizes the input 1x16 as
NVFP4Linear does and multiplies on exact block values with FP32 accumulation (the backend's
GEMM), so a packed layer gives exactly the outputs of the NVFP4Linear it came from.

The weight is frozen, but gradients flow to the input as through a frozen NVFP4Linear (its
dgrad: ``dy`` 1x16 with stochastic rounding in training, times the weight's own 16x16 tiles
transposed), bit for bit: adapters trained on a packed base (LoRA through PEFT,
:func:`hf_nvfp4.lora.lora_config`) see the gradients of the 4-bit model they adapt.

The scales' dtypes are the format's: ``.to(dtype)``, ``.half()``, ``.bfloat16()`` on the layer
(or a model holding it) move them but never convert them (:func:`apply_keeping_dtypes`; a BF16
global scale would change every output); the bias converts as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..backends import BACKENDS, backend_instance
from ..distributed import rank
from ..numerics.quantize import QTensor
from ..quant.fsdp import GatheredWeight, gathers_codes
from ..quant.sr import advance_keys, draws_keys, new_state
from ..recipe import Recipe, get_recipe
from .functional import LinearPlan, build_plan, quantized_linear
from .linear import NVFP4Linear, _role_specs

BLOCK = 16
#: The buffers of a packed weight that are floating point but must keep their dtype.
SCALE_BUFFERS = ("weight_scale", "weight_global_scale")
#: Attributes of a packed layer whose change remakes its gradient path's frozen weight.
_WARM_ON = ("weight_packed", *SCALE_BUFFERS, "weight_dtype", "recipe", "backend_name")


def apply_keeping_dtypes(
    module: nn.Module,
    names: Sequence[str],
    apply: Callable[[Callable[[torch.Tensor], torch.Tensor], bool], nn.Module],
    fn: Callable[[torch.Tensor], torch.Tensor],
    recurse: bool = True,
) -> nn.Module:
    """``apply(fn, recurse)`` (a module's ``_apply``), then give each buffer in ``names``
    whose dtype ``fn`` changed its old values and dtype on the new device: module-wide dtype
    conversions move packed scales without rounding them."""
    before = {n: module._buffers[n] for n in names if module._buffers.get(n) is not None}
    out = apply(fn, recurse)
    for name, old in before.items():
        new = module._buffers[name]
        if new is not None and new.dtype != old.dtype:
            module._buffers[name] = (torch.empty_like(old, device=new.device) if old.is_meta
                                     else old.to(new.device))
    return out


class NVFP4PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as packed NVFP4 codes, block and global scales.

    The weight is a set of buffers, not a trainable parameter (use :meth:`to_linear` or
    :func:`hf_nvfp4.checkpoint.load_packed` with ``mode="train"`` to continue training it);
    gradients still reach the input, as through a frozen NVFP4Linear (adapters, e.g. LoRA
    through :mod:`hf_nvfp4.lora`, train on a packed base).

    Args:
        in_features, out_features: as ``nn.Linear``; both multiples of 16.
        bias: whether the layer has a bias (kept in high precision).
        recipe: the training recipe; its ``fprop_format`` must be ``"nvfp4"`` (the forward
            quantizes the input with its activation spec).
        backend: the backend running the input quantization and the GEMM.
        sr_seed: seed of the stochastic rounding of the gradients this layer passes to its
            input in training (not saved: a fresh stream from step 0 on each load).
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
        sr_seed: int = 0,
    ) -> None:
        super().__init__()
        if in_features % BLOCK or out_features % BLOCK:
            raise ValueError(
                f"NVFP4PackedLinear needs in_features and out_features that are multiples of "
                f"{BLOCK}; got in_features={in_features}, out_features={out_features}"
            )
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.recipe = get_recipe(recipe)
        if self.recipe.fprop_format != "nvfp4":
            raise ValueError(
                f"packed NVFP4 layers need a recipe with fprop_format 'nvfp4'; got "
                f"{self.recipe.fprop_format!r}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.backend_name = backend
        self.sr_seed = int(sr_seed)
        #: The ``[seed, step]`` rounding state of the input gradients, on the device of the
        #: last input (a plain attribute: packed checkpoints hold no training state).
        self.grad_sr_state: torch.Tensor | None = None
        self._plans: dict[tuple[str, Recipe, str], LinearPlan] = {}
        #: The codes as the frozen weight of the gradient path (:meth:`_warm`).
        self._frozen_weight: GatheredWeight | None = None
        #: The dtype the layer was built in or last converted to (``.to(dtype)``, ``.half()``):
        #: that of :attr:`weight`, which model code reads to pick a compute dtype.
        self.weight_dtype = dtype if dtype is not None else torch.get_default_dtype()
        kw = {"device": device}
        self.register_buffer(
            "weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, **kw)
        )
        self.register_buffer(
            "weight_scale",
            torch.zeros(out_features, in_features // BLOCK, dtype=torch.float8_e4m3fn, **kw),
        )
        self.register_buffer("weight_global_scale", torch.zeros((), dtype=torch.float32, **kw))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._warm()  # register_buffer bypasses __setattr__; loads copy into these buffers

    @classmethod
    def from_qtensor(
        cls,
        q: QTensor,
        bias: torch.Tensor | None = None,
        *,
        recipe: Recipe | str | dict[str, Any] | None = None,
        backend: str = "auto",
        sr_seed: int = 0,
    ) -> NVFP4PackedLinear:
        """A layer holding the NVFP4 weight ``q`` ([out, in], any tile) and ``bias``."""
        if q.fmt != "nvfp4" or q.rht or len(q.shape) != 2:
            raise ValueError(
                f"a packed linear weight is a 2D NVFP4 tensor without RHT; got fmt={q.fmt!r}, "
                f"shape={tuple(q.shape)}, rht={q.rht}"
            )
        out_f, in_f = q.shape
        with torch.device("meta"):
            new = cls(in_f, out_f, bias is not None, recipe=recipe, backend=backend,
                      sr_seed=sr_seed)
        new.weight_packed = q.data
        new.weight_scale = q.scale
        new.weight_global_scale = q.global_scale.reshape(())
        new.weight_dtype = bias.dtype if bias is not None else q.dtype
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return new

    @classmethod
    def from_linear(cls, linear: NVFP4Linear) -> NVFP4PackedLinear:
        """Pack an NVFP4Linear's weight exactly as its forward quantizes it; its input
        gradients go on with the layer's rounding state (seed and step)."""
        new = cls.from_qtensor(
            quantized_weight(linear), linear.bias, recipe=linear.recipe,
            backend=linear.backend_name, sr_seed=linear._sr_seed,
        )
        new.grad_sr_state = linear.sr_state.detach().clone()
        return new

    def packed_weight(self) -> QTensor:
        """The weight as a :class:`QTensor` (sharing the buffers)."""
        return QTensor(
            data=self.weight_packed,
            scale=self.weight_scale,
            global_scale=self.weight_global_scale,
            fmt="nvfp4",
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            tile=(1, BLOCK),
        )

    @property
    def weight(self) -> torch.Tensor:
        """The represented weight ``[out, in]`` in :attr:`weight_dtype`, dequantized on each
        read: a new tensor (writing to it changes nothing) that costs a dequantization of the
        whole matrix; the forward never reads it. Model code asks a block's linear for its
        weight's dtype or device (Ergo's ``o_proj``, the sparse-attention indexers'
        ``weights_proj``, T5's ``wo``)."""
        return self.dequantize_weight(self.weight_dtype)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            raise TypeError(
                f"{type(self).__name__} holds its weight packed (weight_packed, weight_scale, "
                "weight_global_scale) and has no weight to assign; to train it, use "
                "to_linear() or hf_nvfp4.checkpoint.load_packed(..., mode='train')"
            )
        super().__setattr__(name, value)
        if name in _WARM_ON and "_frozen_weight" in self.__dict__:
            self._warm()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # layers pickled before weight_dtype existed: the dtype their forward used
        if "weight_dtype" not in state:
            bias = state.get("_parameters", {}).get("bias")
            state["weight_dtype"] = bias.dtype if bias is not None else torch.float32
        state.setdefault("sr_seed", 0)
        state.setdefault("grad_sr_state", None)
        state["_plans"], state["_frozen_weight"] = {}, None
        super().__setstate__(state)
        self._warm()

    def __getstate__(self) -> dict[str, Any]:
        # the frozen weight is a view of the buffers (remade on load); plans are per process
        return {**self.__dict__, "_plans": {}, "_frozen_weight": None}

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The represented weight ``[out, in]`` in ``dtype``."""
        return self.packed_weight().dequantize(dtype)

    def packed_nbytes(self) -> int:
        """Bytes of the packed weight (codes, block scales, global scale) and the bias."""
        total = self.packed_weight().nbytes()
        if self.bias is not None:
            total += self.bias.numel() * self.bias.element_size()
        return total

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        probe = fn(torch.empty(0, dtype=self.weight_dtype))
        if isinstance(probe, torch.Tensor):
            self.weight_dtype = probe.dtype
        out = apply_keeping_dtypes(self, SCALE_BUFFERS, super()._apply, fn, recurse)
        self._warm()
        return out

    def _warm(self) -> None:
        """Make the gradient path's frozen weight (the codes wrapped as a 16x16-tiled weight)
        and its plan now, when the codes, dtype or recipe change: torch.compile cannot build
        them inside a graph."""
        self._frozen_weight = None
        specs = _role_specs(self.recipe)
        data = self._buffers.get("weight_packed")
        if data is None or data.is_meta or not gathers_codes(specs.w, specs.w_dgrad):
            return
        self._frozen_weight = GatheredWeight(
            data, self.weight_scale, self.weight_global_scale, specs.w,
            torch.Size((self.out_features, self.in_features)), self.weight_dtype,
        )
        self._plan(data.device)

    def _plan(self, device: torch.device) -> LinearPlan:
        key = (str(device), self.recipe, self.backend_name)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build_plan(_role_specs(self.recipe), self.backend_name,
                                                 device)
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NVFP4Linear's quantized forward: ``x`` 1x16 RTN, GEMM on exact block values; with
        a gradient wanted for ``x``, the frozen NVFP4Linear's autograd function."""
        dev_type = x.device.type
        if torch.is_autocast_enabled(dev_type):
            x = x.to(torch.get_autocast_dtype(dev_type))
        if torch.is_grad_enabled() and x.requires_grad:
            with torch.autocast(dev_type, enabled=False):
                return self._forward_with_input_grad(x)
        backend = backend_instance(self._plan(x.device).backend)
        spec = _role_specs(self.recipe).x
        with torch.autocast(dev_type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            q_x, _ = backend.quantize_rowcol(x2, spec, None, None)
            y = backend.gemm(q_x, self.packed_weight(), x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _forward_with_input_grad(self, x: torch.Tensor) -> torch.Tensor:
        """``quantized_linear`` on the packed codes as a frozen 16x16-tiled weight: the same
        output, and NVFP4Linear's dgrad (the weight's tiles transposed; ``dy`` rounded
        stochastically in training when the recipe says so)."""
        specs = _role_specs(self.recipe)
        if not gathers_codes(specs.w, specs.w_dgrad):
            raise RuntimeError(
                f"{type(self).__name__}: a gradient through a packed layer needs the weight "
                "in 16x16 tiles shared by the forward and dgrad (the paper's 2D weights), whose "
                f"transpose the codes hold; this layer's recipe has W {specs.w} and W for dgrad "
                f"{specs.w_dgrad}"
            )
        weight = self._frozen_weight
        if weight is None or not (
            weight._data is self.weight_packed and weight._scale is self.weight_scale
            and weight._global_scale is self.weight_global_scale
            and weight.device == self.weight_packed.device
        ):  # buffers replaced behind __setattr__ (accelerate's loaders, register_buffer)
            self._warm()
            weight = self._frozen_weight
        plan = self._plan(x.device)
        keys = None
        if draws_keys(self, self.recipe.stochastic_rounding):
            state = self.grad_sr_state
            if state is None or state.device != x.device:
                state = new_state(self.sr_seed) if state is None else state
                self.grad_sr_state = state = state.to(x.device)
            keys = advance_keys(state, rank())
        return quantized_linear(x, weight, self.bias, plan, keys)

    def to_linear(
        self, dtype: torch.dtype = torch.float32, sr_seed: int | None = None,
        reduce_amax: bool = False,
    ) -> NVFP4Linear:
        """An :class:`NVFP4Linear` whose master weight is the dequantized weight.

        Lossy as a training start: the master becomes the values the format keeps, not the
        original FP32 weights (save masters with ``save_packed(..., masters=True)`` for an
        exact resume).
        """
        dev = self.weight_packed.device
        new = NVFP4Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta",
            recipe=self.recipe, backend=self.backend_name, sr_seed=sr_seed,
            reduce_amax=reduce_amax,
        )
        new.weight = nn.Parameter(self.dequantize_weight(dtype).to(dev))
        if self.bias is not None:
            new.bias = nn.Parameter(self.bias.detach().to(device=dev, dtype=dtype).clone())
        new.sr_state = new_state(new._sr_seed, dev)
        return new

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, packed=nvfp4, backend={self.backend_name}"
        )


def quantized_weight(linear: NVFP4Linear) -> QTensor:
    """The NVFP4 QTensor of ``linear``'s master weight, as its forward GEMM uses it.

    The reference quantizer is the source of truth every backend matches bit for bit.
    """
    from ..backends.reference import quantize_spec

    spec = _role_specs(linear.recipe).w
    if spec is None or spec.fmt != "nvfp4":
        raise ValueError(
            f"only NVFP4 weights can be packed; this {type(linear).__name__}'s recipe quantizes "
            f"its weight as {spec.fmt if spec else 'bf16'!r}"
        )
    return quantize_spec(linear.weight.detach(), spec)


__all__ = ["SCALE_BUFFERS", "NVFP4PackedLinear", "apply_keeping_dtypes", "quantized_weight"]
