"""The training recipe: what each GEMM of a linear layer quantizes, and how.

Three tiers (as in Transformer Engine): a :class:`Recipe` says *what* (format per GEMM, RHT,
stochastic rounding, 2D weights); :meth:`Recipe.role_specs` maps it to one
:class:`QuantSpec` per tensor role; backends receive only QuantSpecs.

Roles of ``y = x W^T`` (``x``: [M, K], ``W``: [N, K], ``dy``: [M, N]):

=============  ===========  ==========================================================
role           GEMM         paper's NVFP4 recipe
=============  ===========  ==========================================================
``x``          fprop        1x16 along K, nearest
``w``          fprop/dgrad  16x16 tiles (W and W^T from the same tiles), nearest
``dy``         dgrad        1x16 along N, stochastic
``dy_t``       wgrad        dy^T, 1x16 along M after the RHT, stochastic
``x_t``        wgrad        x^T, 1x16 along M after the RHT, nearest
=============  ===========  ==========================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .numerics.formats import FORMATS, get_format
from .numerics.hadamard import TE_RHT_SIGN

GEMM_FORMATS = (*FORMATS, "bf16")
HIGH_PRECISION = "bf16"


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor role is quantized: the arguments of :func:`numerics.quantize`."""

    fmt: str
    tile: tuple[int, int]
    rounding: str = "nearest"
    rht: bool = False
    rht_sign: tuple[int, ...] = TE_RHT_SIGN


@dataclass(frozen=True)
class RoleSpecs:
    """The QuantSpec of every role; ``None`` means the role's GEMM runs in high precision."""

    x: QuantSpec | None
    w: QuantSpec | None
    dy: QuantSpec | None
    dy_t: QuantSpec | None
    x_t: QuantSpec | None
    w_dgrad: QuantSpec | None = field(default=None)


@dataclass(frozen=True)
class Recipe:
    """Per-linear-layer numerics, every knob switchable for ablations.

    Args:
        fprop_format / dgrad_format / wgrad_format: ``"nvfp4"`` | ``"mxfp4"`` |
            ``"fp8_block"`` | ``"mxfp8"`` | ``"bf16"`` for each GEMM.
        weight_2d: quantize W in square tiles (16x16 for NVFP4) so W and W^T agree.
        rht: random Hadamard transform on both wgrad operands along the token dimension.
        stochastic_rounding: stochastic rounding of the gradient (dgrad and wgrad ``dy``).
        rht_sign: the 16-entry RHT sign vector (Transformer Engine's by default).
    """

    fprop_format: str = "nvfp4"
    dgrad_format: str = "nvfp4"
    wgrad_format: str = "nvfp4"
    weight_2d: bool = True
    rht: bool = True
    stochastic_rounding: bool = True
    rht_sign: tuple[int, ...] = TE_RHT_SIGN

    def __post_init__(self) -> None:
        for name in ("fprop_format", "dgrad_format", "wgrad_format"):
            value = getattr(self, name)
            if value not in GEMM_FORMATS:
                raise ValueError(f"{name} must be one of {GEMM_FORMATS}; got {value!r}")
        sign = tuple(int(s) for s in self.rht_sign)
        if len(sign) != 16 or any(s not in (1, -1) for s in sign):
            raise ValueError(f"rht_sign must be 16 entries of +1/-1; got {list(self.rht_sign)}")
        object.__setattr__(self, "rht_sign", sign)
        if self.rht and self.wgrad_format == HIGH_PRECISION:
            raise ValueError("rht=True needs a quantized wgrad GEMM; got wgrad_format='bf16'")
        if self.stochastic_rounding and HIGH_PRECISION == self.dgrad_format == self.wgrad_format:
            raise ValueError(
                "stochastic_rounding=True needs a quantized dgrad or wgrad GEMM; both are 'bf16'"
            )

    @property
    def is_high_precision(self) -> bool:
        """True when no GEMM is quantized (the BF16 preset)."""
        return all(
            f == HIGH_PRECISION for f in (self.fprop_format, self.dgrad_format, self.wgrad_format)
        )

    def _spec(self, fmt: str, rounding: str, rht: bool = False, square: bool = False):
        if fmt == HIGH_PRECISION:
            return None
        block = get_format(fmt).block
        tile = (block, block) if square else (1, block)
        return QuantSpec(fmt, tile, rounding, rht, self.rht_sign)

    def role_specs(self) -> RoleSpecs:
        """The QuantSpec of each tensor role (see the module docstring)."""
        grad_rounding = "stochastic" if self.stochastic_rounding else "nearest"
        w = self._spec(self.fprop_format, "nearest", square=self.weight_2d)
        w_dgrad = self._spec(self.dgrad_format, "nearest", square=self.weight_2d)
        return RoleSpecs(
            x=self._spec(self.fprop_format, "nearest"),
            w=w,
            dy=self._spec(self.dgrad_format, grad_rounding),
            dy_t=self._spec(self.wgrad_format, grad_rounding, rht=self.rht),
            x_t=self._spec(self.wgrad_format, "nearest", rht=self.rht),
            w_dgrad=w_dgrad,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable fields."""
        d = asdict(self)
        d["rht_sign"] = list(self.rht_sign)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown recipe fields {unknown}; known fields: {sorted(known)}")
        kw = dict(d)
        if "rht_sign" in kw:
            kw["rht_sign"] = tuple(kw["rht_sign"])
        return cls(**kw)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed."""
        return replace(self, **changes)


PRESETS: dict[str, Recipe] = {
    # The NVFP4 pretraining paper's recipe (arXiv 2509.25149).
    "nvfp4": Recipe(),
    # MXFP4 with the same knobs (1x32 UE8M0 blocks, 32x32 weight tiles).
    "mxfp4": Recipe("mxfp4", "mxfp4", "mxfp4"),
    # The paper's FP8 baseline: E4M3 with 1x128 activation/gradient and 128x128 weight blocks.
    "fp8_block": Recipe("fp8_block", "fp8_block", "fp8_block", rht=False,
                        stochastic_rounding=False),
    "bf16": Recipe("bf16", "bf16", "bf16", weight_2d=False, rht=False, stochastic_rounding=False),
}


def get_recipe(recipe: str | Recipe | dict[str, Any] | None) -> Recipe:
    """A Recipe from a preset name, a dict of fields (optionally with ``"preset"``), or itself."""
    if recipe is None:
        return PRESETS["nvfp4"]
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        if recipe not in PRESETS:
            raise ValueError(f"unknown recipe preset {recipe!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[recipe]
    if isinstance(recipe, dict):
        d = dict(recipe)
        base = get_recipe(d.pop("preset", "nvfp4"))
        return Recipe.from_dict({**base.to_dict(), **d})
    raise TypeError(
        f"recipe must be a preset name, a dict or a Recipe; got {type(recipe).__name__}"
    )
