"""NVFP4Config: everything that decides how a model trains in NVFP4, as one serializable object.

It is a transformers ``QuantizationConfigMixin`` registered under the method name
``"hf_nvfp4"`` (transformers already uses ``"nvfp4"`` for an inference-only config), so
``from_pretrained(..., quantization_config=NVFP4Config())`` works and the config round-trips
through ``config.json``. The same object drives :func:`hf_nvfp4.convert`, the Trainer and the
Accelerate plugin.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .backends import BACKENDS
from .recipe import Recipe, get_recipe

QUANT_METHOD = "hf_nvfp4"
# The NVFP4 paper's 12B model kept the first 2 and the last 8 of its 62 blocks in BF16.
PAPER_FIRST_BF16 = 2 / 62
PAPER_LAST_BF16 = 8 / 62
SWITCH_MODES = ("forward", "all")
# The environment variable that selects a recipe under `accelerate launch` (read at the edge).
RECIPE_ENV = "HF_NVFP4_RECIPE"
CHECKPOINT_FORMATS = ("master", "packed")


def _check_count_or_fraction(name: str, value: int | float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be an int (blocks) or a float fraction; got {value!r}")
    if value < 0 or (isinstance(value, float) and value > 1):
        raise ValueError(f"{name} must be a block count >= 0 or a fraction in [0, 1]; got {value}")


def _as_list(name: str, value: str | list[str] | None) -> list[str]:
    """``value`` as a list of strings; a lone string is one pattern, not one per character."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a string or a list of strings; got {value!r}")
    return list(value)


def _check_type(name: str, value: Any, types: tuple[type, ...], what: str) -> None:
    """TypeError naming the field when ``value`` is not one of ``types`` (bools excluded)."""
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise TypeError(f"{name} must be {what}; got {value!r} ({type(value).__name__})")


