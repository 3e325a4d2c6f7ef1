"""Export to compressed-tensors ``nvfp4-pack-quantized``: loads in vLLM and transformers.

Per quantized linear ``<name>`` (names and dtypes as llm-compressor writes them):

* ``weight_packed``       uint8 [out, in/2]   our codes (fused q/k/v and gate/up members share
  one global scale, see :mod:`.fusion`)
* ``weight_scale``        float8_e4m3fn [out, in/16]   our block decode scales, unchanged
  (2D 16x16 weight tiles are already stored as one scale per row and 16 columns)
* ``weight_global_scale`` float32 [1]  the ENCODE scale ``1 / S_dec`` = ``448*6 / amax``;
  compressed-tensors dequantizes ``code * weight_scale / weight_global_scale``
* ``input_global_scale``  float32 [1]  activation ENCODE scale ``448*6 / amax(x)`` from
  calibration (absent for the weight-only NVFP4A16 export)

Everything else is written in ``dtype`` (BF16); high-precision linears are listed in
``ignore``. No import of compressed-tensors is needed to write it.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_directory
from .calibrate import input_amax_or_fail
from .fusion import share_global_scales
from .layers import high_precision_state, iter_packed_layers
from .packed import save_config_files
from .shards import DEFAULT_MAX_SHARD_SIZE, write_sharded

FORMAT = "nvfp4-pack-quantized"
FP4_FP8_MAX = 448.0 * 6.0


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (None when not installed)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _args(dynamic: bool | str, observer: str) -> dict[str, Any]:
    return {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": 16,
        "strategy": "tensor_group",
        "dynamic": dynamic,
        "observer": observer,
        "scale_dtype": "torch.float8_e4m3fn",
        "actorder": None,
        "block_structure": None,
        "observer_kwargs": {},
    }


def _our_version() -> str:
    from .. import __version__

    return __version__


def compressed_tensors_config(ignore: list[str], weight_only: bool) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json, as llm-compressor writes it."""
    group = {
        "targets": ["Linear"],
        "weights": _args(False, "minmax"),
        "input_activations": None if weight_only else _args("local", "static_minmax"),
        "output_activations": None,
        "format": FORMAT,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "version": package_version("compressed-tensors") or "0.12.0",
        "producer": {"name": "hf_nvfp4", "version": _our_version()},
    }


def encode_scale(decode: torch.Tensor) -> torch.Tensor:
    """The ``[1]`` FP32 encode scale ``1 / decode`` (compressed-tensors' global scale)."""
    return (1.0 / decode.reshape(1).float()).float()


def export_compressed_tensors(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_amax: dict[str, float] | None = None,
    weight_only: bool = False,
    fuse_global_scales: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    tokenizer: Any = None,
    progress: bool = False,
) -> Path:
    """Write ``model`` as a compressed-tensors NVFP4 checkpoint at ``path`` (atomically).

    Args:
        model: a model with NVFP4Linear or NVFP4PackedLinear layers.
        input_amax: per-layer input amax from :func:`calibrate_input_amax` (W4A4).
        weight_only: write NVFP4A16 (``input_activations: null``, no input scales).
        fuse_global_scales: share one global scale within q/k/v and gate/up (see
            :mod:`.fusion`); False writes each layer's own quantization bit for bit.
        dtype, max_shard_size, tokenizer, progress: as :func:`save_packed`.
    """
    layers = list(iter_packed_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no NVFP4 layers to export")
    if fuse_global_scales:
        layers = share_global_scales(layers)
    names = [layer.name for layer in layers]
    if not weight_only:
        input_amax = input_amax_or_fail(input_amax, names)
    tensors = high_precision_state(model, set(names), dtype)
    for layer in tqdm(layers, desc="compressed-tensors export", disable=not progress):
        q, n = layer.weight, layer.name
        tensors[f"{n}.weight_packed"] = q.data
        tensors[f"{n}.weight_scale"] = q.scale
        tensors[f"{n}.weight_global_scale"] = encode_scale(q.global_scale)
        if not weight_only:
            amax = torch.tensor([input_amax[n]], dtype=torch.float32)
            tensors[f"{n}.input_global_scale"] = FP4_FP8_MAX / amax
        if layer.bias is not None:
            tensors[f"{n}.bias"] = layer.bias.detach().to(dtype)
    quantized = set(names)
    ignore = [n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n not in quantized]
    with atomic_directory(path) as tmp:
        write_sharded(tensors, tmp, max_shard_size=max_shard_size)
        save_config_files(model, tmp, {
            "quantization_config": compressed_tensors_config(ignore, weight_only),
            "dtype": str(dtype).split(".")[1],
        })
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


__all__ = [
    "FORMAT",
    "compressed_tensors_config",
    "encode_scale",
    "export_compressed_tensors",
    "package_version",
]
