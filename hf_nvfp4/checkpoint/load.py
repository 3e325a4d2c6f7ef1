"""Loading packed NVFP4 checkpoints: for inference (weights stay packed) or for training.

* ``from_pretrained(path)`` (after ``import hf_nvfp4``) of a checkpoint written by
  :func:`save_packed`: the quantizer calls :func:`prepare_packed_model` on the meta model,
  which checks every file header (see :mod:`.integrity`) and swaps exactly the layers the
  checkpoint holds packed for :class:`~hf_nvfp4.nn.NVFP4PackedLinear` (a GPT-2 ``Conv1D``
  for its subclass ``NVFP4PackedConv1D``); transformers then loads the packed tensors by name,
  and :func:`finalize_packed_model` verifies them.
* :func:`load_packed` wraps that and, with ``mode="train"``, turns the packed layers back into
  trainable NVFP4Linear (NVFP4Conv1D) layers: from the saved FP32 masters when the checkpoint
  has them (an exact resume), otherwise from the dequantized weights (a lossy start: the
  masters become the values NVFP4 keeps, and high-precision layers come from their BF16 copy).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .._names import shown_names
from ..config import NVFP4Config
from ..experts import iter_nvfp4_experts
from ..nn.conv1d import NVFP4Conv1D, NVFP4PackedConv1D, is_conv1d, weight_matrix
from ..nn.linear import NVFP4Linear
from ..nn.packed import NVFP4PackedLinear
from .checksums import checksum_verification, verify_manifest
from .errors import CheckpointError
from .experts import (
    expert_weights,
    finalize_packed_experts,
    is_packed_experts,
    pack_experts_module,
    prepare_packed_experts,
    unpack_experts_module,
)
from .integrity import (
    check_all_present,
    check_packed_values,
    require_hf_nvfp4,
    validate_packed_tensors,
)
from .packed import MASTERS_PREFIX, PACKED_FORMAT, PACKED_SUFFIXES
from .saved_names import SavedName, saved_name
from .shards import TensorInfo, checkpoint_files, read_headers

MODES = ("inference", "train")
_BUFFER_DTYPES = {
    "weight_packed": torch.uint8,
    "weight_scale": torch.float8_e4m3fn,
    "weight_global_scale": torch.float32,
}


def resolve_checkpoint_files(
    model: nn.Module, files: list[str] | None, required: bool = True
) -> list[Path]:
    """The safetensors files being loaded: transformers' list, else from the model's path.

    With ``required=False`` an unresolvable location (a Hub id on an older transformers that
    does not pass the file list) gives ``[]`` instead of an error.
    """
    if files:
        return [Path(f) for f in files if str(f).endswith(".safetensors")]
    source = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    found = checkpoint_files(source) if os.path.isdir(source) else []
    if not found and required:
        raise CheckpointError(
            f"cannot locate the safetensors files of packed checkpoint {source!r}; packed "
            "NVFP4 checkpoints load from a local directory of .safetensors files"
        )
    return found


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that transformers fills by tying (e.g. a tied ``lm_head.weight``)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:
        tie = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        tied = (getattr(model, "_tied_weights_keys", None) or {}) if tie else {}
    return set(tied)


def prepare_packed_model(
    model: nn.Module, config: NVFP4Config, files: list[str] | None = None
) -> dict[str, TensorInfo]:
    """Validate the packed checkpoint and swap its packed layers in (model on meta).

    Returns the merged file headers, for :func:`finalize_packed_model`.
    """
    paths = resolve_checkpoint_files(model, files)
    infos = read_headers(paths)
    layers = validate_packed_tensors(infos)
    recipe = config.get_recipe()
    for index, (name, (out_f, in_f)) in enumerate(layers.items()):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"tensor {name + '.weight_packed'!r} in {infos[name + '.weight_packed'].file} "
                f"has no module {name!r} in {type(model).__name__}"
            ) from None
        conv1d = isinstance(mod, NVFP4Conv1D) or is_conv1d(mod)
        if not (conv1d or isinstance(mod, nn.Linear)) or (
            tuple(weight_matrix(mod).shape) != (out_f, in_f)
        ):
            raise CheckpointError(
                f"tensor {name + '.weight_packed'!r} in {infos[name + '.weight_packed'].file} "
                f"holds a [{out_f}, {in_f}] weight but module {name!r} is {mod!r}"
            )
        with torch.device("meta"):
            new = (NVFP4PackedConv1D if conv1d else NVFP4PackedLinear)(
                in_f, out_f, bias=mod.bias is not None, dtype=mod.weight.dtype,
                recipe=recipe, backend=config.backend, sr_seed=config.sr_seed + index,
            )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    prepare_packed_experts(model, infos, recipe, config.backend)
    expected = list(model.state_dict().keys())
    check_all_present(expected, infos, str(paths[0].parent), tied_keys(model))
    verify_manifest(paths[0].parent, infos)
    return infos


def _read_tensor(info: TensorInfo) -> torch.Tensor:
    with safe_open(str(info.file), framework="pt") as f:
        return f.get_tensor(info.name)


def finalize_packed_model(model: nn.Module, infos: dict[str, TensorInfo]) -> None:
    """After loading: every packed buffer is materialized with its dtype, scales are valid.

    A buffer that a transformers version left on meta or cast to the model dtype is read
    again from its file (the scales are tiny). Block and global scales must be finite and
    non-negative (:func:`~.integrity.check_packed_values`).
    """
    for name, mod in model.named_modules():
        if not isinstance(mod, NVFP4PackedLinear):
            continue
        for suffix in PACKED_SUFFIXES:
            t = getattr(mod, suffix)
            if t.is_meta or t.dtype != _BUFFER_DTYPES[suffix]:
                key = f"{name}.{suffix}"
                if key not in infos:
                    raise CheckpointError(f"tensor {key!r} was not loaded and is not on disk")
                device = next((t.device for t in (*mod.buffers(), *mod.parameters())
                               if not t.is_meta), torch.device("cpu"))
                value = _read_tensor(infos[key]).to(device)
                setattr(mod, suffix, value.reshape(()) if suffix == "weight_global_scale"
                        else value)
        check_packed_values(name, mod.weight_scale, mod.weight_global_scale,
                            infos[f"{name}.weight_scale"].file)
    finalize_packed_experts(model, infos, _read_tensor)


def check_master_checkpoint(model: nn.Module, files: list[str] | None) -> set[str] | None:
    """A master-format hf_nvfp4 checkpoint holds a ``weight`` for every NVFP4Linear.

    Each tensor is looked up where ``save_pretrained`` writes it (:mod:`.saved_names`:
    transformers' checkpoint conversion reverted, e.g. renamed or stored transposed), or
    under the model's own name. Returns the names of the NVFP4Linear layers whose
    ``sr_state`` (stochastic-rounding stream) the checkpoint holds, or None when its files
    cannot be found.
    """
    paths = resolve_checkpoint_files(model, files, required=False)
    if not paths:
        return None
    infos = read_headers(paths)
    state = model.state_dict()
    layers = [name for name, mod in model.named_modules() if isinstance(mod, NVFP4Linear)]
    missing: list[SavedName] = []
    for name in layers:
        weight = saved_name(model, f"{name}.weight", state[f"{name}.weight"])
        packed = [f"{n}_packed" for n in (f"{name}.weight", *weight.names)
                  if n.endswith(".weight") and f"{n}_packed" in infos]
        if packed:
            raise CheckpointError(
                f"tensor {packed[0]!r} in {infos[packed[0]].file} is packed, but config.json "
                "says checkpoint_format 'master'"
            )
        if not weight.found_in(infos):
            missing.append(weight)
    if missing:
        raise CheckpointError(_missing_message(model, missing, paths[0].parent))
    return {name for name in layers
            if saved_name(model, f"{name}.sr_state", state[f"{name}.sr_state"]).found_in(infos)}


def _missing_message(model: nn.Module, missing: list[SavedName], where: Path) -> str:
    """The error for NVFP4Linear weights a master checkpoint lacks, each with its saved names."""
    shown = []
    for s in missing:
        if s.error is not None:
            shown.append(f"{s.key!r} (transformers' checkpoint conversion of "
                         f"{type(model).__name__} cannot be applied to it alone: {s.error})")
        elif s.names != (s.key,):
            shown.append(f"{s.key!r} (saved as {', '.join(repr(n) for n in s.names)})")
        else:
            shown.append(repr(s.key))
    return (
        f"{len(missing)} NVFP4 layer weights are missing from the checkpoint in {where}: "
        f"{shown_names(shown, 5)}; refusing to load (they would be randomly initialized)"
    )


def _nvfp4_layers(model: nn.Module) -> list[tuple[str, NVFP4Linear]]:
    """The NVFP4Linear layers whose forward runs NVFP4: those :func:`pack_model` packs."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NVFP4Linear)
            and m.recipe.fprop_format == "nvfp4"]


