"""Export to NVIDIA ModelOpt's NVFP4 checkpoint format (vLLM, TensorRT-LLM, SGLang).

Per quantized linear ``<name>`` (what vLLM's ``ModelOptNvFp4LinearMethod`` and
``ModelOptNvFp4W4A16LinearMethod`` create and load):

* ``weight``          uint8 [out, in/2]   our packed codes, the even element in the low
  nibble (ModelOpt's packing)
* ``weight_scale``    float8_e4m3fn [out, in/16]   our block decode scales
* ``weight_scale_2``  float32 scalar   our global DECODE scale ``S_dec = fp32(1 / S_enc)``,
  ``S_enc = fp32(448 * 6 / amax)`` (Transformer Engine's order). vLLM multiplies with it
  as stored (``alpha = input_scale * weight_scale_2``; Marlin for W4A16), so our weights
  decode exactly. ModelOpt itself computes ``fp32(amax / (6 * 448))`` and its block scales
  against that; the two differ in the last bit for some amax, and ours is the one our block
  scales were computed with.
* ``input_scale``     float32 scalar   activation DECODE scale ``fp32(amax(x) / (6 * 448))``
  from calibration, as ModelOpt computes it (vLLM quantizes activations with
  ``1 / input_scale``); W4A4 ``quant_algo: "NVFP4"`` only, absent for ``"W4A16_NVFP4"``

MoE experts are written as one such linear per expert under the model's original
per-expert names (see :mod:`.export_compressed_tensors` and :mod:`.experts`), which vLLM's
``ModelOptNvFp4FusedMoE`` loads into ``w13_*`` / ``w2_*`` (it keeps ``w13_weight_scale_2[:,
0]``, the gate's, for gate and up: ours are equal, from one fused matrix).

Fused q/k/v and gate/up members share one ``weight_scale_2`` and one ``input_scale`` (vLLM
keeps the max of each and warns when they differ; see :mod:`.fusion`).

``hf_quant_config.json`` holds ``producer`` and ``quantization`` {``quant_algo``,
``kv_cache_quant_algo``, ``group_size``, ``exclude_modules``} (vLLM requires the last three).
The producer name is ``"modelopt"`` because engines key on it; ``producer.version`` names
hf_nvfp4. config.json carries ``quantization_config: {quant_method: "modelopt",
quantization: {...}}`` (no producer there: some vLLM versions map a producer-tagged config
only for ``NVFP4`` and reject ``W4A16_NVFP4``; ``quant_method`` plus the FP4 ``quant_algo``
selects vLLM's ``modelopt_fp4`` for both).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_directory
from .calibrate import input_amax_or_fail
from .experts import expert_export, require_expert_input_amax
from .fusion import export_fusion
from .layers import high_precision_state, iter_packed_layers, refuse_conv1d
from .packed import save_config_files
from .shards import DEFAULT_MAX_SHARD_SIZE, write_sharded

HF_QUANT_CONFIG = "hf_quant_config.json"
FP4_FP8_MAX = 448.0 * 6.0


def modelopt_quant_config(exclude: list[str], weight_only: bool) -> dict[str, Any]:
    """The hf_quant_config.json content."""
    from .. import __version__

    return {
        "producer": {"name": "modelopt", "version": f"hf_nvfp4-{__version__}"},
        "quantization": {
            "quant_algo": "W4A16_NVFP4" if weight_only else "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": sorted(exclude),
        },
    }


def export_modelopt(
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
    """Write ``model`` as a ModelOpt NVFP4 checkpoint at ``path`` (atomically).

    Args:
        model: a model with NVFP4Linear or NVFP4PackedLinear layers.
        input_amax: per-layer input amax from :func:`calibrate_input_amax` (W4A4).
        weight_only: write ``W4A16_NVFP4`` without input scales.
        fuse_global_scales: share one global scale within q/k/v and gate/up (see
            :mod:`.fusion`; each re-quantized layer's change is logged at INFO); False
            writes each layer's own quantization bit for bit.
        dtype, max_shard_size, tokenizer, progress: as :func:`save_packed`.

    Raises ``ValueError`` naming the layer for GPT-2 ``Conv1D`` layers, which engines would
    not load as trained (see :func:`.layers.refuse_conv1d`), and naming the module for MoE
    experts whose per-expert layout is not determined (see :mod:`.experts`).
    """
    linears = list(iter_packed_layers(model))
    refuse_conv1d(linears, "export_modelopt")
    experts = expert_export(model, "export_modelopt")
    if not linears and not experts.layers:
        raise ValueError(f"{type(model).__name__} has no NVFP4 layers to export")
    layers = export_fusion(linears + experts.layers, fuse=fuse_global_scales).layers
    names = [layer.name for layer in layers]
    if not weight_only:
        require_expert_input_amax(input_amax, experts, "export_modelopt")
        input_amax = input_amax_or_fail(input_amax, names)
    linear_names = {layer.name for layer in linears}
    tensors = high_precision_state(model, linear_names, dtype, skip_keys=experts.replaced)
    for layer in tqdm(layers, desc="ModelOpt export", disable=not progress):
        q, n = layer.weight, layer.name
        tensors[f"{n}.weight"] = q.data
        tensors[f"{n}.weight_scale"] = q.scale
        tensors[f"{n}.weight_scale_2"] = q.global_scale.reshape(()).float()
        if not weight_only:
            amax = torch.tensor(input_amax[n], dtype=torch.float32)
            tensors[f"{n}.input_scale"] = amax / FP4_FP8_MAX
        if layer.bias is not None:
            tensors[f"{n}.bias"] = layer.bias.detach().to(dtype)
    tensors = experts.rename_all(tensors)
    quantized = set(names)
    exclude = [experts.rename_module(n) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n not in quantized]
    exclude += [experts.rename_module(n) for n in experts.routers]
    hf_quant = modelopt_quant_config(exclude, weight_only)
    with atomic_directory(path) as tmp:
        write_sharded(tensors, tmp, max_shard_size=max_shard_size)
        save_config_files(model, tmp, {
            "quantization_config": {"quant_method": "modelopt",
                                    "quantization": hf_quant["quantization"]},
            "dtype": str(dtype).split(".")[1],
        })
        (tmp / HF_QUANT_CONFIG).write_text(json.dumps(hf_quant, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


__all__ = ["HF_QUANT_CONFIG", "export_modelopt", "modelopt_quant_config"]