class NVFP4Config(QuantizationConfigMixin):
    """How a model is converted to and trained in NVFP4.

    Args:
        recipe: a preset name (``"nvfp4"``, ``"mxfp4"``, ``"fp8_block"``, ``"bf16"``), a
            :class:`~hf_nvfp4.recipe.Recipe`, or a dict of its fields (``"preset"`` picks
            the base).
        backend: ``"auto"`` (Triton on CUDA, reference elsewhere) or a backend name.
        first_bf16_blocks / last_bf16_blocks: decoder blocks kept in BF16 at the start and
            the end, as a count (int) or a fraction of the blocks (float). Defaults follow
            the paper's 12B split (2 and 8 of 62), rounded to the nearest block.
        include / exclude: regular expressions on module names; a Linear is quantized only
            if it matches an include pattern (when any is given) and no exclude pattern.
        modules_to_not_convert: exact module names (or name prefixes) kept high precision.
        switch_to_bf16_at: fraction of training steps after which quantized layers switch
            to BF16 (the paper's late switch; None disables it).
        switch_mode: ``"forward"`` (only the forward GEMM switches) or ``"all"``.
        sr_seed: base seed of stochastic rounding (layer ``i`` uses ``sr_seed + i``;
            data-parallel ranks mix their rank in, for independent rounding noise).
        optimizer_moments: optional block format of AdamW's moments for Trainer
            (``None`` keeps FP32 moments; see :mod:`hf_nvfp4.optim`).
        checkpoint_format: what the checkpoint holds: ``"master"`` (high-precision master
            weights, what ``save_pretrained`` writes) or ``"packed"`` (4-bit NVFP4 codes and
            scales written by :func:`hf_nvfp4.checkpoint.save_packed`; loads for inference).
        reduce_amax: under data parallelism, all-reduce (max) each NVFP4 tensor's global
            amax across ranks, so every rank quantizes its shard of the batch with the scale
            of the whole batch (a 2-GPU run then matches a 1-GPU run with the same global
            batch up to summation order). The amaxes are all-reduced between the backend's
            amax and encode passes, in training mode only (``model.eval()`` forwards stay
            local), and NaN/Inf pass through rather than raise on one rank while the others
            wait.
        fsdp_quantized_all_gather: under FSDP2 (``fully_shard``, Accelerate's FSDP2 plugin),
            all-gather the weights of quantized layers as their codes and tile scales (NVFP4:
            0.56 bytes per weight instead of 2 or 4), each rank quantizing its own shard;
            training is bitwise unchanged. Needs square weight tiles (``weight_2d``); weights
            that do not split into whole tiles per rank gather as usual. See
            :mod:`hf_nvfp4.quant.fsdp`.
        switched: set by :func:`hf_nvfp4.switch_to_high_precision` (the late switch): the
            mode the quantized layers run in now (None: quantized). A saved model loads
            switched, as it was trained last.
    """

    def __init__(
        self,
        recipe: str | Recipe | dict[str, Any] = "nvfp4",
        backend: str = "auto",
        first_bf16_blocks: int | float = PAPER_FIRST_BF16,
        last_bf16_blocks: int | float = PAPER_LAST_BF16,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        modules_to_not_convert: list[str] | None = None,
        switch_to_bf16_at: float | None = None,
        switch_mode: str = "all",
        sr_seed: int = 0,
        optimizer_moments: str | None = None,
        checkpoint_format: str = "master",
        reduce_amax: bool = False,
        fsdp_quantized_all_gather: bool = False,
        switched: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        if kwargs:
            raise TypeError(f"NVFP4Config got unknown arguments {sorted(kwargs)}")
        self.quant_method = QUANT_METHOD
        self.recipe = get_recipe(recipe).to_dict()
        self.backend = backend
        self.first_bf16_blocks = first_bf16_blocks
        self.last_bf16_blocks = last_bf16_blocks
        self.include = _as_list("include", include)
        self.exclude = _as_list("exclude", exclude)
        self.modules_to_not_convert = _as_list("modules_to_not_convert", modules_to_not_convert)
        self.switch_to_bf16_at = switch_to_bf16_at
        self.switch_mode = switch_mode
        self.sr_seed = sr_seed
        self.optimizer_moments = optimizer_moments
        self.checkpoint_format = checkpoint_format
        self.reduce_amax = reduce_amax
        self.fsdp_quantized_all_gather = fsdp_quantized_all_gather
        self.switched = switched
        self.post_init()

    def post_init(self) -> None:
        """Validate every field's type and value; errors name the field and the value."""
        for name, types, what in (
            ("backend", (str,), "a string"),
            ("switch_to_bf16_at", (int, float, type(None)), "a float fraction or None"),
            ("switch_mode", (str,), "a string"),
            ("sr_seed", (int,), "an int"),
            ("optimizer_moments", (str, type(None)), "a string or None"),
            ("checkpoint_format", (str,), "a string"),
            ("switched", (str, type(None)), "a string or None"),
        ):
            _check_type(name, getattr(self, name), types, what)
        for name in ("include", "exclude", "modules_to_not_convert"):
            _as_list(name, getattr(self, name))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {self.backend!r}")
        _check_count_or_fraction("first_bf16_blocks", self.first_bf16_blocks)
        _check_count_or_fraction("last_bf16_blocks", self.last_bf16_blocks)
        if self.switch_to_bf16_at is not None and not 0 <= self.switch_to_bf16_at <= 1:
            raise ValueError(
                f"switch_to_bf16_at must be a fraction in [0, 1] or None; "
                f"got {self.switch_to_bf16_at}"
            )
        if self.switch_mode not in SWITCH_MODES:
            raise ValueError(f"switch_mode must be one of {SWITCH_MODES}; got {self.switch_mode!r}")
        from .optim.state import STATE_FORMATS

        if self.optimizer_moments not in (None, *STATE_FORMATS):
            raise ValueError(
                f"optimizer_moments must be None or one of {STATE_FORMATS}; "
                f"got {self.optimizer_moments!r}"
            )
        if self.switched not in (None, *SWITCH_MODES):
            raise ValueError(
                f"switched must be None or one of {SWITCH_MODES}; got {self.switched!r}"
            )
        for name in ("reduce_amax", "fsdp_quantized_all_gather"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool; got {getattr(self, name)!r}")
        if self.fsdp_quantized_all_gather and (
            self.switch_to_bf16_at is not None or self.switched is not None
        ):
            raise ValueError(
                "fsdp_quantized_all_gather cannot be combined with switch_to_bf16_at or "
                "switched: after "
                "the late switch the layers need their high-precision weights, which the "
                "quantized all-gather does not move"
            )
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"checkpoint_format must be one of {CHECKPOINT_FORMATS}; "
                f"got {self.checkpoint_format!r}"
            )
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{name} pattern {pattern!r} is not a valid regex: {e}") from e

    def get_recipe(self) -> Recipe:
        """The :class:`Recipe` object."""
        return Recipe.from_dict(self.recipe)

    def block_split(self, num_blocks: int) -> tuple[int, int]:
        """Blocks kept in BF16 at the start and at the end, for a model of ``num_blocks``."""

        def count(v: int | float) -> int:
            return int(v) if isinstance(v, int) else int(round(v * num_blocks))

        return count(self.first_bf16_blocks), count(self.last_bf16_blocks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``quantization_config`` entry of config.json)."""
        return copy.deepcopy(self.__dict__)

    @classmethod
    def load(cls, source: NVFP4Config | dict[str, Any] | str | os.PathLike | bool | None):
        """An NVFP4Config from itself, a dict, a JSON/YAML recipe file path, True or None."""
        if isinstance(source, cls):
            return source
        if source is None or source is True:
            return cls()
        if isinstance(source, dict):
            return cls(**source)
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"NVFP4 recipe file not found: {path}")
            with open(path) as f:
                if path.endswith((".yaml", ".yml")):
                    import yaml

                    data = yaml.safe_load(f) or {}
                else:
                    data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError(
                    f"recipe file {path} must hold a mapping; got {type(data).__name__}"
                )
            return cls(**data)
        raise TypeError(
            "nvfp4 must be True, an NVFP4Config, a dict or a path to a JSON/YAML recipe file; "
            f"got {type(source).__name__}"
        )


def resolve_nvfp4(
    source: bool | str | dict | NVFP4Config | os.PathLike | None,
) -> NVFP4Config | None:
    """The NVFP4Config a ``nvfp4=`` argument asks for (None/False: plain training).

    Strings: ``"true"``/``"1"``, a preset name (``"nvfp4"``, ``"mxfp4"``, ``"fp8_block"``,
    ``"bf16"``) or a path to a JSON/YAML recipe file.
    """
    if source is None or source is False:
        return None
    if isinstance(source, str):
        low = source.strip().lower()
        if low in ("", "false", "0", "no", "none"):
            return None
        if low in ("true", "1", "yes"):
            return NVFP4Config()
        if not os.path.exists(source) and "/" not in source and "." not in source:
            return NVFP4Config(recipe=source)
    return NVFP4Config.load(source)
