"""Emulated NVFP4 GEMM ``(A @ B^T) * (S_dec,a * S_dec,b)`` for A [M, K], B [N, K] (packed).

An E2M1 value times an E4M3 scale is exact in BF16, so a BF16 tensor-core GEMM with FP32
accumulation computes the FP4 GEMM up to summation order; the global scales multiply the
FP32 accumulator in the epilogue, before the single rounding to the output dtype.

Strategies, chosen per shape by measurement on the first call (:func:`gemm_choices`):

* ``dequant+triton``: dequantize both operands to BF16, Triton GEMM with the scale epilogue;
* ``fused``: Triton GEMM decoding packed codes and scales in its main loop (no BF16 copy;
  measured on CUDA only when named, as it does not compile on Triton 3.6 yet);
* ``dequant+cublas``: dequantize, cuBLAS to FP32 (``torch.mm(..., out_dtype=float32)``),
  then scale and cast in one Triton pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._common import e2m1_decode, e4m3_decode, interpreting, round_bf16, unpack_pairs
from ._tuning import choices, pick
from .dequantize import dequantize_nvfp4

# (BM, BN, BK, num_warps, num_stages), measured on the first call of each shape.
_BF16_CONFIGS = ((128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3))
_FUSED_CONFIGS = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3))
_INTERPRET_CONFIG = (32, 32, 32, 4, 1)
_GROUP_M = 8


@triton.jit
def _load_operand(ptr, s_ptr, rows, n_rows, k0, KP, BR: tl.constexpr, BK: tl.constexpr,
                  PACKED: tl.constexpr):
    """A [BR, BK] BF16 tile of block values: loaded, or decoded from codes and scales."""
    rmask = rows[:, None] < n_rows
    if PACKED:
        bcols = k0 // 2 + tl.arange(0, BK // 2)
        packed = tl.load(ptr + rows[:, None].to(tl.int64) * (KP // 2) + bcols[None, :],
                         mask=rmask & (bcols[None, :] < KP // 2), other=0)
        scols = k0 // 16 + tl.arange(0, BK // 16)
        sbytes = tl.load(s_ptr + rows[:, None].to(tl.int64) * (KP // 16) + scols[None, :],
                         mask=rmask & (scols[None, :] < KP // 16), other=0)
        vals = tl.reshape(e2m1_decode(unpack_pairs(packed, BR, BK)), [BR, BK // 16, 16])
        vals = vals * e4m3_decode(sbytes.to(tl.int32))[:, :, None]
        return tl.reshape(vals, [BR, BK]).to(tl.bfloat16)
    cols = k0 + tl.arange(0, BK)
    return tl.load(ptr + rows[:, None].to(tl.int64) * KP + cols[None, :],
                   mask=rmask & (cols[None, :] < KP), other=0.0)


@triton.jit
def _gemm_kernel(a_ptr, a_s_ptr, b_ptr, b_s_ptr, gsa_ptr, gsb_ptr, c_ptr, M, N, KP,
                 PACKED: tl.constexpr, INTERPRET: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rows_a = pid_m * BM + tl.arange(0, BM)
    rows_b = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, KP, BK):
        a = _load_operand(a_ptr, a_s_ptr, rows_a, M, k0, KP, BM, BK, PACKED)
        b = _load_operand(b_ptr, b_s_ptr, rows_b, N, k0, KP, BN, BK, PACKED)
        if INTERPRET:  # the interpreter's BF16 dot is wrong; FP32 is exact on these values
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    out = acc * (tl.load(gsa_ptr) * tl.load(gsb_ptr))
    if INTERPRET and c_ptr.dtype.element_ty == tl.bfloat16:
        out = round_bf16(out)
    tl.store(c_ptr + rows_a[:, None].to(tl.int64) * N + rows_b[None, :],
             out.to(c_ptr.dtype.element_ty),
             mask=(rows_a[:, None] < M) & (rows_b[None, :] < N))


Operand = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]  # data, scale, S_dec, rows


def _triton_gemm(a: Operand, b: Operand, out_dtype: torch.dtype, packed: bool,
                 cfg: tuple[int, ...]) -> torch.Tensor:
    (ad, ascale, ags, m), (bd, bscale, bgs, n) = a, b
    kp = ad.shape[1] * 2
    bm, bn, bk, warps, stages = cfg
    if packed:
        a_t, a_s, b_t, b_s = ad, ascale.view(torch.uint8), bd, bscale.view(torch.uint8)
    else:
        a_t = dequantize_nvfp4(ad, ascale, None, m)
        b_t = dequantize_nvfp4(bd, bscale, None, n)
        a_s = b_s = a_t
    out = torch.empty((m, n), dtype=out_dtype, device=ad.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _gemm_kernel[grid](a_t, a_s, b_t, b_s, ags, bgs, out, m, n, kp,
                       PACKED=packed, INTERPRET=interpreting(), BM=bm, BN=bn, BK=bk,
                       GROUP_M=_GROUP_M, num_warps=warps, num_stages=stages)
    return out


def _cublas_gemm(a: Operand, b: Operand, out_dtype: torch.dtype) -> torch.Tensor:
    (ad, ascale, ags, m), (bd, bscale, bgs, n) = a, b
    av = dequantize_nvfp4(ad, ascale, None, m)
    bv = dequantize_nvfp4(bd, bscale, None, n)
    acc = torch.mm(av, bv.t(), out_dtype=torch.float32)
    out = torch.empty_like(acc, dtype=out_dtype)
    grid = (triton.cdiv(acc.numel(), 4096),)
    _scale_cast_kernel[grid](acc, ags, bgs, out, acc.numel(), INTERPRET=interpreting(),
                             BLOCK=4096, num_warps=8)
    return out


@triton.jit
def _scale_cast_kernel(acc_ptr, gsa_ptr, gsb_ptr, out_ptr, n, INTERPRET: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    out = tl.load(acc_ptr + offs, mask=offs < n) * (tl.load(gsa_ptr) * tl.load(gsb_ptr))
    if INTERPRET and out_ptr.dtype.element_ty == tl.bfloat16:
        out = round_bf16(out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=offs < n)


def _strategies() -> dict[str, Callable[[Operand, Operand, torch.dtype], torch.Tensor]]:
    if interpreting():
        return {
            "dequant+triton": lambda a, b, dt: _triton_gemm(a, b, dt, False, _INTERPRET_CONFIG),
            "fused": lambda a, b, dt: _triton_gemm(a, b, dt, True, _INTERPRET_CONFIG),
        }
    out: dict[str, Callable[[Operand, Operand, torch.dtype], torch.Tensor]] = {}
    for cfg in _BF16_CONFIGS:
        out[f"dequant+triton{cfg[:3]}"] = lambda a, b, dt, c=cfg: _triton_gemm(a, b, dt, False, c)
    out["dequant+cublas"] = _cublas_gemm
    # The fused kernel fails to compile on Triton 3.6 (H100, 2026-11-23; it passes in the
    # interpreter), so it is measured only when asked for by name.
    for cfg in _FUSED_CONFIGS:
        out[f"fused{cfg[:3]}"] = lambda a, b, dt, c=cfg: _triton_gemm(a, b, dt, True, c)
    return out


def gemm_choices() -> dict[str, dict]:
    """Per ``gemm:M:N:K:out_dtype`` measured so far: the strategy chosen, each one's ms."""
    return {k: v for k, v in choices().items() if k.startswith("gemm")}


