"""Emulated NVFP4 GEMM ``(A @ B^T) * (S_dec,a * S_dec,b)`` for A [M, K], B [N, K] (packed).

An E2M1 value times an E4M3 scale is exact in BF16, so a BF16 tensor-core GEMM with FP32
accumulation computes the FP4 GEMM up to summation order; the global scales multiply the
FP32 accumulator in the epilogue, before the single rounding to the output dtype.

:func:`gemm_scaled` is that GEMM on 16-bit operands: a persistent Triton kernel loading its
tiles with TMA (tensor descriptors), its config chosen per shape by measurement. Strategies of
:func:`gemm_nvfp4`, chosen per shape by measurement on the first call (:func:`gemm_choices`):

* ``dequant+triton``: dequantize both operands to BF16, then :func:`gemm_scaled`;
* ``dequant+cublas``: dequantize, cuBLAS to FP32 (``torch.mm(..., out_dtype=float32)``),
  then scale and cast in one Triton pass;
* ``fused``: Triton GEMM decoding packed codes and scales in its main loop (no BF16 copy;
  run only when named: on an H200 it took ~10x the time of ``dequant+triton``, as every
  program decodes its A and B tiles again, N/BN and M/BM times over, on the CUDA cores).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import interpreting
from ._common import cdiv, e2m1_decode, e4m3_decode, round_bf16
from ._tuning import choices, pick, shape_bucket
from .dequantize import dequantize_fp4


class _Cfg(NamedTuple):
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    subtile: bool = False  # store the epilogue in two [BM, BN/2] halves (less shared memory)
    ws: bool = False  # tl.range(warp_specialize=True) on the persistent loop
    split_k: int = 1  # K split over programs; FP32 partials summed by a second pass
    tma: bool = True  # False: the pointer-based, one-tile-per-program kernel

    @property
    def name(self) -> str:
        kind = "tma" if self.tma else "ptr"
        return (f"{kind}{self.bm}x{self.bn}x{self.bk}w{self.warps}s{self.stages}"
                + ("sub" if self.subtile else "") + ("ws" if self.ws else "")
                + (f"k{self.split_k}" if self.split_k > 1 else ""))


# Hopper candidates, measured on the first call of each shape. 128x256 and 256x128 tiles
# with 3 stages take 144 KiB of operand buffers; a whole FP32 epilogue tile (128 KiB) would
# not fit beside them, hence the subtiled stores.
_CUDA_CONFIGS = (
    _Cfg(128, 256, 64, 8, 3, subtile=True),
    _Cfg(256, 128, 64, 8, 3, subtile=True),
    _Cfg(128, 128, 64, 8, 4),
    _Cfg(128, 128, 64, 4, 4),
    _Cfg(128, 256, 64, 8, 3, subtile=True, ws=True),
)
_INTERPRET_CONFIGS = (
    _Cfg(32, 32, 32, 4, 1),
    _Cfg(32, 64, 32, 4, 1, subtile=True),
    _Cfg(32, 32, 32, 4, 1, split_k=2),
    _Cfg(32, 32, 32, 4, 1, tma=False),
)
_INTERPRET_CFGS = {c.name: c for c in _INTERPRET_CONFIGS}
_PTR_CONFIG = _Cfg(128, 128, 64, 8, 3, tma=False)  # operands TMA cannot describe
_FUSED_CUDA_CONFIG = _Cfg(128, 128, 64, 8, 3, tma=False)
_INTERPRET_NUM_SMS = 4  # several tiles per program, so the persistent loop is exercised
_GROUP_M = 8


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def _tile_mn(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles sweep the columns together (L2 reuse of B)."""
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (tile % group) % size_m, (tile % group) // size_m


@triton.jit
def _store_tile(c_ptr, out, rows, cols, M, N):
    tl.store(c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
             out.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _dot_acc(a, b, acc, INTERPRET: tl.constexpr):
    if INTERPRET:  # the interpreter's BF16 dot is wrong; FP32 is exact on these values
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b), acc)


