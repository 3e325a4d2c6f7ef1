"""Quantization telemetry: how much each tensor role loses to quantization.

Per role: the fraction of non-zero elements flushed to zero, the fraction saturated (above
the largest value its block can represent), and the quantization signal-to-noise ratio.
For the weight gradient, the ratio of its norm to the norm of the quantization noise the
NVFP4 wgrad GEMM adds: "FP4 All the Way" (arXiv 2505.19115) finds training stops improving
once this falls below sqrt(3).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from .backends.reference import quantize_spec, reference_gemm
from .distributed import world_size
from .nn.conv1d import weight_matrix
from .nn.linear import NVFP4Linear
from .numerics.quantize import QTensor
from .quant.fsdp import GatheredWeight
from .recipe import QuantSpec

SQRT3 = math.sqrt(3.0)
WGRAD_NOISE_RATIO = "nvfp4/wgrad_noise_ratio"
"""The key of :meth:`QuantProbe.finish`'s wgrad noise ratio, compared with :data:`SQRT3`."""


def _block_limit(q: QTensor) -> torch.Tensor:
    """The largest magnitude each element's block can represent, at the logical shape."""
    f = q.format
    unit = QTensor(
        torch.full_like(q.data, 0x77) if f.packed else torch.full_like(q.data, f.element_max),
        q.scale, q.global_scale, q.fmt, q.shape, q.dtype, q.tile, q.rht,
    )
    return unit.dequantize()


def role_stats(x: torch.Tensor, spec: QuantSpec) -> dict[str, float]:
    """Flush-to-zero fraction, saturation fraction and SNR (dB) of quantizing ``x``.

    ``spec`` must be a non-RHT spec (RHT roles live in the transformed domain).
    """
    if spec.rht:
        raise ValueError("role_stats compares in the original domain; got an RHT spec")
    x = x.detach().reshape(-1, x.shape[-1]).float()
    q = quantize_spec(x, spec, torch.Generator().manual_seed(0))
    deq = q.dequantize()
    nonzero = x != 0
    noise = (deq - x).pow(2).sum()
    signal = x.pow(2).sum()
    return {
        "zero_frac": float(((deq == 0) & nonzero).sum() / nonzero.sum().clamp(min=1)),
        "sat_frac": float((x.abs() > _block_limit(q)).float().mean()),
        "snr_db": float(10 * torch.log10(signal / noise.clamp(min=1e-30))),
    }


def wgrad_noise_ratio(
    x: torch.Tensor, dy: torch.Tensor, dy_t: QuantSpec, x_t: QuantSpec
) -> float:
    """``||dW|| / ||dW_q - dW||`` for ``dW = dy^T x`` and its quantized wgrad GEMM."""
    x2 = x.detach().reshape(-1, x.shape[-1]).float()
    dy2 = dy.detach().reshape(-1, dy.shape[-1]).float()
    exact = dy2.t() @ x2
    g = torch.Generator().manual_seed(0)
    q = reference_gemm(
        quantize_spec(dy2.t().contiguous(), dy_t, g),
        quantize_spec(x2.t().contiguous(), x_t),
        torch.float32,
    )
    return float(exact.norm() / (q - exact).norm().clamp(min=1e-30))


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class QuantProbe:
    """Measures the quantization of a model's NVFP4 layers over one training step.

    :meth:`start` hooks a sample of the layers; the next forward and backward record, per
    layer, :func:`role_stats` of x, W and dy and the :func:`wgrad_noise_ratio`; :meth:`finish`
    removes the hooks and returns the means over the sampled layers (and over data-parallel
    ranks, so every rank sees the same values), keyed ``nvfp4/{x,w,dy}_{zero_frac,sat_frac,
    snr_db}`` and ``nvfp4/wgrad_noise_ratio``. Used by
    :class:`~hf_nvfp4.QuantTelemetryCallback` and by training loops of one's own.

    Args:
        max_layers: how many NVFP4 layers to sample (evenly spread).
    """

    def __init__(self, max_layers: int = 4) -> None:
        if max_layers < 1:
            raise ValueError(f"max_layers must be >= 1; got {max_layers}")
        self.max_layers = max_layers
        self._handles: list = []
        self._acc: dict[str, list[float]] = defaultdict(list)

    def layers(self, model: nn.Module) -> list[NVFP4Linear]:
        """The sampled quantized layers of ``model``."""
        layers = [
            m for m in _unwrap(model).modules()
            if isinstance(m, NVFP4Linear) and not m.recipe.is_high_precision
        ]
        stride = max(1, len(layers) // self.max_layers)
        return layers[::stride][: self.max_layers]

    def start(self, model: nn.Module) -> None:
        """Hook the sampled layers for the next forward and backward."""
        self.finish(None)
        for layer in self.layers(model):
            self._handles.append(layer.register_forward_hook(self._forward_hook))

    def finish(self, model: nn.Module | None) -> dict[str, float]:
        """Unhook; the statistics recorded since :meth:`start` (empty if none)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if not self._acc:
            return {}
        keys = sorted(self._acc)
        means = _mean_over_ranks([sum(self._acc[k]) / len(self._acc[k]) for k in keys], model)
        self._acc = defaultdict(list)
        return {f"nvfp4/{k}": v for k, v in zip(keys, means, strict=True)}

    def _forward_hook(self, layer: NVFP4Linear, inputs, output) -> None:
        specs = layer.recipe.role_specs()
        x = inputs[0]
        with torch.no_grad():
            if specs.x is not None:
                self._add("x", role_stats(x, specs.x))
            weight = weight_matrix(layer)
            # A weight FSDP2 gathered as codes has no high-precision values to compare with.
            if specs.w is not None and not isinstance(weight, GatheredWeight):
                self._add("w", role_stats(weight, specs.w))
        if output.requires_grad:
            output.register_hook(lambda dy: self._grad_hook(layer, x, dy))

    def _grad_hook(self, layer: NVFP4Linear, x: torch.Tensor, dy: torch.Tensor) -> None:
        specs = layer.recipe.role_specs()
        with torch.no_grad():
            if specs.dy is not None:
                self._add("dy", role_stats(dy, specs.dy))
            if specs.dy_t is not None:
                ratio = wgrad_noise_ratio(x, dy, specs.dy_t, specs.x_t)
                self._acc["wgrad_noise_ratio"].append(ratio)

    def _add(self, role: str, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            self._acc[f"{role}_{k}"].append(v)


def _mean_over_ranks(values: list[float], model: nn.Module | None) -> list[float]:
    """``values`` averaged over the ranks of the default process group (as they are without
    one): the statistics every rank logs and switches on."""
    ranks = world_size()
    if ranks == 1:
        return values
    device = next(_unwrap(model).parameters()).device if model is not None else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return (t / ranks).tolist()
