"""The native packed checkpoint: ``save_packed`` writes NVFP4 weights as 4-bit codes.

Layout, per quantized linear ``<name>`` (all in safetensors, sharded past ``max_shard_size``
with a ``model.safetensors.index.json``):

=============================  ==============  ===========  ==================================
tensor                         dtype           shape        meaning
=============================  ==============  ===========  ==================================
``<name>.weight_packed``       uint8           [out, in/2]  E2M1 codes, even element low nibble
``<name>.weight_scale``        float8_e4m3fn   [out, in/16] block DECODE scales
``<name>.weight_global_scale`` float32         [] (0-dim)   DECODE global scale amax/(6*448)
``<name>.bias``                ``dtype``       [out]        unchanged bias
=============================  ==============  ===========  ==================================

MoE experts modules converted to NVFP4 are stored packed too, per expert (codes
[E, out, in/2], block scales [E, out, in/16], global scales [E]; see :mod:`.experts`).

Dequantization: ``w = e2m1(code) * fp32(weight_scale) * weight_global_scale``. Note the
global scale is the DECODE scale (what :class:`~hf_nvfp4.numerics.QTensor` holds);
compressed-tensors stores the ENCODE scale (its reciprocal) under the same name, ModelOpt
the decode scale as ``weight_scale_2``. Everything else (embeddings, norms, the output head,
layers kept in high precision) is stored in ``dtype`` (BF16 by default): a model trained in
FP32 then reloads with slightly different logits (BF16 rounding of those tensors; save with
``dtype=None`` or ``torch.float32`` for identical logits). ``save_packed`` says so when it
rounds.

``hf_nvfp4_checksums.json`` holds the SHA-256 of every tensor; loading checks it (see
:mod:`.checksums`) and checks that block and global scales are finite and non-negative.

``config.json`` carries our ``quantization_config`` with ``checkpoint_format: "packed"``, so
``from_pretrained`` (after ``import hf_nvfp4``) rebuilds NVFP4PackedLinear layers. With
``masters=True`` the full training state dict (FP32 masters, stochastic-rounding state) is
written alongside as ``masters*.safetensors`` (ignored by ``from_pretrained``, read by
``load_packed(mode="train")`` for an exact resume).

The default ``save_pretrained`` is unchanged: it writes master weights, which Trainer
checkpoints need.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import NVFP4Config
from ..schedule import is_switched
from .atomic import atomic_directory
from .checksums import write_manifest
from .experts import is_packed_experts, packed_experts_state, refuse_unpackable_experts
from .layers import high_precision_state, iter_packed_layers
from .shards import DEFAULT_MAX_SHARD_SIZE, write_sharded

PACKED_FORMAT = "packed"
PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale")
MASTERS_PREFIX = "masters"
FORMAT_METADATA = {"hf_nvfp4_format": "packed-v1"}
logger = logging.getLogger(__name__)


def _warn_if_rounded(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Say which high-precision tensors ``dtype`` rounds (e.g. FP32 norms stored as BF16)."""
    if dtype is None:
        return
    wider = sorted({str(p.dtype).split(".")[1] for p in model.parameters()
                    if p.is_floating_point() and p.element_size() > dtype.itemsize})
    if wider:
        logger.warning(
            "save_packed: high-precision tensors (%s) are stored as %s, so the reloaded model's "
            "logits differ slightly; pass dtype=None or torch.float32 (hf-nvfp4: --dtype "
            "float32) to keep them exact",
            ", ".join(wider), str(dtype).split(".")[1],
        )