@triton.jit
def _gemm_tma_kernel(a_desc, b_desc, c_desc, c_ptr, gsa_ptr, gsb_ptr, M, N, K,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, SPLIT_K: tl.constexpr,
                     C_TMA: tl.constexpr, SUBTILE: tl.constexpr, WARP_SPEC: tl.constexpr,
                     INTERPRET: tl.constexpr):
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    k_per = tl.cdiv(k_tiles, SPLIT_K)
    scale = tl.load(gsa_ptr) * tl.load(gsb_ptr)
    for t in tl.range(tl.program_id(0), num_m * num_n * SPLIT_K, NUM_SMS, flatten=True,
                      warp_specialize=WARP_SPEC):
        # The split index is the slowest one: programs running together share K ranges.
        split = t // (num_m * num_n)
        pid_m, pid_n = _tile_mn(t % (num_m * num_n), num_m, num_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        # TMA zero-fills the rows and the K tail past the tensor's end.
        for ki in range(split * k_per, min(split * k_per + k_per, k_tiles)):
            a = a_desc.load([off_m, ki * BK])
            b = b_desc.load([off_n, ki * BK])
            acc = _dot_acc(a, b, acc, INTERPRET)
        if SPLIT_K > 1:  # FP32 partial sums; scaled and rounded once after the reduction
            _store_tile(c_ptr + split * M * N, acc, off_m + tl.arange(0, BM),
                        off_n + tl.arange(0, BN), M, N)
        else:
            out = acc * scale
            if INTERPRET and c_ptr.dtype.element_ty == tl.bfloat16:
                out = round_bf16(out)
            if not C_TMA:  # row stride not a multiple of 16 bytes: no descriptor for C
                _store_tile(c_ptr, out, off_m + tl.arange(0, BM), off_n + tl.arange(0, BN),
                            M, N)
            elif SUBTILE:
                halves = tl.permute(tl.reshape(out, [BM, 2, BN // 2]), [0, 2, 1])
                left, right = tl.split(halves)
                c_desc.store([off_m, off_n], left.to(c_ptr.dtype.element_ty))
                c_desc.store([off_m, off_n + BN // 2], right.to(c_ptr.dtype.element_ty))
            else:
                c_desc.store([off_m, off_n], out.to(c_ptr.dtype.element_ty))


@triton.jit
def _load_operand(ptr, s_ptr, rows, n_rows, k0, K, stride, BR: tl.constexpr,
                  BK: tl.constexpr, PACKED: tl.constexpr):
    """Tiles of block values: ``(lo, hi)`` decoded from codes and scales, or ``(tile, 0)``.

    Packed, ``lo`` [BR, BK/2] holds the even elements of the K tile (low nibbles) and ``hi``
    the odd ones: both operands use the same permutation of K, so ``lo @ lo^T + hi @ hi^T``
    is the whole product, without interleaving the nibbles (tl.join + reshape).
    """
    rmask = rows[:, None] < n_rows
    # Both returns sit in if/else branches: Triton's code generator keeps compiling the
    # statements after a return inside a constexpr-true ``if``, and a second return of
    # another type there fails to compile (the interpreter, plain Python, never sees it).
    if PACKED:
        bcols = k0 // 2 + tl.arange(0, BK // 2)
        packed = tl.load(ptr + rows[:, None].to(tl.int64) * stride + bcols[None, :],
                         mask=rmask & (bcols[None, :] < K // 2), other=0).to(tl.int32)
        # Byte j holds elements 2j and 2j+1, both of block j // 8 (repeated addresses).
        scols = bcols // 8
        sbytes = tl.load(s_ptr + rows[:, None].to(tl.int64) * (K // 16) + scols[None, :],
                         mask=rmask & (scols[None, :] < K // 16), other=0)
        scale = e4m3_decode(sbytes.to(tl.int32))
        lo = (e2m1_decode(packed & 15) * scale).to(tl.bfloat16)
        hi = (e2m1_decode(packed >> 4) * scale).to(tl.bfloat16)
        return lo, hi
    else:
        cols = k0 + tl.arange(0, BK)
        tile = tl.load(ptr + rows[:, None].to(tl.int64) * stride + cols[None, :],
                       mask=rmask & (cols[None, :] < K), other=0.0)
        return tile, 0


@triton.jit
def _gemm_kernel(a_ptr, a_s_ptr, b_ptr, b_s_ptr, gsa_ptr, gsb_ptr, c_ptr, M, N, K,
                 stride_a, stride_b, PACKED: tl.constexpr, INTERPRET: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_mn(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    rows_a = pid_m * BM + tl.arange(0, BM)
    rows_b = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        a, a_hi = _load_operand(a_ptr, a_s_ptr, rows_a, M, k0, K, stride_a, BM, BK, PACKED)
        b, b_hi = _load_operand(b_ptr, b_s_ptr, rows_b, N, k0, K, stride_b, BN, BK, PACKED)
        acc = _dot_acc(a, b, acc, INTERPRET)
        if PACKED:
            acc = _dot_acc(a_hi, b_hi, acc, INTERPRET)
    out = acc * (tl.load(gsa_ptr) * tl.load(gsb_ptr))
    if INTERPRET and c_ptr.dtype.element_ty == tl.bfloat16:
        out = round_bf16(out)
    _store_tile(c_ptr, out, rows_a, rows_b, M, N)


@triton.jit
def _scale_cast_kernel(acc_ptr, gsa_ptr, gsb_ptr, out_ptr, n, PARTS: tl.constexpr,
                       INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
    """``out = (sum of PARTS FP32 partials [PARTS, n]) * gsa * gsb``, rounded once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.load(acc_ptr + offs, mask=offs < n)
    for p in tl.static_range(1, PARTS):
        acc += tl.load(acc_ptr + p * n + offs, mask=offs < n)
    out = acc * (tl.load(gsa_ptr) * tl.load(gsb_ptr))
    if INTERPRET and out_ptr.dtype.element_ty == tl.bfloat16:
        out = round_bf16(out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=offs < n)


def _scale_cast(acc: torch.Tensor, gsa: torch.Tensor, gsb: torch.Tensor, out: torch.Tensor,
                parts: int = 1) -> torch.Tensor:
    n = out.numel()
    _scale_cast_kernel[(cdiv(n, 4096),)](acc, gsa, gsb, out, n, PARTS=parts,
                                                 INTERPRET=interpreting(), BLOCK=4096,
                                                 num_warps=8)
    return out


def _tma_ok(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def _launch_scaled(a: torch.Tensor, b: torch.Tensor, gsa: torch.Tensor, gsb: torch.Tensor,
                   out_dtype: torch.dtype, cfg: _Cfg) -> torch.Tensor:
    (m, k), n = a.shape, b.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    interp = interpreting()
    if not cfg.tma:
        grid = (cdiv(m, cfg.bm) * cdiv(n, cfg.bn),)
        _gemm_kernel[grid](a, a, b, b, gsa, gsb, out, m, n, k, a.stride(0), b.stride(0),
                           PACKED=False, INTERPRET=interp, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
                           GROUP_M=_GROUP_M, num_warps=cfg.warps, num_stages=cfg.stages)
        return out
    a_desc = TensorDescriptor.from_tensor(a, [cfg.bm, cfg.bk])
    b_desc = TensorDescriptor.from_tensor(b, [cfg.bn, cfg.bk])
    c = out
    if cfg.split_k > 1:
        c = torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=a.device)
    c_tma = cfg.split_k == 1 and _tma_ok(out)
    c_desc = TensorDescriptor.from_tensor(
        out, [cfg.bm, cfg.bn // 2 if cfg.subtile else cfg.bn]) if c_tma else c
    num_sms = _INTERPRET_NUM_SMS if interp else _num_sms(a.device.index or 0)
    tiles = cdiv(m, cfg.bm) * cdiv(n, cfg.bn) * cfg.split_k
    _gemm_tma_kernel[(min(num_sms, tiles),)](
        a_desc, b_desc, c_desc, c, gsa, gsb, m, n, k, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
        GROUP_M=_GROUP_M, NUM_SMS=num_sms, SPLIT_K=cfg.split_k, C_TMA=c_tma,
        SUBTILE=cfg.subtile, WARP_SPEC=cfg.ws, INTERPRET=interp, num_warps=cfg.warps,
        num_stages=cfg.stages)
    if cfg.split_k > 1:
        _scale_cast(c, gsa, gsb, out, cfg.split_k)
    return out


def gemm_scaled_configs(a: torch.Tensor, b: torch.Tensor) -> dict[str, _Cfg]:
    """The kernel configs :func:`gemm_scaled` may choose from for these operands, by name."""
    if interpreting():
        return _INTERPRET_CFGS
    return _cuda_configs(a.shape[0], b.shape[0], a.shape[1], a.device.index or 0,
                         _tma_ok(a) and _tma_ok(b))


@functools.lru_cache(maxsize=1024)
def _cuda_configs(m: int, n: int, k: int, device: int, tma: bool) -> dict[str, _Cfg]:
    # Cached: this runs on every call, and host time matters for the small GEMMs.
    if not tma:
        return {_PTR_CONFIG.name: _PTR_CONFIG}
    cfgs = list(_CUDA_CONFIGS)
    # Few output tiles and a long K (wgrad of small layers): split K so that the 128x128
    # tiles fill one, two or three waves of the SMs (a partial last wave costs a whole one).
    tiles, sms = cdiv(m, 128) * cdiv(n, 128), _num_sms(device)
    splits = sorted({w * sms // tiles for w in (1, 2, 3)} if tiles < 2 * sms else set())
    cfgs += [_Cfg(128, 128, 64, 8, 4, split_k=s) for s in splits if 2 <= s <= k // 1024]
    return {c.name: c for c in cfgs}


def gemm_scaled(a: torch.Tensor, b: torch.Tensor, gsa: torch.Tensor, gsb: torch.Tensor,
                out_dtype: torch.dtype, config: str | None = None) -> torch.Tensor:
    """``(a @ b^T) * (gsa * gsb)`` [M, N] in ``out_dtype``, FP32 accumulation, one rounding.

    Args:
        a / b: BF16 or FP16 [M, K] and [N, K], K-contiguous (``stride(1) == 1``), K a
            multiple of 16; M and N arbitrary.
        gsa / gsb: FP32 device scalars (0-dim or [1]); read by the kernel, never the host.
        out_dtype: ``torch.bfloat16``, ``torch.float16`` or ``torch.float32``.
        config: a name from :func:`gemm_scaled_configs`, or None for the one measured fastest
            for this shape on its first call (a fixed one off CUDA and in deterministic mode).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"gemm_scaled needs a [M, K] and b [N, K]; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"gemm_scaled needs two bf16 or two fp16 operands; got {a.dtype}, "
                         f"{b.dtype}")
    if a.shape[1] % 16 or (a.stride(1) != 1 and a.shape[0] > 1) \
            or (b.stride(1) != 1 and b.shape[0] > 1):
        raise ValueError("gemm_scaled needs K-contiguous operands with K a multiple of 16")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported gemm_scaled out_dtype {out_dtype}")
    (m, k), n = a.shape, b.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=out_dtype, device=a.device)
    cfgs = gemm_scaled_configs(a, b)
    if config is None:
        key = ("gemm_scaled", shape_bucket(m), shape_bucket(n), shape_bucket(k), tuple(cfgs),
               a.dtype, out_dtype, a.device)

        def candidates() -> dict[str, Callable[[], torch.Tensor]]:
            out = {name: (lambda c=c: _launch_scaled(a, b, gsa, gsb, out_dtype, c))
                   for name, c in cfgs.items()}
            if not interpreting():
                out[_CUBLAS] = lambda: _cublas_scaled(a, b, gsa, gsb, out_dtype)
            return out

        config = pick(key, candidates, a.device, fixed=next(iter(cfgs)))
    if config == _CUBLAS:
        return _cublas_scaled(a, b, gsa, gsb, out_dtype)
    if config not in cfgs:
        raise ValueError(f"unknown gemm_scaled config {config!r}; expected one of "
                         f"{[*cfgs, _CUBLAS]}")
    return _launch_scaled(a, b, gsa, gsb, out_dtype, cfgs[config])


_CUBLAS = "cublas+scale"


def _cublas_scaled(a: torch.Tensor, b: torch.Tensor, gsa: torch.Tensor, gsb: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLAS to FP32, then one scale+cast pass: faster than the Triton kernels at some
    small shapes despite the FP32 round trip."""
    acc = torch.mm(a, b.t(), out_dtype=torch.float32)
    if out_dtype == torch.float32:
        return _scale_cast(acc, gsa, gsb, acc)
    return _scale_cast(acc, gsa, gsb, torch.empty_like(acc, dtype=out_dtype))


Operand = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]  # data, scale, S_dec, rows


def _fused_gemm(a: Operand, b: Operand, out_dtype: torch.dtype) -> torch.Tensor:
    (ad, ascale, ags, m), (bd, bscale, bgs, n) = a, b
    cfg = _INTERPRET_CONFIGS[0] if interpreting() else _FUSED_CUDA_CONFIG
    out = torch.empty((m, n), dtype=out_dtype, device=ad.device)
    grid = (cdiv(m, cfg.bm) * cdiv(n, cfg.bn),)
    _gemm_kernel[grid](ad, ascale.view(torch.uint8), bd, bscale.view(torch.uint8), ags, bgs,
                       out, m, n, ad.shape[1] * 2, ad.stride(0), bd.stride(0), PACKED=True,
                       INTERPRET=interpreting(), BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
                       GROUP_M=_GROUP_M, num_warps=cfg.warps, num_stages=cfg.stages)
    return out


def _dequant_triton_gemm(a: Operand, b: Operand, out_dtype: torch.dtype) -> torch.Tensor:
    (ad, ascale, ags, m), (bd, bscale, bgs, n) = a, b
    return gemm_scaled(dequantize_fp4(ad, ascale, None, m),
                       dequantize_fp4(bd, bscale, None, n), ags, bgs, out_dtype)


def _cublas_gemm(a: Operand, b: Operand, out_dtype: torch.dtype) -> torch.Tensor:
    (ad, ascale, ags, m), (bd, bscale, bgs, n) = a, b
    acc = torch.mm(dequantize_fp4(ad, ascale, None, m),
                   dequantize_fp4(bd, bscale, None, n).t(), out_dtype=torch.float32)
    return _scale_cast(acc, ags, bgs, torch.empty_like(acc, dtype=out_dtype))


_STRATEGIES: dict[str, Callable[[Operand, Operand, torch.dtype], torch.Tensor]] = {
    "dequant+triton": _dequant_triton_gemm,
    "dequant+cublas": _cublas_gemm,
    "fused": _fused_gemm,
}


def gemm_choices() -> dict[str, dict]:
    """Per ``gemm:M:N:K:out_dtype`` (and ``gemm_scaled:...``) measured so far: the strategy
    or config chosen, each one's ms."""
    return {k: v for k, v in choices().items() if k.startswith("gemm")}


def gemm_nvfp4(a: Operand, b: Operand, out_dtype: torch.dtype,
               strategy: str | None = None) -> torch.Tensor:
    """``(A @ B^T) * (S_dec,a * S_dec,b)`` [a rows, b rows] in ``out_dtype``.

    Args:
        a / b: ``(packed data [R, KP/2], E4M3 scale [R, KP/16], S_dec (0-dim or [1]),
            logical rows)``, both quantized along the same padded K.
        strategy: a name from the module docstring's list, or None to use the one measured
            fastest for this shape (``fused`` is only run when named).
    """
    if a[0].shape[1] != b[0].shape[1]:
        raise ValueError(
            f"gemm operands disagree on the padded reduction dimension: {a[0].shape[1] * 2} "
            f"vs {b[0].shape[1] * 2}"
        )
    if strategy is None:
        key = ("gemm", shape_bucket(a[3]), shape_bucket(b[3]), shape_bucket(a[0].shape[1] * 2),
               out_dtype, a[0].device)
        names = ("dequant+triton",) if interpreting() else ("dequant+triton", "dequant+cublas")
        strategy = pick(key, lambda: {
            n: (lambda fn=_STRATEGIES[n]: fn(a, b, out_dtype)) for n in names
        }, a[0].device, fixed="dequant+cublas")
    if strategy not in _STRATEGIES:
        raise ValueError(f"unknown gemm strategy {strategy!r}; expected one of "
                         f"{list(_STRATEGIES)}")
    return _STRATEGIES[strategy](a, b, out_dtype)
