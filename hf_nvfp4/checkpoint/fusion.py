"""One global scale per fused group (q/k/v, gate/up), as serving engines require.

vLLM, TensorRT-LLM and SGLang fuse ``q_proj``/``k_proj``/``v_proj`` into one GEMM (and
``gate_proj``/``up_proj``) and keep ONE global scale for the fused weight (vLLM takes the
largest of the members' and logs "the global scale for input or weight are different for
parallel layers"). Block scales that were computed against a smaller member's own global
scale would then be misread. llm-compressor (its fused weight observers) and ModelOpt
therefore quantize fused members with a shared global amax; so do our exports: each member
is re-quantized with the group's largest amax. The member that has that amax keeps its exact
codes and scales; the others are quantized from their master weight (NVFP4Linear) or their
dequantized values (NVFP4PackedLinear) and differ from the weights the model was trained
and evaluated with in some elements.

:func:`fuse_global_scales` measures that change per layer (:class:`WeightChange`: the max
absolute difference between the exported weight and the layer's own NVFP4 weight, and how
many elements changed); the exports log it (logger ``hf_nvfp4.checkpoint.fusion``, INFO)
and ``hf-nvfp4 export`` prints it. ``fuse_global_scales=False`` (``--no-fuse-global-scales``)
writes every layer's own quantization bit for bit instead.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..backends.reference import quantize_spec
from ..nn.conv1d import weight_matrix
from ..nn.linear import NVFP4Linear, _role_specs
from ..numerics.quantize import QTensor
from ..recipe import QuantSpec
from .layers import PackedLayer

logger = logging.getLogger(__name__)

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
        return weight_matrix(layer.module).detach(), _role_specs(layer.module.recipe).w
    return layer.weight.dequantize(torch.float32), QuantSpec("nvfp4", (1, 16))


@dataclass(frozen=True)
class WeightChange:
    """How sharing its group's global scale changed one layer's exported NVFP4 weight.

    Attributes:
        name: the layer.
        group: the fused group it belongs to (engine order).
        own_decode, shared_decode: its FP32 global decode scale before and after.
        max_abs_diff: ``max |W_export - W_model|`` over the dequantized weights, where
            ``W_model`` is the layer's own NVFP4 weight (what the model computes with).
        changed: elements whose dequantized value changed, of ``numel``.
    """

    name: str
    group: tuple[str, ...]
    own_decode: float
    shared_decode: float
    max_abs_diff: float
    changed: int
    numel: int

    def line(self) -> str:
        """One human-readable line for logs and the CLI."""
        leaves = "/".join(n.rpartition(".")[2] for n in self.group)
        return (
            f"{self.name}: shares the {leaves} global decode scale {self.shared_decode:.6g} "
            f"(own {self.own_decode:.6g}): max |dW| {self.max_abs_diff:.3g} against its "
            f"trained NVFP4 weight, {self.changed}/{self.numel} values changed"
        )


@dataclass
class Fusion:
    """The layers with shared group scales, the amax each re-quantized one used, the report."""

    layers: list[PackedLayer]
    amax: dict[str, float] = field(default_factory=dict)
    changes: list[WeightChange] = field(default_factory=list)

    def global_amax(self, layer: PackedLayer) -> float | None:
        """The global amax ``layer``'s exported weight was quantized with, where known.

        A re-quantized member's is its group's; an NVFP4Linear's is the FP32 ``max |W|`` of
        its master weight (weights take no RHT). A packed layer's checkpoint keeps only the
        decode scale, so its amax is unknown (None).
        """
        if layer.name in self.amax:
            return self.amax[layer.name]
        if isinstance(layer.module, NVFP4Linear):
            return float(layer.module.weight.detach().float().abs().amax())
        return None

    def log(self) -> None:
        """Log one INFO line per re-quantized layer and a summary line."""
        for change in self.changes:
            logger.info("%s", change.line())
        if self.changes:
            worst = max(self.changes, key=lambda c: c.max_abs_diff)
            logger.info(
                "fused global scales: %d of %d layers in fused groups changed, largest max "
                "|dW| %.3g (%s); --no-fuse-global-scales keeps every layer's own weights",
                sum(c.changed > 0 for c in self.changes), len(self.changes),
                worst.max_abs_diff, worst.name,
            )


def _change(name: str, group: list[str], old: QTensor, new: QTensor) -> WeightChange:
    diff = (new.dequantize() - old.dequantize()).abs()
    return WeightChange(
        name=name,
        group=tuple(group),
        own_decode=float(old.global_scale),
        shared_decode=float(new.global_scale),
        max_abs_diff=float(diff.max()) if diff.numel() else 0.0,
        changed=int((diff != 0).sum()),
        numel=diff.numel(),
    )


def fuse_global_scales(layers: list[PackedLayer]) -> Fusion:
    """``layers`` with the members of each fused group re-quantized to one global scale.

    All members are quantized with the group's largest source amax, so their global scales
    are bitwise equal; the member with that amax reproduces its own codes exactly (from a
    master weight; from packed values up to re-rounding). Groups whose members already
    share one scale are left as they are. Returns the new layers, the FP32 amax each
    re-quantized layer's global scale was computed from, and a :class:`WeightChange` per
    re-quantized layer.
    """
    by_name = {layer.name: layer for layer in layers}
    amaxes: dict[str, float] = {}
    changes: list[WeightChange] = []
    for members in fused_groups(list(by_name)):
        decode = {n: float(by_name[n].weight.global_scale) for n in members}
        if len(set(decode.values())) == 1:
            continue
        sources = {n: _source(by_name[n]) for n in members}
        amax = max(float(w.abs().amax()) for w, _ in sources.values())
        for name in members:
            w, spec = sources[name]
            layer = by_name[name]
            q = quantize_with_amax(w, spec, amax)
            changes.append(_change(name, members, layer.weight, q))
            amaxes[name] = amax
            by_name[name] = PackedLayer(name, layer.module, q, layer.bias)
    return Fusion([by_name[layer.name] for layer in layers], amaxes, changes)


def export_fusion(layers: list[PackedLayer], *, fuse: bool) -> Fusion:
    """The layers an export writes: fused when ``fuse`` (its report logged), else as is."""
    fusion = fuse_global_scales(layers) if fuse else Fusion(layers)
    fusion.log()
    return fusion


def share_global_scales(layers: list[PackedLayer]) -> list[PackedLayer]:
    """The layers of :func:`fuse_global_scales` alone."""
    return fuse_global_scales(layers).layers


__all__ = [
    "FUSED_SIBLINGS",
    "Fusion",
    "WeightChange",
    "export_fusion",
    "fuse_global_scales",
    "fused_groups",
    "quantize_with_amax",
    "share_global_scales",
]
