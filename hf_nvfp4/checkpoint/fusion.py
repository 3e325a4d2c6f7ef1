"""One global scale per fused group (q/k/v, gate/up), as serving engines require.

vLLM, TensorRT-LLM and SGLang fuse ``q_proj``/``k_proj``/``v_proj`` into one GEMM (and
``gate_proj``/``up_proj``) and keep ONE global scale for the fused weight, the largest of the
members' (vLLM logs "the global scale for input or weight are different for parallel
layers"). Block scales that were computed against a smaller member's own global scale would
then be misread. llm-compressor and ModelOpt therefore quantize fused members with a shared
global amax; so do our exports: each member is re-quantized with the group's largest amax.
The member that has that amax keeps its exact codes and scales; the others are quantized
from their master weight (NVFP4Linear) or their dequantized values (NVFP4PackedLinear) and
may differ from the training-time codes in a few elements.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..backends.reference import quantize_spec
from ..nn.linear import NVFP4Linear, _role_specs
from ..numerics.quantize import QTensor
from ..recipe import QuantSpec
from .layers import PackedLayer

FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def fused_groups(names: list[str]) -> list[list[str]]:
    """Groups of layer names that engines fuse (siblings under one parent), 2+ members."""
    by_key: dict[tuple[str, int], list[str]] = defaultdict(list)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for gi, group in enumerate(FUSED_SIBLINGS):
            if leaf in group:
                by_key[(parent, gi)].append(name)
    return [members for members in by_key.values() if len(members) > 1]


def quantize_with_amax(w: torch.Tensor, spec: QuantSpec, amax: float) -> QTensor:
    """NVFP4-quantize ``w`` [out, in] as if its global amax were ``amax`` (>= its own).

    One extra tile of rows holding ``amax`` sets the global scale and touches no other
    tile's block amax; it is cropped away again.
    """
    rows = spec.tile[0] if spec.tile[0] > 1 else 1
    pad = torch.zeros(rows, w.shape[1], dtype=w.dtype, device=w.device)
    pad[0, 0] = amax
    q = quantize_spec(torch.cat([w, pad]), spec)
    out = w.shape[0]
    return QTensor(q.data[:out], q.scale[:out], q.global_scale, q.fmt,
                   torch.Size(w.shape), q.dtype, q.tile, q.rht)


def _source(layer: PackedLayer) -> tuple[torch.Tensor, QuantSpec]:
    if isinstance(layer.module, NVFP4Linear):
        return layer.module.weight.detach(), _role_specs(layer.module.recipe).w
    return layer.weight.dequantize(torch.float32), QuantSpec("nvfp4", (1, 16))


def share_global_scales(layers: list[PackedLayer]) -> list[PackedLayer]:
    """``layers`` with the members of each fused group re-quantized to one global scale.

    All members are quantized with the group's largest source amax, so their global scales
    are bitwise equal; the member with that amax reproduces its own codes exactly (from a
    master weight; from packed values up to re-rounding).
    """
    by_name = {layer.name: layer for layer in layers}
    for members in fused_groups(list(by_name)):
        decode = {n: float(by_name[n].weight.global_scale) for n in members}
        if len(set(decode.values())) == 1:
            continue
        sources = {n: _source(by_name[n]) for n in members}
        amax = max(float(w.abs().amax()) for w, _ in sources.values())
        for name in members:
            w, spec = sources[name]
            layer = by_name[name]
            by_name[name] = PackedLayer(name, layer.module, quantize_with_amax(w, spec, amax),
                                        layer.bias)
    return [by_name[layer.name] for layer in layers]


__all__ = ["FUSED_SIBLINGS", "fused_groups", "quantize_with_amax", "share_global_scales"]
