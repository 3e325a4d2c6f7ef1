"""Export to compressed-tensors ``nvfp4-pack-quantized``: loads in vLLM and transformers.

Per quantized linear ``<name>`` (names, dtypes and scale conventions as llm-compressor writes
them and compressed-tensors 0.20.1's ``NVFP4PackedCompressor`` reads them):

* ``weight_packed``       uint8 [out, in/2]   our codes, the even element in the low nibble
  (fused q/k/v and gate/up members share one global scale, see :mod:`.fusion`)
* ``weight_scale``        float8_e4m3fn [out, in/16]   our block decode scales, unchanged
  (2D 16x16 weight tiles are already stored as one scale per row and 16 columns)
* ``weight_global_scale`` float32 [1]   the global ENCODE scale ``S_enc``, computed as
  Transformer Engine computes it: ``fp32(448 * 6 / amax)`` of the FP32 weight amax (1 when
  amax is 0). Our decode scale is ``S_dec = fp32(1 / S_enc)``; compressed-tensors
  dequantizes ``code * (weight_scale / weight_global_scale)`` and vLLM decodes with
  ``1 / weight_global_scale``, which is our ``S_dec`` bit for bit.
* ``input_global_scale``  float32 [1]   the activation ENCODE scale ``fp32(448 * 6 / amax(x))``
  from calibration (absent for the weight-only NVFP4A16 export)

MoE experts (NVFP4 experts modules) are written as one such linear per expert, under the
per-expert names of the model's original checkpoint (``experts.{e}.gate_proj`` / ``up_proj``
/ ``down_proj`` for Qwen-MoE, ``block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2`` for
Mixtral), the other tensors renamed the same way; vLLM's compressed-tensors MoE methods load
them into their fused ``w13_*`` / ``w2_*`` parameters. See :mod:`.experts` for what is
refused. Their W4A4 ``input_global_scale`` needs a per-expert input amax in ``input_amax``
(keyed by those names), which :func:`calibrate_input_amax` does not measure.

``amax`` is known for a training model (the master weight's, or the fused group's) and
``S_enc`` is then exactly TE's. A model loaded from a packed checkpoint keeps only ``S_dec``;
its ``S_enc`` is ``fp32(1 / S_dec)``, one of the (one or two) FP32 values whose reciprocal
rounds to ``S_dec``: TE's own value unless two qualify, and decoding to ``S_dec`` either way.
llm-compressor's ``generate_gparam`` (compressed-tensors) computes ``2688 * (1 / amax)``
(torch's ``float / tensor``: two roundings) in the amax's dtype (BF16 for a BF16 model); that
differs from TE's single FP32 quotient in the last bits for about a quarter of FP32 amaxes,
and every bit for BF16. We store TE's, the value our block scales were computed with, so
that ``1 / weight_global_scale`` is our ``S_dec`` exactly.

``quantization_config`` is what ``ModelCompressor.update_config`` of compressed-tensors
writes for its ``NVFP4`` / ``NVFP4A16`` preset schemes: built with the library's own classes
when it is installed, else the same entries as compressed-tensors 0.20.1 writes them.
Everything else is written in ``dtype`` (BF16); high-precision linears are listed in
``ignore``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..numerics.scales import nvfp4_global_encode
from .atomic import atomic_directory
from .calibrate import input_amax_or_fail
from .experts import expert_export, require_expert_input_amax
from .fusion import export_fusion
from .layers import high_precision_state, iter_packed_layers, refuse_conv1d
from .packed import save_config_files
from .shards import DEFAULT_MAX_SHARD_SIZE, write_sharded

FORMAT = "nvfp4-pack-quantized"
# The compressed-tensors release whose config schema the fallback writes.
SCHEMA_VERSION = "0.20.1"


def _fallback_args(dynamic: bool | str) -> dict[str, Any]:
    """compressed-tensors 0.20.1's serialization of its NVFP4 preset ``QuantizationArgs``."""
    args: dict[str, Any] = {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": 16,
        "strategy": "tensor_group",
        "dynamic": dynamic,
        "scale_dtype": "torch.float8_e4m3fn",
    }
    if dynamic == "local":
        args["observer"] = "static_minmax"
    return args


def _fallback_config(ignore: list[str], weight_only: bool) -> dict[str, Any]:
    """The config compressed-tensors 0.20.1 writes, without importing it."""
    return {
        "version": SCHEMA_VERSION,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": _fallback_args(False),
            "input_activations": None if weight_only else _fallback_args("local"),
            "output_activations": None,
            "format": FORMAT,
        }},
        "kv_cache_scheme": None,
        "format": FORMAT,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": ignore,
        "moe_sparsity_config": None,
    }


