"""The reference quantizer: one function for every block format, and the QTensor it returns.

This pure-PyTorch code (CPU or CUDA) is the single source of truth the kernels are tested
against. Formulas: :mod:`.scales` (the two-level scales), :mod:`.e2m1`, :mod:`.e4m3` and
:mod:`.hadamard`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import e2m1, e4m3
from .formats import BlockFormat, get_format
from .hadamard import RHT_SIZE, hadamard_transform
from .rng import counter_uniform, draw_seed, keyed_uniform
from .scales import (
    exp2_int,
    fp8_block_encode,
    nvfp4_block_scales,
    nvfp4_element_multiplier,
    nvfp4_global_encode,
    ue8m0_exponents,
)

ROUNDINGS = ("nearest", "stochastic")
_UE8M0_BIAS = 127
_UE8M0_NAN = 0xFF


@dataclass
class QTensor:
    """A block-quantized tensor.

    Attributes:
        data: the elements at the padded shape. FP4 formats: uint8, two codes per byte along
            the last dimension, the even element in the low nibble (``[..., cols/2]``);
            FP8 formats: float8_e4m3fn.
        scale: one block scale per row and block of columns (``[..., rows, cols/block]``; for
            2D tiles every row of a tile repeats the tile's scale, the layout checkpoints
            use). NVFP4: float8_e4m3fn decode scales; MX formats: uint8 biased exponents
            (UE8M0, value ``2**(byte - 127)``, 0xFF is NaN); FP8 block: float32 decode
            scales.
        global_scale: NVFP4's FP32 per-tensor decode scale ``S_dec = 1 / fp32(2688 / amax)``
            (0-dim); ``None`` for formats without one.
        fmt: the format name.
        shape: the logical shape (the input's; with ``rht=True`` the last dimension is
            padded to 16, since the transform mixes the padding into the data).
        dtype: the input dtype, the default of :meth:`dequantize`'s callers that round trip.
        tile: the scaling tile ``(rows, cols)``.
        rht: whether the values live in the Hadamard-transformed domain.
    """

    data: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None
    fmt: str
    shape: torch.Size
    dtype: torch.dtype
    tile: tuple[int, int]
    rht: bool = False

    @property
    def format(self) -> BlockFormat:
        """The :class:`BlockFormat` of this tensor."""
        return get_format(self.fmt)

    def block_values(self) -> torch.Tensor:
        """Element times block scale in FP32 at the padded shape, without the global scale.

        For NVFP4 these values are exact in BF16 (an E2M1 value times an E4M3 scale).
        """
        f = self.format
        if f.packed:
            elems = e2m1.decode(e2m1.unpack(self.data))
        else:
            elems = self.data.to(torch.float32)
        if f.scale == "e4m3":
            scale = self.scale.to(torch.float32)
        elif f.scale == "ue8m0":
            byte = self.scale.to(torch.int32)
            scale = torch.where(
                byte == _UE8M0_NAN, torch.nan, exp2_int((byte - _UE8M0_BIAS).clamp(max=127))
            )
        else:
            scale = self.scale
        return elems * scale.repeat_interleave(f.block, dim=-1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The represented values, cropped to :attr:`shape`, in ``dtype``.

        NVFP4: ``fp4_value(q) * fp32(s_b) * S_dec``.
        """
        vals = self.block_values()
        if self.global_scale is not None:
            vals = vals * self.global_scale
        return _crop(vals, self.shape).to(dtype)

    def nbytes(self) -> int:
        """Storage bytes of data, block scales and the global scale."""
        total = self.data.numel() * self.data.element_size()
        total += self.scale.numel() * self.scale.element_size()
        if self.global_scale is not None:
            total += self.global_scale.numel() * self.global_scale.element_size()
        return total


