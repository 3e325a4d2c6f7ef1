"""The quantized linear layers of a model, as packed NVFP4 tensors, whatever module holds them.

Exports and the packed save read weights through :func:`iter_packed_layers`, so they work the
same on a training model (``NVFP4Linear``, quantized from its master weight exactly as its
forward does) and on a loaded packed model (``NVFP4PackedLinear``). A GPT-2 ``Conv1D`` layer
(``NVFP4Conv1D``, ``NVFP4PackedConv1D``) yields the ``[out, in]`` weight it multiplies by.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.conv1d import NVFP4Conv1D, NVFP4PackedConv1D, quantized_linear_weight
from ..nn.linear import NVFP4Linear
from ..nn.packed import NVFP4PackedLinear
from ..numerics.quantize import QTensor


@dataclass
class PackedLayer:
    """One quantized linear: its module name, module, NVFP4 weight and bias."""

    name: str
    module: nn.Module
    weight: QTensor
    bias: torch.Tensor | None


def is_quantized_linear(module: nn.Module) -> bool:
    """True for NVFP4PackedLinear and for an NVFP4Linear whose forward is quantized, in any
    format (NVFP4, MXFP4, FP8 block: :func:`iter_packed_layers` then refuses the non-NVFP4
    ones by name rather than skip them)."""
    if isinstance(module, NVFP4PackedLinear):
        return True
    if isinstance(module, NVFP4Linear):
        return module.recipe.fprop_format != "bf16"
    return False


def iter_packed_layers(model: nn.Module) -> Iterator[PackedLayer]:
    """Yield every quantized linear of ``model`` with its weight as an NVFP4 QTensor.

    Raises ``ValueError`` naming the layer if an NVFP4Linear's recipe quantizes its weight
    in another format (MXFP4, FP8), which has no packed NVFP4 form.
    """
    for name, mod in model.named_modules():
        if isinstance(mod, NVFP4PackedLinear):
            yield PackedLayer(name, mod, mod.packed_weight(), mod.bias)
        elif isinstance(mod, NVFP4Linear) and is_quantized_linear(mod):
            try:
                q = quantized_linear_weight(mod)
            except ValueError as e:
                raise ValueError(f"layer {name!r}: {e}") from e
            yield PackedLayer(name, mod, q, mod.bias)


def refuse_conv1d(layers: list[PackedLayer], export: str) -> None:
    """Raise ``ValueError`` naming the first GPT-2 ``Conv1D`` layer among ``layers``.

    Engines load GPT-2's ``c_attn``/``c_proj``/``c_fc`` as Conv1D tensors: vLLM transposes
    every ``.weight`` of them (ModelOpt's packed codes are stored as ``.weight``), and the
    compressed-tensors config targets ``Linear`` modules, which transformers' GPT-2 Conv1D is
    not, so an ``export`` of these layers would not load as the model trained.
    """
    for layer in layers:
        if isinstance(layer.module, (NVFP4Conv1D, NVFP4PackedConv1D)):
            raise ValueError(
                f"{export} cannot export layer {layer.name!r}: it is a GPT-2-style Conv1D "
                "(weight stored [in, out]), which engines load as a transposed high-precision "
                "'.weight' (vLLM) or leave unquantized (compressed-tensors targets Linear "
                "modules); save the model with hf_nvfp4.checkpoint.save_packed instead"
            )


def high_precision_state(
    model: nn.Module, skip_modules: set[str], dtype: torch.dtype | None,
    skip_keys: set[str] | frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers outside ``skip_modules`` (and other than
    ``skip_keys``, e.g. packed experts' parameters), floats cast to ``dtype``.

    Tied tensors (the same storage under two names, e.g. a tied output head) are written
    once, under the first name; transformers re-ties them on load.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for key, t in model.state_dict().items():
        module_name = key.rpartition(".")[0]
        if module_name in skip_modules or key in skip_keys:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.device.type != "meta" and ident in seen:
            continue
        seen.add(ident)
        if dtype is not None and t.is_floating_point() and t.dtype != torch.float8_e4m3fn:
            t = t.to(dtype)
        out[key] = t
    return out


__all__ = [
    "PackedLayer",
    "high_precision_state",
    "is_quantized_linear",
    "iter_packed_layers",
    "refuse_conv1d",
]