def compressed_tensors_config(
    ignore: list[str], weight_only: bool, *, use_library: bool = True
) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json, as compressed-tensors writes it.

    With compressed-tensors installed (and ``use_library``) it is built from the library's
    ``NVFP4`` / ``NVFP4A16`` preset scheme and serialized the way
    ``ModelCompressor.update_config`` does; otherwise :func:`_fallback_config` writes the
    entries of compressed-tensors 0.20.1.
    """
    ignore = sorted(ignore)
    if not use_library:
        return _fallback_config(ignore, weight_only)
    try:
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    except ImportError:
        return _fallback_config(ignore, weight_only)
    scheme = preset_name_to_scheme("NVFP4A16" if weight_only else "NVFP4", ["Linear"])
    scheme.format = FORMAT
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=FORMAT,
                                quantization_status="compressed", ignore=ignore)
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **config.model_dump(mode="json", exclude=["quant_method"]),
    }


def encode_scale(decode: torch.Tensor, amax: float | None = None) -> torch.Tensor:
    """The ``[1]`` FP32 global encode scale ``S_enc`` of an NVFP4 weight with decode ``S_dec``.

    With the ``amax`` it was quantized with: TE's ``fp32(448 * 6 / amax)``, checked to be the
    one ``decode`` came from. Without: ``fp32(1 / S_dec)``, checked to round back to
    ``S_dec`` (see the module docstring).
    """
    decode = decode.reshape(()).float()
    if amax is not None:
        enc = nvfp4_global_encode(torch.tensor(amax, dtype=torch.float32))
    else:
        enc = torch.tensor(1.0) / decode
    if not torch.equal(torch.tensor(1.0) / enc, decode):
        raise ValueError(
            f"global encode scale {float(enc)!r} does not invert to the decode scale "
            f"{float(decode)!r} (amax {amax!r})"
        )
    return enc.reshape(1)


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
            :mod:`.fusion`; each re-quantized layer's change is logged at INFO); False
            writes each layer's own quantization bit for bit.
        dtype, max_shard_size, tokenizer, progress: as :func:`save_packed`.

    Raises ``ValueError`` naming the layer for GPT-2 ``Conv1D`` layers, which engines would
    not load as trained (see :func:`.layers.refuse_conv1d`), and naming the module for MoE
    experts whose per-expert layout is not determined (see :mod:`.experts`).
    """
    layers = list(iter_packed_layers(model))
    refuse_conv1d(layers, "export_compressed_tensors")
    experts = expert_export(model, "export_compressed_tensors")
    if not layers and not experts.layers:
        raise ValueError(f"{type(model).__name__} has no NVFP4 layers to export")
    fusion = export_fusion(layers + experts.layers, fuse=fuse_global_scales)
    for name, amax in experts.amax.items():
        fusion.amax.setdefault(name, amax)
    names = [layer.name for layer in fusion.layers]
    if not weight_only:
        require_expert_input_amax(input_amax, experts, "export_compressed_tensors")
        input_amax = input_amax_or_fail(input_amax, names)
    linear_names = {layer.name for layer in layers}
    tensors = high_precision_state(model, linear_names, dtype, skip_keys=experts.replaced)
    for layer in tqdm(fusion.layers, desc="compressed-tensors export", disable=not progress):
        q, n = layer.weight, layer.name
        tensors[f"{n}.weight_packed"] = q.data
        tensors[f"{n}.weight_scale"] = q.scale
        tensors[f"{n}.weight_global_scale"] = encode_scale(q.global_scale,
                                                           fusion.global_amax(layer))
        if not weight_only:
            amax = torch.tensor(input_amax[n], dtype=torch.float32)
            tensors[f"{n}.input_global_scale"] = nvfp4_global_encode(amax).reshape(1)
        if layer.bias is not None:
            tensors[f"{n}.bias"] = layer.bias.detach().to(dtype)
    tensors = experts.rename_all(tensors)
    quantized = set(names)
    ignore = [experts.rename_module(n) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n not in quantized]
    ignore += [experts.rename_module(n) for n in experts.routers]
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
    "SCHEMA_VERSION",
    "compressed_tensors_config",
    "encode_scale",
    "export_compressed_tensors",
]
