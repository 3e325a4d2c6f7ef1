"""NVFP4Conv1D: GPT-2's ``Conv1D`` trained with NVFP4Linear's quantized GEMMs.

transformers' ``Conv1D`` (GPT-2, OpenAI GPT, GPT-SW3, ...) computes ``y = x W + b`` with its
weight stored TRANSPOSED, ``W`` of shape ``[in, out]``. :class:`NVFP4Conv1D` keeps that
parameter (same name, shape and object: checkpoints load unchanged and an optimizer built
before conversion keeps updating it) and runs exactly the GEMMs of an :class:`NVFP4Linear`
whose weight is the ``[out, in]`` matrix ``W^T`` (forward ``x`` 1x16 RTN and ``W^T`` in 16x16
tiles, dgrad with stochastic rounding, wgrad with the RHT): outputs and gradients are bit for
bit those of that NVFP4Linear, with the same plan, recipe switches and stochastic-rounding
stream (``sr_state``).

It is an NVFP4Linear (a subclass), so whatever handles NVFP4Linear layers (recipe switches,
the transformers quantizer, master checkpoints) handles it too; code that reads the weight as
an ``[out, in]`` matrix takes :func:`weight_matrix` or :func:`quantized_linear_weight`.
Packed, it is an :class:`NVFP4PackedConv1D`: an NVFP4PackedLinear (codes ``[out, in/2]``, the
layout engines expect) that turns back into an NVFP4Conv1D for training.

Nothing here imports transformers (the ``nn`` core imports with torch alone): a Conv1D is
recognized by :func:`is_conv1d`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backends.reference import quantize_spec
from ..numerics.quantize import QTensor
from ..quant.sr import layer_seed, new_state
from ..recipe import Recipe
from .functional import quantized_linear
from .linear import NVFP4Linear, _role_specs
from .packed import NVFP4PackedLinear, quantized_weight


def is_conv1d(module: nn.Module) -> bool:
    """True for a transformers-style ``Conv1D``: class ``Conv1D``, weight ``[nx, nf]``."""
    if type(module).__name__ != "Conv1D":
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and tuple(weight.shape) == (
        getattr(module, "nx", None), getattr(module, "nf", None)
    )


class NVFP4Conv1D(NVFP4Linear):
    """GPT-2's ``Conv1D`` (``y = x W + b``, ``W`` stored ``[in, out]``) in NVFP4.

    Computes exactly what :class:`NVFP4Linear` computes with weight ``W^T`` (see the module
    docstring). ``in_features`` and ``out_features`` have NVFP4Linear's meaning; ``weight``
    has Conv1D's shape ``[in_features, out_features]``.

    Args:
        in_features, out_features, bias, device, dtype, recipe, backend, sr_seed, reduce_amax:
            as :class:`NVFP4Linear`; a new weight is initialized as Conv1D's
            (:meth:`reset_parameters`). The ``te`` backend is refused: it runs ``te.Linear``,
            which owns an ``[out, in]`` weight.
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
        if backend == "te":
            raise ValueError(
                "NVFP4Conv1D cannot run on the te backend (te.Linear owns an [out, in] weight; "
                "a Conv1D stores [in, out]); use the auto, triton, native or reference backend"
            )
        super().__init__(
            in_features, out_features, bias=bias, device="meta", dtype=dtype, recipe=recipe,
            backend=backend, sr_seed=sr_seed, reduce_amax=reduce_amax,
        )
        self.weight = nn.Parameter(
            torch.empty(in_features, out_features, device=device, dtype=dtype)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.reset_parameters()
        self.sr_state = new_state(self._sr_seed, device)
        self._warm_plan()

    def reset_parameters(self) -> None:
        """Conv1D's initialization: weight normal with std 0.02, bias zero."""
        nn.init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_weight(
        cls,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        recipe: Recipe | str | dict[str, Any] | None = None,
        backend: str = "auto",
        sr_seed: int | None = None,
        reduce_amax: bool = False,
    ) -> NVFP4Conv1D:
        """A layer around an existing ``[in, out]`` weight and ``[out]`` bias (shared)."""
        if sr_seed is None:
            sr_seed = layer_seed()
        in_features, out_features = weight.shape
        new = cls(
            in_features, out_features, bias=bias is not None, device="meta", recipe=recipe,
            backend=backend, sr_seed=sr_seed, reduce_amax=reduce_amax,
        )
        new.weight = weight
        new.bias = bias
        new.sr_state = new_state(sr_seed, weight.device)
        new._warm_plan()
        return new

    @classmethod
    def from_conv1d(
        cls,
        conv: nn.Module,
        recipe: Recipe | str | dict[str, Any] | None = None,
        backend: str = "auto",
        sr_seed: int | None = None,
        reduce_amax: bool = False,
    ) -> NVFP4Conv1D:
        """Wrap a transformers ``Conv1D``, sharing (not copying) its parameters."""
        if not is_conv1d(conv):
            raise TypeError(f"expected a transformers Conv1D; got {type(conv).__name__}")
        return cls.from_weight(conv.weight, conv.bias, recipe, backend, sr_seed, reduce_amax)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *args: Any, **kwargs: Any) -> NVFP4Conv1D:
        """Refused: an ``nn.Linear`` weight is ``[out, in]``; use :meth:`from_conv1d`."""
        raise TypeError(
            "NVFP4Conv1D wraps a Conv1D ([in, out] weight): use NVFP4Conv1D.from_conv1d, or "
            "NVFP4Linear.from_linear for an nn.Linear"
        )

    def gather_quantized(self) -> bool:
        """Not implemented for Conv1D (FSDP2 shards its ``[in, out]`` weight along the
        reduction dimension): returns False, and the weight all-gathers as usual."""
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantized ``x W + b``: NVFP4Linear's GEMMs on ``W^T`` (plain matmul for BF16)."""
        if self.recipe.is_high_precision:
            return nn.functional.linear(x, self.weight.t(), self.bias)
        dev_type = x.device.type
        if torch.is_autocast_enabled(dev_type):
            x = x.to(torch.get_autocast_dtype(dev_type))
        plan = self.plan(x.device)
        with torch.autocast(dev_type, enabled=False):
            return quantized_linear(x, self.weight.t(), self.bias, plan, self._sr_keys())


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` matrix that ``layer`` multiplies by: a Linear's weight, or the
    transposed weight (a view) of a Conv1D or NVFP4Conv1D."""
    if isinstance(layer, NVFP4Conv1D) or is_conv1d(layer):
        return layer.weight.t()
    return layer.weight


def quantized_linear_weight(layer: NVFP4Linear) -> QTensor:
    """The NVFP4 ``[out, in]`` weight of an NVFP4Linear or NVFP4Conv1D, as its forward GEMM
    uses it (:func:`~hf_nvfp4.nn.packed.quantized_weight`, the Conv1D's ``W^T`` included)."""
    if not isinstance(layer, NVFP4Conv1D):
        return quantized_weight(layer)
    spec = _role_specs(layer.recipe).w
    if spec is None or spec.fmt != "nvfp4":
        raise ValueError(
            f"only NVFP4 weights can be packed; this layer's recipe quantizes its weight as "
            f"{spec.fmt if spec else 'bf16'!r}"
        )
    return quantize_spec(weight_matrix(layer).detach(), spec)


class NVFP4PackedConv1D(NVFP4PackedLinear):
    """A packed :class:`NVFP4Conv1D`: the NVFP4PackedLinear of its ``W^T``.

    Buffers, checkpoint tensors and outputs are an NVFP4PackedLinear's (codes ``[out, in/2]``);
    only the trainable form differs: :meth:`to_linear` returns an NVFP4Conv1D, whose ``[in,
    out]`` weight is what a GPT-2 master checkpoint holds.
    """

    @classmethod
    def from_linear(cls, linear: NVFP4Linear) -> NVFP4PackedConv1D:
        """Pack an NVFP4Conv1D's weight exactly as its forward quantizes it."""
        if not isinstance(linear, NVFP4Conv1D):
            raise TypeError(f"expected an NVFP4Conv1D; got {type(linear).__name__}")
        new = cls.from_qtensor(
            quantized_linear_weight(linear), linear.bias, recipe=linear.recipe,
            backend=linear.backend_name, sr_seed=linear._sr_seed,
        )
        new.grad_sr_state = linear.sr_state.detach().clone()
        return new

    def to_linear(
        self, dtype: torch.dtype = torch.float32, sr_seed: int | None = None,
        reduce_amax: bool = False,
    ) -> NVFP4Conv1D:
        """An :class:`NVFP4Conv1D` whose master weight is the dequantized ``W^T`` transposed
        back to ``[in, out]`` (lossy, as :meth:`NVFP4PackedLinear.to_linear`)."""
        dev = self.weight_packed.device
        weight = nn.Parameter(self.dequantize_weight(dtype).t().contiguous().to(dev))
        bias = None
        if self.bias is not None:
            bias = nn.Parameter(self.bias.detach().to(device=dev, dtype=dtype).clone())
        return NVFP4Conv1D.from_weight(
            weight, bias, self.recipe, self.backend_name, sr_seed=sr_seed,
            reduce_amax=reduce_amax,
        )

    @property
    def weight(self) -> torch.Tensor:
        """The represented weight, dequantized, in Conv1D's ``[in, out]`` layout (a new tensor
        each read: writing to it changes nothing). transformers' GPT-2 weight init reads
        ``c_proj.weight`` while loading a packed checkpoint."""
        return self.dequantize_weight(self.weight_dtype).t()

    def extra_repr(self) -> str:  # noqa: D102
        return f"{super().extra_repr()}, conv1d=True"


__all__ = [
    "NVFP4Conv1D",
    "NVFP4PackedConv1D",
    "is_conv1d",
    "quantized_linear_weight",
    "weight_matrix",
]