def _crop(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    if tuple(t.shape) == tuple(shape):
        return t
    return t[tuple(slice(0, s) for s in shape)]


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    pad_c = -x.shape[-1] % cols
    pad_r = -x.shape[-2] % rows if rows > 1 else 0
    if pad_c or pad_r:
        x = F.pad(x, (0, pad_c, 0, pad_r))
    return x


def _check_input(x: torch.Tensor, allow_nonfinite: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor; got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise TypeError(
            f"quantize needs a real floating-point tensor (float32, bfloat16, float16); "
            f"got dtype {x.dtype}"
        )
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"quantize expects an unquantized tensor; got dtype {x.dtype}")
    if not allow_nonfinite and x.numel():
        bad = ~torch.isfinite(x)
        n_bad = int(bad.sum())
        if n_bad:
            n_nan = int(torch.isnan(x).sum())
            raise ValueError(
                f"quantize input contains non-finite values: {n_nan} NaN and "
                f"{n_bad - n_nan} Inf of {x.numel()} elements; pass allow_nonfinite=True "
                "to propagate them through the scales as hardware does"
            )


def _check_options(f: BlockFormat, tile: tuple[int, int], rounding: str, rht: bool) -> None:
    if tile not in f.tiles:
        raise ValueError(f"tile {tile} is not valid for {f.name}; expected one of {f.tiles}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}")
    if rht and tile[0] != 1:
        raise ValueError(
            f"rht=True applies along the reduction dimension with 1D tiles; got tile {tile}"
        )


def quantize(
    x: torch.Tensor,
    fmt: str | BlockFormat = "nvfp4",
    *,
    tile: tuple[int, int] | None = None,
    rounding: str = "nearest",
    rht: bool = False,
    rht_sign: Sequence[int] | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    allow_nonfinite: bool = False,
    amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sr_key: torch.Tensor | None = None,
) -> QTensor:
    """Quantize ``x`` along its last dimension into a block-scaled format.

    Args:
        x: a real floating tensor of any rank (rank >= 2 for 2D tiles).
        fmt: ``"nvfp4"`` | ``"mxfp4"`` | ``"fp8_block"`` | ``"mxfp8"`` or a BlockFormat.
        tile: ``(1, block)`` (default) or ``(block, block)`` for 2D scaling over the last two
            dimensions (NVFP4 ``(16, 16)``, FP8 block ``(128, 128)``).
        rounding: ``"nearest"`` (ties to even) or ``"stochastic"``.
        rht: apply the 16-point random Hadamard transform along the last dimension first
            (output rounded to ``x.dtype``); the global amax is taken after it.
        rht_sign: the RHT sign vector (default: Transformer Engine's).
        generator: the torch.Generator that seeds stochastic rounding; the draw for each
            element is a hash of (seed, padded row-major index): see :mod:`.rng`.
        sr_key: instead of ``generator``, the 32-bit key of the draws as an integer tensor
            (0-dim, any device): ``rng.keyed_uniform(sr_key, ...)``; what the training
            path's device-side RNG state produces.
        allow_nonfinite: propagate NaN/Inf instead of raising.
        amax_reduce: NVFP4 only: maps the local per-tensor amax (FP32, 0-dim, taken after
            the RHT) to the one to use, e.g. a max all-reduce over data-parallel ranks so
            that every rank quantizes its shard of a batch with the global batch's scale.

    A last dimension (and for 2D tiles the second-to-last) that is not a multiple of the
    block is zero-padded internally and cropped again by :meth:`QTensor.dequantize`.
    """
    f = get_format(fmt)
    _check_input(x, allow_nonfinite)
    if amax_reduce is not None and not f.global_scale:
        raise ValueError(f"amax_reduce applies to formats with a global scale; got {f.name}")
    tile = (1, f.block) if tile is None else tuple(tile)
    _check_options(f, tile, rounding, rht)
    th, tw = tile
    if th > 1 and x.dim() < 2:
        raise ValueError(f"2D tile {tile} needs a tensor of rank >= 2; got shape {tuple(x.shape)}")

    squeeze = x.dim() == 1
    xp = _prepare(x.unsqueeze(0) if squeeze else x, th, tw, rht, rht_sign)
    logical_shape = (*x.shape[:-1], xp.shape[-1]) if rht else x.shape
    xf = xp.float()
    rows, cols = xf.shape[-2], xf.shape[-1]
    lead = xf.shape[:-2]
    blocks = xf.reshape(*lead, rows // th, th, cols // tw, tw)
    if xf.numel():
        block_amax = blocks.abs().amax(dim=(-3, -1), keepdim=True)
    else:
        block_amax = blocks.new_zeros((*lead, rows // th, 1, cols // tw, 1))

    global_scale = None
    if f.scale == "e4m3":
        amax = _abs_max(xf)
        if amax_reduce is not None:
            amax = amax_reduce(amax)
        s_enc = nvfp4_global_encode(amax)
        s_dec = torch.tensor(1.0, dtype=torch.float32, device=xf.device) / s_enc
        scale = nvfp4_block_scales(block_amax, s_enc)
        mult = nvfp4_element_multiplier(scale, s_dec)
        global_scale = s_dec
    elif f.scale == "ue8m0":
        k = ue8m0_exponents(block_amax, f.element_max)
        mult = exp2_int(-k)
        # E8M0 has one NaN encoding, 0xFF: a block whose amax is NaN keeps it.
        scale = torch.where(block_amax.isnan(), _UE8M0_NAN, k + _UE8M0_BIAS).to(torch.uint8)
    else:
        mult = fp8_block_encode(block_amax)
        scale = torch.tensor(1.0, dtype=torch.float32, device=xf.device) / mult

    v = (blocks * mult).clamp(-f.element_max, f.element_max).reshape(xf.shape)
    if rounding == "stochastic":
        if sr_key is not None:
            u = keyed_uniform(sr_key, v.shape, v.device)
        else:
            u = counter_uniform(draw_seed(generator), v.shape, v.device)
        codes = (e2m1 if f.packed else e4m3).round_stochastic(v, u)
    else:
        codes = (e2m1 if f.packed else e4m3).round_nearest(v)
    data = e2m1.pack(codes) if f.packed else codes

    # One scale per row and block of columns: expand 2D tiles over their rows.
    scale = scale.expand(*lead, rows // th, th, cols // tw, 1).reshape(*lead, rows, cols // tw)
    if squeeze:
        data, scale = data.squeeze(0), scale.squeeze(0)
    return QTensor(
        data=data.contiguous(),
        scale=scale.contiguous(),
        global_scale=global_scale,
        fmt=f.name,
        shape=torch.Size(logical_shape),
        dtype=x.dtype,
        tile=tile,
        rht=rht,
    )


def _prepare(
    x: torch.Tensor, th: int, tw: int, rht: bool, rht_sign: Sequence[int] | torch.Tensor | None
) -> torch.Tensor:
    """``x`` zero-padded to whole tiles and, with ``rht``, Hadamard-transformed along its last
    dimension (rounded to ``x.dtype``): the values whose amax and blocks quantization reads."""
    xp = _pad_to(x, th, tw)
    return hadamard_transform(xp, rht_sign) if rht else xp


def _abs_max(xf: torch.Tensor) -> torch.Tensor:
    return xf.abs().amax() if xf.numel() else xf.new_zeros(())


def tensor_amax(
    x: torch.Tensor,
    *,
    rht: bool = False,
    rht_sign: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """The FP32 0-dim per-tensor amax that :func:`quantize` derives NVFP4's global scale
    from, for a 1xN-block layout of ``x`` (taken after the RHT when ``rht``): the local
    amax that a data-parallel reduction combines before encoding."""
    tw = RHT_SIZE if rht else 1
    return _abs_max(_prepare(x, 1, tw, rht, rht_sign).float())


def transpose_tiles(q: QTensor) -> QTensor:
    """The quantization of ``W^T`` from that of a 2D ``W`` in square tiles: every tile
    transposed with its scale, the global scale kept. For round-to-nearest codes this equals,
    code for code, quantizing ``W^T`` itself: a square tile of ``W^T`` is a tile of ``W``
    transposed, with the same amax, scale and values.
    """
    th, tw = q.tile
    if len(q.shape) != 2 or th != tw or th == 1 or q.rht:
        raise ValueError(
            f"transpose_tiles needs a 2D tensor in square tiles without the RHT; got shape "
            f"{tuple(q.shape)}, tile {q.tile}, rht={q.rht}"
        )
    f = q.format
    if f.packed:
        data_t = e2m1.pack(e2m1.unpack(q.data).t())
    else:  # one byte per element: move bytes (FP8 copies are not implemented everywhere)
        data_t = q.data.view(torch.uint8).t().contiguous().view(q.data.dtype)
    raw = q.scale.view(torch.uint8) if q.scale.element_size() == 1 else q.scale
    scale_t = raw[::th].t().repeat_interleave(tw, dim=0).contiguous().view(q.scale.dtype)
    return QTensor(
        data=data_t.contiguous(),
        scale=scale_t,
        global_scale=q.global_scale,
        fmt=q.fmt,
        shape=torch.Size((q.shape[1], q.shape[0])),
        dtype=q.dtype,
        tile=q.tile,
        rht=False,
    )


def fake_quantize(
    x: torch.Tensor, fmt: str | BlockFormat = "nvfp4", **kwargs: Any
) -> torch.Tensor:
    """``quantize(x, fmt, **kwargs).dequantize(x.dtype)``: the values the format keeps."""
    return quantize(x, fmt, **kwargs).dequantize(x.dtype)


__all__ = [
    "QTensor", "quantize", "fake_quantize", "tensor_amax", "transpose_tiles", "ROUNDINGS",
    "RHT_SIZE",
]
