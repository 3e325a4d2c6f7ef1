"""Quantization telemetry: how much each tensor role loses to quantization.

Per role: the fraction of non-zero elements flushed to zero, the fraction saturated (above
the largest value its block can represent), and the quantization signal-to-noise ratio.
For the weight gradient, the ratio of its norm to the norm of the quantization noise the
NVFP4 wgrad GEMM adds: "FP4 All the Way" (arXiv 2505.19115) finds training stops improving
once this falls below sqrt(3).
"""

from __future__ import annotations

import math

import torch

from .backends.reference import quantize_spec, reference_gemm
from .numerics.quantize import QTensor
from .recipe import QuantSpec

SQRT3 = math.sqrt(3.0)


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
