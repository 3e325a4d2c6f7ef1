"""Integrity checks of checkpoint files, run on the headers before any tensor loads.

Every failure is a :class:`CheckpointError` naming the tensor, the file and the offending
value: a missing or misshapen scale, a wrong dtype, a truncated file, tensors of another
quantization method (compressed-tensors, ModelOpt), or a config.json of another method.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .shards import TensorInfo

BLOCK = 16
# Tensor names that only other formats write, and who writes them.
FOREIGN_SUFFIXES = {
    "weight_scale_2": "NVIDIA ModelOpt",
    "input_scale": "NVIDIA ModelOpt",
    "input_global_scale": "compressed-tensors",
    "weight_shape": "compressed-tensors",
    "weight_zero_point": "compressed-tensors",
}


def read_quantization_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """``quantization_config`` of ``directory``/config.json (None when absent)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: not a transformers checkpoint directory")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    qc = cfg.get("quantization_config")
    return qc if isinstance(qc, dict) else None


def require_hf_nvfp4(directory: str | os.PathLike) -> dict[str, Any]:
    """The hf_nvfp4 quantization config of ``directory``, or an error naming the real method."""
    qc = read_quantization_config(directory)
    path = Path(directory) / "config.json"
    if qc is None:
        raise CheckpointError(
            f"{path} has no quantization_config: a plain (unquantized) checkpoint; quantize it "
            "with `hf-nvfp4 quantize` or from_pretrained(..., quantization_config=NVFP4Config())"
        )
    method = qc.get("quant_method")
    if method != "hf_nvfp4":
        raise CheckpointError(
            f"{path}: quantization_config.quant_method is {method!r}, not 'hf_nvfp4'; this "
            "checkpoint was written by another quantization method (load it with its own "
            "loader, e.g. transformers.AutoModelForCausalLM.from_pretrained)"
        )
    return qc


def _expect(info: TensorInfo | None, name: str, dtype: str, shape: tuple[int, ...] | None,
            owner: TensorInfo) -> None:
    if info is None:
        raise CheckpointError(
            f"tensor {name!r} is missing from the checkpoint ({owner.name!r} is in {owner.file})"
        )
    if info.dtype != dtype:
        raise CheckpointError(
            f"tensor {name!r} in {info.file} has dtype {info.dtype}; expected {dtype}"
        )
    if shape is not None and info.shape != shape:
        raise CheckpointError(
            f"tensor {name!r} in {info.file} has shape {list(info.shape)}; expected {list(shape)}"
        )


def validate_packed_tensors(infos: dict[str, TensorInfo]) -> dict[str, tuple[int, int]]:
    """Check every packed NVFP4 layer of a native checkpoint; returns ``{module: (out, in)}``.

    Per layer: ``weight_packed`` U8 [out, in/2], ``weight_scale`` F8_E4M3 [out, in/16],
    ``weight_global_scale`` F32 with one element; no stray scales, no foreign tensors. A 3D
    ``weight_packed`` is a parallel experts module's or grouped linear's (checked with the experts,
    :func:`hf_nvfp4.checkpoint.experts.validate_packed_experts`).
    """
    for name, info in infos.items():
        suffix = name.rpartition(".")[2]
        if suffix in FOREIGN_SUFFIXES:
            raise CheckpointError(
                f"tensor {name!r} in {info.file} belongs to the {FOREIGN_SUFFIXES[suffix]} format, "
                "not hf_nvfp4's packed format; load that export with its own loader"
            )
    layers: dict[str, tuple[int, int]] = {}
    experts = set()
    for name, info in infos.items():
        if not name.endswith(".weight_packed"):
            continue
        if len(info.shape) == 3:
            experts.add(name[: -len(".weight_packed")])
            continue
        module = name[: -len(".weight_packed")]
        if info.dtype != "U8" or len(info.shape) != 2:
            raise CheckpointError(
                f"tensor {name!r} in {info.file} must be a 2D U8 tensor [out, in/2]; got "
                f"dtype {info.dtype}, shape {list(info.shape)}"
            )
        out_f, in_f = info.shape[0], 2 * info.shape[1]
        if in_f % BLOCK or out_f % BLOCK:
            raise CheckpointError(
                f"tensor {name!r} in {info.file}: shape {list(info.shape)} gives a [{out_f}, "
                f"{in_f}] weight; both dimensions must be multiples of {BLOCK}"
            )
        _expect(infos.get(f"{module}.weight_scale"), f"{module}.weight_scale", "F8_E4M3",
                (out_f, in_f // BLOCK), info)
        gs_name = f"{module}.weight_global_scale"
        gs = infos.get(gs_name)
        _expect(gs, gs_name, "F32", None, info)
        if gs.nbytes != 4:
            raise CheckpointError(
                f"tensor {gs_name!r} in {gs.file} must hold one value; got shape {list(gs.shape)}"
            )
        if f"{module}.weight" in infos:
            raise CheckpointError(
                f"module {module!r} has both a packed weight and a plain 'weight' tensor "
                f"({infos[module + '.weight'].file}); the checkpoint is inconsistent"
            )
        layers[module] = (out_f, in_f)
    for name, info in infos.items():
        for suffix in ("weight_scale", "weight_global_scale"):
            owner = name[: -len(suffix) - 1]
            if name.endswith("." + suffix) and owner not in layers and owner not in experts:
                raise CheckpointError(
                    f"tensor {name!r} in {info.file} has no matching "
                    f"{name[: -len(suffix)]}weight_packed"
                )
    return layers


def check_packed_values(
    layer: str, scale: torch.Tensor, global_scale: torch.Tensor, file: str | os.PathLike
) -> None:
    """A packed layer's decode scales are finite and non-negative, or a CheckpointError.

    NaN block scales would otherwise load silently and surface as a non-finite forward pass
    far from their cause; a corrupted byte in a scale usually lands here too.
    """
    bits = scale.view(torch.uint8)
    for what, bad in (("NaN", (bits & 0x7F) == 0x7F), ("negative", (bits & 0x80) != 0)):
        count = int(bad.sum())
        if count:
            where = [int(i) for i in bad.nonzero()[0]]
            raise CheckpointError(
                f"layer {layer!r}: tensor {layer + '.weight_scale'!r} in {file} has {count} "
                f"{what} block scale(s) (first at {where}); the checkpoint is corrupted"
            )
    value = float(global_scale.float().reshape(()))
    if not math.isfinite(value) or value < 0:
        raise CheckpointError(
            f"layer {layer!r}: tensor {layer + '.weight_global_scale'!r} in {file} is {value}; "
            "a decode global scale must be finite and >= 0 (the checkpoint is corrupted)"
        )


def check_all_present(
    expected: list[str], infos: dict[str, TensorInfo], where: str, tied: set[str]
) -> None:
    """Every expected state-dict key is in the checkpoint (tied duplicates excepted)."""
    missing = [k for k in expected if k not in infos and k not in tied]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{len(missing)} tensors are missing from the checkpoint in {where}: {shown}{more}; "
            "refusing to load (they would be randomly initialized)"
        )


__all__ = [
    "FOREIGN_SUFFIXES",
    "check_all_present",
    "check_packed_values",
    "read_quantization_config",
    "require_hf_nvfp4",
    "validate_packed_tensors",
]