def _nvfp4_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The NVFP4 experts modules whose recipe runs NVFP4: those :func:`pack_model` packs."""
    return [(n, m) for n, m in iter_nvfp4_experts(model)
            if m._hf_nvfp4.recipe.fprop_format == "nvfp4"]


def pack_model(model: nn.Module) -> nn.Module:
    """Replace every NVFP4Linear of ``model`` by its NVFP4PackedLinear and pack every NVFP4
    experts module's weights (see :mod:`.experts`), in place (inference).

    Raises ``ValueError`` when no layer runs NVFP4 (nothing to pack: e.g. an MXFP4 or FP8
    recipe, or layers switched to BF16), rather than mark the model packed.
    """
    swaps = _nvfp4_layers(model)
    experts = _nvfp4_experts(model)
    if not swaps and not experts:
        raise ValueError(
            "pack_model: no layer runs NVFP4 (fprop_format 'nvfp4'); only NVFP4 layers can be "
            "packed (MXFP4/FP8 recipes and layers switched to BF16 keep master weights)"
        )
    for name, mod in swaps:
        packed_cls = NVFP4PackedConv1D if isinstance(mod, NVFP4Conv1D) else NVFP4PackedLinear
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                packed_cls.from_linear(mod))
    for _, mod in experts:
        quant = mod._hf_nvfp4
        pack_experts_module(mod, quant.recipe, quant.backend, weights=expert_weights(mod))
    _set_format(model, PACKED_FORMAT)
    return model


def exclude_packed_from_ddp(model: nn.Module) -> list[str]:
    """Have ``DistributedDataParallel(model)`` leave the packed weights alone, and return
    their names.

    Packed weights are buffers (codes and scales, identical on every rank as loaded): DDP
    would broadcast them from rank 0 at construction and before every forward (the FP8 scales
    fail on gloo). Call it on the module DDP wraps (a PEFT model, say) before wrapping;
    ``hf_nvfp4.Trainer`` does it for its model.
    """
    names = [f"{name}.{b}" if name else b for name, mod in model.named_modules()
             if isinstance(mod, NVFP4PackedLinear) or is_packed_experts(mod)
             for b, _ in mod.named_buffers(recurse=False)]
    if names:
        ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
        model._ddp_params_and_buffers_to_ignore = sorted(ignored | set(names))
    return names


def _set_format(model: nn.Module, fmt: str) -> None:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(qc, NVFP4Config):
        qc.checkpoint_format = fmt


def load_masters(directory: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The full training state saved with ``masters=True`` (None when absent)."""
    files = checkpoint_files(directory, prefix=MASTERS_PREFIX)
    if not files:
        return None
    infos = read_headers(files)
    verify_manifest(directory, infos)
    out = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    if set(out) != set(infos):
        raise CheckpointError(f"master files in {directory} disagree with their headers")
    return out