def gemm_nvfp4(a: Operand, b: Operand, out_dtype: torch.dtype,
               strategy: str | None = None) -> torch.Tensor:
    """``(A @ B^T) * (S_dec,a * S_dec,b)`` [a rows, b rows] in ``out_dtype``.

    Args:
        a / b: ``(packed data [R, KP/2], E4M3 scale [R, KP/16], S_dec (0-dim or [1]),
            logical rows)``, both quantized along the same padded K.
        strategy: a name from the module docstring's list (with its config suffix on CUDA),
            or None to use the one measured fastest for this shape.
    """
    if a[0].shape[1] != b[0].shape[1]:
        raise ValueError(
            f"gemm operands disagree on the padded reduction dimension: {a[0].shape[1] * 2} "
            f"vs {b[0].shape[1] * 2}"
        )
    strategies = _strategies()
    if strategy is None:
        key = ("gemm", a[3], b[3], a[0].shape[1] * 2, out_dtype, a[0].device)
        cands = lambda: {
            n: (lambda fn=fn: fn(a, b, out_dtype))
            for n, fn in strategies.items()
            if interpreting() or not n.startswith("fused")
        }
        strategy = pick(key, cands, a[0].device, fixed="dequant+cublas")
    name = strategy
    if name not in strategies:
        raise ValueError(f"unknown gemm strategy {name!r}; expected one of {list(strategies)}")
    return strategies[name](a, b, out_dtype)
