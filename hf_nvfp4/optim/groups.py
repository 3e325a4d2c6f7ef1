"""The rule that decides which parameters keep FP32 optimizer states."""

from __future__ import annotations

from typing import Any

from torch import nn

DEFAULT_MIN_QUANTIZED_NUMEL = 4096


def _is_norm(module: nn.Module) -> bool:
    # HF norms are their own classes (LlamaRMSNorm, ...); match by name as well as by type.
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(
        module
    ).__name__.lower().endswith("norm")


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    *,
    min_quantized_numel: int = DEFAULT_MIN_QUANTIZED_NUMEL,
    keep_embeddings_fp32: bool = True,
    keep_norms_fp32: bool = True,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a quantized-state and an FP32-state group.

    A parameter keeps FP32 moments when it has fewer than ``min_quantized_numel`` elements,
    belongs to a norm (``nn.LayerNorm``/``nn.RMSNorm``/any class named ``*Norm``) or to an
    ``nn.Embedding`` (and, for tied weights, wherever else it appears). Returns groups for
    :class:`~hf_nvfp4.optim.QuantizedAdamW` (the FP32 one carries ``quantize=False``); empty
    groups are left out.
    """
    if min_quantized_numel < 0:
        raise ValueError(f"min_quantized_numel must be >= 0; got {min_quantized_numel}")
    keep: set[int] = set()
    for module in model.modules():
        if (keep_norms_fp32 and _is_norm(module)) or (
            keep_embeddings_fp32 and isinstance(module, nn.Embedding)
        ):
            keep.update(id(p) for p in module.parameters(recurse=False))
    quantized, fp32 = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in keep or p.numel() < min_quantized_numel:
            fp32.append(p)
        else:
            quantized.append(p)
    groups = []
    if quantized:
        groups.append({"params": quantized, "weight_decay": weight_decay})
    if fp32:
        groups.append({"params": fp32, "weight_decay": weight_decay, "quantize": False})
    return groups
