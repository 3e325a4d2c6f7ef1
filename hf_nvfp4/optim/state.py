"""Packed storage of one optimizer moment in a block-scaled format.

A moment is flattened to 1D and quantized with the reference quantizer
(:func:`hf_nvfp4.numerics.quantize`): blocks are consecutive elements of the flattened tensor,
whatever its shape. With ``square_tiles=True`` the flat moment is viewed as ``[-1, block]``
and quantized with the format's 2D tile, so one scale covers ``block * block`` consecutive
elements and the stored scales shrink by ``block`` (NVFP4: 4.03 instead of 4.5 bits per
element). The packed tensors live in the optimizer state under ``{name}_data``,
``{name}_scale`` and, for NVFP4, ``{name}_global_scale``; the state dict saves them as they
are.

Second moments are non-negative and may be stored as ``sqrt(v)`` (see :class:`MomentCodec`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_nvfp4.numerics import QTensor, get_format, quantize
from hf_nvfp4.numerics.e2m1 import pack, unpack

STATE_FORMATS = ("nvfp4", "mxfp4", "fp8_block", "mxfp8")
_SUFFIXES = ("_data", "_scale", "_global_scale")
# The smallest positive E4M3 value (a subnormal, 2^-9): the floor for FP8-element moments.
_E4M3_MIN_POSITIVE = 2.0**-9


@dataclass(frozen=True)
class MomentCodec:
    """How one moment is stored.

    Attributes:
        fmt: a block format name from :data:`STATE_FORMATS`.
        rounding: ``"stochastic"`` (unbiased re-quantization, the default for moments whose
            per-step increments are far below one quantization step) or ``"nearest"``.
        sqrt: store ``sqrt(x)`` instead of ``x`` (second moment only; ``x >= 0``).
        floor_nonzero: a positive input never decodes to zero: codes that round a positive
            value to 0 are raised to the smallest positive code of the block. Used for the
            second moment, whose underflow would turn ``m / (sqrt(v) + eps)`` into ``m / eps``.
        square_tiles: scale tiles of ``block x block`` consecutive elements instead of
            ``block`` (the format's 2D tile over the flat moment viewed as ``[-1, block]``).
    """

    fmt: str
    rounding: str = "stochastic"
    sqrt: bool = False
    floor_nonzero: bool = False
    square_tiles: bool = False

    def __post_init__(self) -> None:
        if self.fmt not in STATE_FORMATS:
            raise ValueError(
                f"optimizer state format must be one of {STATE_FORMATS} or None; got {self.fmt!r}"
            )
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic'; got {self.rounding!r}")

    @property
    def block(self) -> int:
        """Elements per block scale along the flat moment."""
        return get_format(self.fmt).block

    def _view(self, flat: torch.Tensor) -> torch.Tensor:
        if not self.square_tiles:
            return flat
        pad = -flat.numel() % (self.block * self.block)
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        return flat.view(-1, self.block)

    def encode(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Quantize an FP32 moment; returns the packed tensors keyed by suffix.

        ``x`` is read as a flat FP32 tensor; with :attr:`sqrt` it must be non-negative.
        """
        flat = x.detach().reshape(-1).float()
        if self.sqrt:
            flat = flat.sqrt()
        src = self._view(flat)
        tile = (self.block, self.block) if self.square_tiles else None
        q = quantize(src, self.fmt, tile=tile, rounding=self.rounding, generator=generator)
        data = q.data
        if self.floor_nonzero:
            data = _floor_nonzero(q, src)
        scale = q.scale[:: self.block] if self.square_tiles else q.scale
        out = {"_data": data, "_scale": scale.contiguous()}
        if q.global_scale is not None:
            out["_global_scale"] = q.global_scale
        return out

    def decode(self, packed: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        """The FP32 moment (flat, ``numel`` elements) that :meth:`encode` stored."""
        scale = packed["_scale"]
        if self.square_tiles:
            scale = scale.repeat_interleave(self.block, dim=0)
            shape = torch.Size((scale.shape[0], self.block))
            tile = (self.block, self.block)
        else:
            shape = torch.Size((numel,))
            tile = (1, self.block)
        q = QTensor(
            data=packed["_data"],
            scale=scale,
            global_scale=packed.get("_global_scale"),
            fmt=self.fmt,
            shape=shape,
            dtype=torch.float32,
            tile=tile,
        )
        flat = q.dequantize(torch.float32).reshape(-1)[:numel]
        return flat * flat if self.sqrt else flat

    def packed_shapes(self, numel: int) -> dict[str, torch.Size]:
        """The shape of each packed tensor :meth:`encode` returns for ``numel`` elements."""
        f = get_format(self.fmt)
        b, per_byte = self.block, 2 if f.packed else 1
        if self.square_tiles:
            padded = -(-numel // (b * b)) * b * b
            shapes = {"_data": (padded // b, b // per_byte), "_scale": (padded // (b * b), 1)}
        else:
            padded = -(-numel // b) * b
            shapes = {"_data": (padded // per_byte,), "_scale": (padded // b,)}
        if f.global_scale:
            shapes["_global_scale"] = ()
        return {k: torch.Size(v) for k, v in shapes.items()}

    def storage_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype of each packed tensor, by suffix (restored after ``load_state_dict``)."""
        f = get_format(self.fmt)
        dtypes = {"_data": torch.uint8 if f.packed else torch.float8_e4m3fn}
        dtypes["_scale"] = {
            "e4m3": torch.float8_e4m3fn,
            "ue8m0": torch.uint8,
            "fp32": torch.float32,
        }[f.scale]
        if f.global_scale:
            dtypes["_global_scale"] = torch.float32
        return dtypes


def _floor_nonzero(q: QTensor, src: torch.Tensor) -> torch.Tensor:
    """``q.data`` with every zero code whose source value is positive raised to the smallest
    positive code (E2M1 code 1 = 0.5, or the smallest E4M3 subnormal)."""
    positive = src > 0
    width = q.data.shape[-1] * (2 if q.format.packed else 1)
    pad = width - src.shape[-1]
    if pad:
        positive = torch.nn.functional.pad(positive, (0, pad))
    if q.format.packed:
        codes = unpack(q.data)
        codes = torch.where((codes == 0) & positive, torch.ones_like(codes), codes)
        return pack(codes)
    underflow = (q.data.float() == 0) & positive
    tiny = torch.full_like(q.data.float(), _E4M3_MIN_POSITIVE).to(q.data.dtype)
    return torch.where(underflow, tiny, q.data)


def store(
    state: dict, name: str, codec: MomentCodec, x: torch.Tensor, generator: torch.Generator | None
) -> None:
    """Quantize ``x`` with ``codec`` into ``state`` under ``name`` + suffix."""
    for suffix, t in codec.encode(x, generator).items():
        state[name + suffix] = t


def load(state: dict, name: str, codec: MomentCodec, numel: int) -> torch.Tensor:
    """The FP32 flat moment ``name`` stored by :func:`store`."""
    packed = {s: state[name + s] for s in _SUFFIXES if name + s in state}
    return codec.decode(packed, numel)


def restore_dtypes(state: dict, name: str, codec: MomentCodec, numel: int) -> None:
    """Check the packed tensors of a ``numel``-element moment and cast them back to their
    storage dtypes in place.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to the
    parameter's dtype; uint8 codes and E4M3/FP32 scales survive the FP32 round trip exactly.
    The results are copies: the fused step writes them in place, which must not reach the
    state dict they were loaded from.
    """
    shapes = codec.packed_shapes(numel)
    for suffix, dtype in codec.storage_dtypes().items():
        key = name + suffix
        if key not in state:
            raise KeyError(f"optimizer state is missing {key!r} for format {codec.fmt!r}")
        if state[key].shape != shapes[suffix]:
            raise ValueError(
                f"saved optimizer state {key!r} has shape {tuple(state[key].shape)}, but a "
                f"{numel}-element parameter stored as {codec.fmt!r} with square_tiles="
                f"{codec.square_tiles} needs {tuple(shapes[suffix])}: the state was saved "
                "with another format, square_tiles setting or parameter shape"
            )
        state[key] = state[key].to(dtype, copy=True)  # never alias the loaded state dict


def packed_nbytes(state: dict) -> int:
    """Bytes of every tensor in one parameter's optimizer state (the ``step`` counter too)."""
    return sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