def to_trainable(
    model: nn.Module, masters: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Turn packed layers into NVFP4Linear (NVFP4Conv1D) training layers, and packed experts
    into trainable NVFP4 experts modules, in place.

    With ``masters`` (the state saved by ``save_packed(masters=True)``) the whole model is
    restored exactly; without, the packed layers start from their dequantized weights.
    """
    qc = getattr(model.config, "quantization_config", None)
    base_seed = qc.sr_seed if isinstance(qc, NVFP4Config) else 0
    reduce_amax = qc.reduce_amax if isinstance(qc, NVFP4Config) else False
    swaps = [(n, m) for n, m in model.named_modules() if isinstance(m, NVFP4PackedLinear)]
    for i, (name, mod) in enumerate(swaps):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                mod.to_linear(dtype, sr_seed=base_seed + i, reduce_amax=reduce_amax))
    experts = [m for m in model.modules() if is_packed_experts(m)]
    for i, mod in enumerate(experts):
        unpack_experts_module(mod, dtype, base_seed + len(swaps) + i)
    if masters is not None:
        result = model.load_state_dict(masters, strict=False)
        missing = [k for k in result.missing_keys if k not in tied_keys(model)]
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"master state does not match the model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
    _set_format(model, "master")
    return model


def load_packed(
    path: str | os.PathLike,
    mode: str = "inference",
    *,
    masters: bool | None = None,
    dtype: torch.dtype | str | None = None,
    model_class: Any = None,
    verify_checksums: bool | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load an hf_nvfp4 checkpoint for inference (packed layers) or training (NVFP4Linear).

    Args:
        path: a local checkpoint directory.
        mode: ``"inference"``: NVFP4PackedLinear layers, weights packed in memory (a master
            checkpoint is packed after loading when its recipe is NVFP4; MXFP4/FP8 recipes
            keep their master weights); ``"train"``: NVFP4Linear layers with FP32
            master weights.
        masters: ``mode="train"`` only: use the saved masters (True: required, None: when
            present, False: never; dequantize instead, a lossy start).
        dtype: model dtype (default: the checkpoint's for inference, FP32 for training).
        model_class: the transformers auto class (default ``AutoModelForCausalLM``).
        verify_checksums: check every tensor against the checkpoint's checksum manifest
            (False skips reading the files twice, for speed; None, the default, does what
            the enclosing :func:`~hf_nvfp4.checkpoint.checksum_verification` says: check,
            outside one).
        **kwargs: passed to ``from_pretrained``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    qc = require_hf_nvfp4(path)
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    if dtype is None:
        dtype = torch.float32 if mode == "train" else "auto"
    verification = (contextlib.nullcontext() if verify_checksums is None
                    else checksum_verification(verify_checksums))
    with verification:
        model = model_class.from_pretrained(path, dtype=dtype, **kwargs)
        if qc.get("checkpoint_format", "master") != PACKED_FORMAT:
            packable = _nvfp4_layers(model) or _nvfp4_experts(model)
            return pack_model(model) if mode == "inference" and packable else model
        if mode == "inference":
            return model
        state = load_masters(path) if masters is not False else None
    if masters and state is None:
        raise CheckpointError(
            f"masters=True but {path} has no {MASTERS_PREFIX}*.safetensors (save with "
            "save_packed(..., masters=True))"
        )
    return to_trainable(model, state, dtype if isinstance(dtype, torch.dtype) else torch.float32)


__all__ = [
    "MODES",
    "check_master_checkpoint",
    "exclude_packed_from_ddp",
    "finalize_packed_model",
    "load_masters",
    "load_packed",
    "pack_model",
    "prepare_packed_model",
    "resolve_checkpoint_files",
    "to_trainable",
]
