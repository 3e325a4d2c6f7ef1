"""Fused AdamW step with NVFP4 moments: two passes over (grad, packed m, packed sqrt(v)).

The layout is :class:`hf_nvfp4.optim.state.MomentCodec`'s for ``nvfp4``: the flat moment in
blocks of 16 (or, with square tiles, 256) consecutive elements padded to whole blocks,
``data`` uint8 [padded / 2], ``scale`` one E4M3 byte per block, FP32 decode global scale; the
second moment is stored as ``sqrt(v)`` with positive values never encoded as 0.

NVFP4's global scale needs the amax of the *new* moments before any of them is encoded, so:

1. ``_moment_amax_kernel`` decodes m and sqrt(v), applies the moment updates in registers and
   folds ``max |m'|`` and ``max sqrt(v')`` into two floats (atomic max); nothing is stored;
2. ``_adamw_step_kernel`` repeats the moment updates, updates the parameter in FP32 and
   encodes m' and sqrt(v') in place with stochastic rounding (the counter hash of
   :mod:`hf_nvfp4.numerics.rng` over the flat index, as the reference quantizer).

Two launches per parameter and step, no allocations: a small per-parameter scratch buffer
carries the amaxes and the old global scales between the passes. If any new moment is NaN or
infinite, its amax is +inf and the second pass writes nothing: the caller reads the amaxes back
(:func:`step_was_finite`) and reports the parameter.

Per element that is ~19.6 bytes of traffic for an FP32 parameter with FP32 gradients, against
28 for torch's fused FP32 AdamW. The FP32 arithmetic follows ``torch.optim.AdamW`` op for op;
the compiler may contract multiply-adds, so values can differ from the unfused optimizer in
the last bit (and then, rarely, a stochastic-rounding decision).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    block_scale,
    cdiv,
    e2m1_decode,
    e2m1_stochastic,
    e4m3_decode,
    global_scales,
    pack_pairs,
    seed_key,
    uniform24,
    unpack_pairs,
)

_BLOCK = 1024  # elements per program: 64 NVFP4 blocks


@triton.jit
def _new_moments(g_ptr, m_data, m_scale, v_data, v_scale, m_gs, v_gs, start, n,
                 w1, beta2, one_minus_beta2, LERP_SMALL: tl.constexpr, TILE: tl.constexpr,
                 BLOCK: tl.constexpr):
    """FP32 ``m'``, ``v'`` [BLOCK // TILE, TILE] of the elements from ``start`` (0 beyond
    ``n``); one block scale per ``TILE`` consecutive elements."""
    offs = start + tl.arange(0, BLOCK)
    mask = tl.reshape(offs < n, [BLOCK // TILE, TILE])
    g = tl.reshape(tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32),
                   [BLOCK // TILE, TILE])
    pidx = start // 2 + tl.arange(0, BLOCK // 2)
    sidx = start // TILE + tl.arange(0, BLOCK // TILE)
    tiles = (n + TILE - 1) // TILE
    mc = unpack_pairs(tl.load(m_data + pidx, mask=pidx < tiles * (TILE // 2), other=0)[None, :],
                      1, BLOCK)
    vc = unpack_pairs(tl.load(v_data + pidx, mask=pidx < tiles * (TILE // 2), other=0)[None, :],
                      1, BLOCK)
    ms = e4m3_decode(tl.load(m_scale + sidx, mask=sidx < tiles, other=0).to(tl.int32))
    vs = e4m3_decode(tl.load(v_scale + sidx, mask=sidx < tiles, other=0).to(tl.int32))
    m = (tl.reshape(e2m1_decode(mc), [BLOCK // TILE, TILE]) * ms[:, None]) * m_gs
    v = (tl.reshape(e2m1_decode(vc), [BLOCK // TILE, TILE]) * vs[:, None]) * v_gs
    v = v * v
    if LERP_SMALL:
        m = m + w1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - w1)
    v = v * beta2 + one_minus_beta2 * g * g
    return tl.where(mask, m, 0.0), tl.where(mask, v, 0.0)


@triton.jit
def _moment_amax_kernel(g_ptr, m_data, m_scale, m_gs_ptr, v_data, v_scale, v_gs_ptr,
                        scratch_ptr, parity, n, w1, beta2, one_minus_beta2,
                        LERP_SMALL: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    m_gs, v_gs = tl.load(m_gs_ptr), tl.load(v_gs_ptr)
    if tl.program_id(0) == 0:  # the old global scales, for the second pass to decode with
        tl.store(scratch_ptr + 4, m_gs)
        tl.store(scratch_ptr + 5, v_gs)
    start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: tensors of 2^31+ elements
    m, v = _new_moments(g_ptr, m_data, m_scale, v_data, v_scale, m_gs, v_gs, start, n, w1,
                        beta2, one_minus_beta2, LERP_SMALL, TILE, BLOCK)
    # A NaN counts as +inf, so that any non-finite new moment makes its amax +inf.
    m_abs = tl.where(m == m, tl.abs(m), float("inf"))
    sqrt_v = tl.where(v == v, tl.sqrt_rn(v), float("inf"))
    amax_ptr = scratch_ptr + 2 * parity
    tl.atomic_max(amax_ptr, tl.max(tl.max(m_abs, axis=1), axis=0))
    tl.atomic_max(amax_ptr + 1, tl.max(tl.max(sqrt_v, axis=1), axis=0))


@triton.jit
def _encode(x, amax, gs_out_ptr, key, start, data_ptr, scale_ptr, n, FLOOR: tl.constexpr,
            TILE: tl.constexpr, BLOCK: tl.constexpr):
    """NVFP4-encode ``x`` [BLOCK // TILE, TILE] (stochastic rounding) as the elements from
    ``start`` of ``n``, one E4M3 scale per row of ``x``; ``n == 0`` stores nothing."""
    mult6, s_dec = global_scales(amax)
    if tl.program_id(0) == 0:
        tl.store(gs_out_ptr, s_dec, mask=n > 0)
    byte, mult = block_scale(tl.max(tl.abs(x), axis=1), mult6, s_dec)
    idx = tl.reshape(start + tl.arange(0, BLOCK), [BLOCK // TILE, TILE]).to(tl.uint32)
    codes = e2m1_stochastic(x * mult[:, None], uniform24(idx, key))
    if FLOOR:
        codes = tl.where((codes == 0) & (x > 0.0), 1, codes)
    tiles = (n + TILE - 1) // TILE
    pidx = start // 2 + tl.arange(0, BLOCK // 2)
    sidx = start // TILE + tl.arange(0, BLOCK // TILE)
    packed = tl.reshape(pack_pairs(tl.reshape(codes, [1, BLOCK]), 1, BLOCK), [BLOCK // 2])
    tl.store(data_ptr + pidx, packed, mask=pidx < tiles * (TILE // 2))
    tl.store(scale_ptr + sidx, byte.to(tl.uint8), mask=sidx < tiles)


@triton.jit(do_not_specialize=["m_key", "v_key", "parity"])
def _adamw_step_kernel(p_ptr, g_ptr, m_data, m_scale, m_gs_ptr, v_data, v_scale, v_gs_ptr,
                       scratch_ptr, parity, n, w1, beta2, one_minus_beta2, decay, step_size,
                       bc2_sqrt, eps, m_key, v_key, LERP_SMALL: tl.constexpr,
                       TILE: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: tensors of 2^31+ elements
    m, v = _new_moments(g_ptr, m_data, m_scale, v_data, v_scale, tl.load(scratch_ptr + 4),
                        tl.load(scratch_ptr + 5), start, n, w1, beta2, one_minus_beta2,
                        LERP_SMALL, TILE, BLOCK)
    amax_ptr = scratch_ptr + 2 * parity
    m_amax, v_amax = tl.load(amax_ptr), tl.load(amax_ptr + 1)
    # Non-finite new moments (amax +inf, see the first pass): store nothing (n_out = 0);
    # the optimizer reads the amaxes back and raises.
    finite = tl.maximum(m_amax, v_amax) <= 3.4028234663852886e38
    n_out = tl.where(finite, n, 0)
    offs = start + tl.arange(0, BLOCK)
    p = tl.load(p_ptr + offs, mask=offs < n_out, other=0.0)
    sqrt_v = tl.sqrt_rn(v)
    update = tl.reshape(m / (sqrt_v / bc2_sqrt + eps), [BLOCK])
    tl.store(p_ptr + offs, p * decay - step_size * update, mask=offs < n_out)
    _encode(m, m_amax, m_gs_ptr, m_key, start, m_data, m_scale, n_out, False, TILE, BLOCK)
    _encode(sqrt_v, v_amax, v_gs_ptr, v_key, start, v_data, v_scale, n_out, True, TILE, BLOCK)
    if tl.program_id(0) == 0:  # the next step folds its amaxes into the other pair
        tl.store(scratch_ptr + 2 * (1 - parity), 0.0)
        tl.store(scratch_ptr + 3 - 2 * parity, 0.0)


def new_scratch(device: torch.device) -> torch.Tensor:
    """The per-parameter work buffer of :func:`fused_adamw_nvfp4_` (FP32 [6], zeros): two
    pairs of new-moment amaxes (used on alternate steps, each zeroed by the step before its
    turn) and the old global scales, so that a step needs no allocation and no copy."""
    return torch.zeros(6, dtype=torch.float32, device=device)


def step_was_finite(scratches: list[torch.Tensor], steps: list[int]) -> list[bool]:
    """Whether each parameter's last :func:`fused_adamw_nvfp4_` call (at ``steps[i]``, with
    scratch ``scratches[i]``) wrote its update, i.e. its new moments were finite. One device
    synchronization for all parameters. A parameter whose step was skipped gets its amax pair
    zeroed, ready for the same step number again."""
    if not scratches:
        return []
    pairs = torch.stack([s[2 * (k % 2): 2 * (k % 2) + 2] for s, k in zip(scratches, steps,
                                                                         strict=True)])
    finite = torch.isfinite(pairs).all(dim=1).tolist()
    for s, k, ok in zip(scratches, steps, finite, strict=True):
        if not ok:
            s[2 * (k % 2): 2 * (k % 2) + 2] = 0.0
    return finite


def fused_adamw_nvfp4_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    scratch: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    m_seed: int,
    v_seed: int,
    square_tiles: bool = False,
) -> None:
    """One AdamW step on a contiguous FP32 ``param`` with NVFP4 moments, in place.

    ``state`` holds ``exp_avg_{data,scale,global_scale}`` and the same for ``exp_avg_sq``
    (sqrt-stored), as :class:`hf_nvfp4.optim.QuantizedAdamW` keeps them; ``scratch`` is this
    parameter's :func:`new_scratch` buffer, reused every step (``step`` picks its amax pair);
    ``m_seed`` and ``v_seed`` are the stochastic-rounding seeds of the two re-encodings;
    ``square_tiles``: one scale per 256 consecutive elements (MomentCodec's 16x16 tiles of the
    flat moment viewed as ``[-1, 16]``) instead of per 16. If a new moment is not finite,
    ``param`` and ``state`` are left unchanged (see :func:`step_was_finite`).
    """
    if param.dtype != torch.float32 or not param.is_contiguous():
        raise ValueError("the fused step needs a contiguous FP32 parameter")
    n = param.numel()
    g = grad.reshape(-1)
    if not g.is_contiguous():
        g = g.contiguous()
    w1 = 1.0 - beta1
    md, ms, mg = (state["exp_avg" + s] for s in ("_data", "_scale", "_global_scale"))
    vd, vs, vg = (state["exp_avg_sq" + s] for s in ("_data", "_scale", "_global_scale"))
    ms8, vs8 = ms.view(torch.uint8), vs.view(torch.uint8)
    grid = (cdiv(n, _BLOCK),)
    parity = step % 2
    common = dict(LERP_SMALL=w1 < 0.5, TILE=256 if square_tiles else 16, BLOCK=_BLOCK)
    _moment_amax_kernel[grid](g, md, ms8, mg, vd, vs8, vg, scratch, parity, n, w1, beta2,
                              1.0 - beta2, **common)
    _adamw_step_kernel[grid](
        param, g, md, ms8, mg, vd, vs8, vg, scratch, parity, n, w1, beta2, 1.0 - beta2,
        1.0 - lr * weight_decay, lr / (1.0 - beta1**step), (1.0 - beta2**step) ** 0.5, eps,
        seed_key(m_seed), seed_key(v_seed), **common,
    )