def packed_config(model: nn.Module) -> NVFP4Config:
    """The model's NVFP4Config (or one from its layers), ``checkpoint_format="packed"``."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(qc, NVFP4Config):
        config = NVFP4Config(**copy.deepcopy(qc.to_dict()))
    elif isinstance(qc, dict) and qc.get("quant_method") == "hf_nvfp4":
        config = NVFP4Config(**copy.deepcopy(qc))
    else:
        layer = next(iter_packed_layers(model), None)
        recipe = layer.module.recipe if layer is not None else "nvfp4"
        config = NVFP4Config(recipe=recipe)
    config.checkpoint_format = PACKED_FORMAT
    return config


def packed_state_dict(
    model: nn.Module, dtype: torch.dtype | None = torch.bfloat16, progress: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of the native packed format (see the module docstring), in model order."""
    layers = list(iter_packed_layers(model))
    refuse_unpackable_experts(model, "save_packed")
    experts, replaced = packed_experts_state(model)
    if not layers and not experts:
        if is_switched(model):
            raise ValueError(
                f"{type(model).__name__}'s NVFP4 layers are switched to BF16 (late switch): "
                "there is nothing 4-bit to pack; save the master weights with save_pretrained, "
                "or call hf_nvfp4.restore_quantization(model) first to pack the NVFP4 form"
            )
        raise ValueError(
            f"{type(model).__name__} has no NVFP4 layers to pack; convert it first "
            "(hf_nvfp4.prepare_model or from_pretrained with NVFP4Config)"
        )
    names = {layer.name for layer in layers}
    out = high_precision_state(model, names, dtype, skip_keys=replaced)
    out.update(experts)
    for layer in tqdm(layers, desc="packing NVFP4 layers", disable=not progress):
        q = layer.weight
        out[f"{layer.name}.weight_packed"] = q.data
        out[f"{layer.name}.weight_scale"] = q.scale
        out[f"{layer.name}.weight_global_scale"] = q.global_scale.reshape(()).float()
        if layer.bias is not None:
            b = layer.bias.detach()
            out[f"{layer.name}.bias"] = b.to(dtype) if dtype is not None else b
    return out


def masters_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full training state (master weights in their dtype, SR state), tied tensors once."""
    from ..nn.packed import NVFP4PackedLinear

    packed = [n for n, m in model.named_modules()
              if isinstance(m, NVFP4PackedLinear) or is_packed_experts(m)]
    if packed:
        raise ValueError(
            f"masters=True needs master weights, but {len(packed)} layers are packed in memory "
            f"(e.g. {packed[0]!r}); load the checkpoint with mode='train' first"
        )
    return high_precision_state(model, set(), None)


def save_config_files(model: nn.Module, directory: Path, config_update: dict[str, Any]) -> None:
    """config.json (a copy of ``model.config`` with ``config_update``) and generation_config."""
    cfg = copy.deepcopy(model.config)
    for key, value in config_update.items():
        setattr(cfg, key, value)
    cfg.architectures = [type(model).__name__]
    cfg.save_pretrained(directory)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(directory)


def save_packed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    masters: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    tokenizer: Any = None,
    progress: bool = False,
) -> Path:
    """Save ``model`` as a native packed NVFP4 checkpoint at ``path``, atomically.

    Args:
        model: a transformers model with NVFP4Linear or NVFP4PackedLinear layers.
        path: the checkpoint directory; an existing one is replaced as a whole, only once
            the new one is completely written (a crash leaves the old one intact).
        dtype: dtype of the high-precision tensors (default BF16, which rounds FP32 norms,
            embeddings and the head: the reloaded logits differ slightly, and a warning says
            so; None keeps each tensor's dtype, which makes them identical to ``model``'s).
        masters: also write the full training state (``masters*.safetensors``).
        max_shard_size: shard limit, bytes or a string like ``"2GB"``.
        tokenizer: saved into the directory too when given.
        progress: show tqdm bars.

    Returns the checkpoint directory.
    """
    tensors = packed_state_dict(model, dtype, progress)
    master_tensors = masters_state_dict(model) if masters else None
    _warn_if_rounded(model, dtype)
    with atomic_directory(path) as tmp:
        files = write_sharded(tensors, tmp, max_shard_size=max_shard_size,
                              metadata=FORMAT_METADATA)
        if master_tensors is not None:
            files += write_sharded(
                master_tensors, tmp, prefix=MASTERS_PREFIX, max_shard_size=max_shard_size,
                metadata={"hf_nvfp4_format": "masters-v1"},
            )
        write_manifest(tmp, files)
        hp_dtype = dtype or next((t.dtype for t in tensors.values() if t.is_floating_point()
                                  and t.dtype != torch.float8_e4m3fn), torch.float32)
        save_config_files(
            model, tmp,
            {"quantization_config": packed_config(model), "dtype": str(hp_dtype).split(".")[1]},
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


__all__ = [
    "MASTERS_PREFIX",
    "PACKED_FORMAT",
    "PACKED_SUFFIXES",
    "masters_state_dict",
    "packed_config",
    "packed_state_dict",
    "save_config_files",
    "save_packed",
]
