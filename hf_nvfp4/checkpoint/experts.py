"""MoE experts in checkpoints: packed NVFP4 storage and the per-expert export layouts.

**Packed checkpoints.** Per NVFP4 experts module ``<m>`` (see :mod:`hf_nvfp4.experts`) and
quantized parameter ``<p>`` (``gate_up_proj`` or ``up_proj``, and ``down_proj``; a shared
experts module's ``gate_proj``, ``up_proj`` and ``down_proj``; a parallel experts module's or
grouped linear's ``weight``, whose tensors are told from a packed linear's by their rank):

===========================  ==============  ===================  ============================
tensor                       dtype           shape                meaning
===========================  ==============  ===================  ============================
``<m>.<p>_packed``           uint8           [E, out, in/2]       E2M1 codes, even element low
``<m>.<p>_scale``            float8_e4m3fn   [E, out, in/16]      block DECODE scales
``<m>.<p>_global_scale``     float32         [E]                  per-expert DECODE global scale
===========================  ==============  ===================  ============================

Expert ``e``'s ``[out, in]`` GEMM matrix (``W[e]``, or ``W[e]^T`` for classes declared
``is_transposed`` such as gpt-oss) is quantized exactly as the training forward quantizes it
(16x16 tiles, the expert's own global scale), so a loaded model computes the same logits.
Biases (``<p>_bias``) stay high precision; the stochastic-rounding ``sr_state`` is training
state and is written only with ``masters=True``. Loading swaps the module's expert parameters for
these buffers (whose dtypes module-wide conversions keep: :class:`KeepScaleDtypes`) and points
it at the ``"hf_nvfp4_packed"`` experts implementation (registered here in transformers'
``ExpertsInterface``, and as the instance forward of Llama 4's batched, JetMoE's parallel
and Inkling's shared experts and of DeepSeek V4's grouped linear);
``load_packed(mode="train")`` turns it back into a trainable NVFP4 experts module (from the
masters when saved, else the dequantized weights).

**Exports.** Serving engines read MoE checkpoints with one linear per expert under the names
of the model's original (pre-fusion) checkpoints: vLLM's ``FusedMoE.make_expert_params_mapping``
maps ``experts.{e}.<gate>.`` / ``<up>.`` to its fused ``w13_`` parameters (shards 1 and 3) and
``experts.{e}.<down>.`` to ``w2_``, with ``gate_proj``/``up_proj``/``down_proj`` for Qwen-MoE
and ``w1``/``w3``/``w2`` under ``block_sparse_moe`` for Mixtral. transformers 5 knows these
names: its checkpoint conversion mapping (:mod:`transformers.conversion_mapping`) fuses them
on load and ``save_pretrained`` reverts that. :func:`expert_export` asks the same revert
(``revert_weight_conversion``) where each row of every fused parameter goes, with an index
probe, and accepts only per-expert ``.weight`` tensors that are whole-width row ranges of one
expert's matrix; anything else (no mapping, as for gpt-oss; transposed or interleaved layouts;
expert biases; experts kept in high precision) is refused with the module named. The other
tensors are renamed the same way (e.g. Mixtral's router ``mlp.gate`` -> ``block_sparse_moe.gate``).
Gate and up rows of one expert come from one fused matrix with one global scale, which is what
vLLM's fused ``w13`` needs (it keeps ``w13_weight_global_scale[:, 0]``, the gate's, for both).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..backends import backend_instance, resolve_backend
from ..experts import (
    PROJECTORS,
    ExpertsQuantization,
    Project,
    convert_experts_module,
    current_implementation,
    expert_matrices,
    expert_params,
    is_experts_module,
    is_grouped_linear,
    iter_nvfp4_experts,
    routed_experts_forward,
    set_implementation,
    weights_transposed,
)
from ..nn.linear import _role_specs
from ..nn.packed import apply_keeping_dtypes
from ..numerics.quantize import QTensor
from ..recipe import Recipe
from .errors import CheckpointError
from .integrity import check_packed_values
from .layers import PackedLayer
from .shards import TensorInfo

PACKED_IMPLEMENTATION = "hf_nvfp4_packed"
EXPERT_SUFFIXES = ("packed", "scale", "global_scale")
BLOCK = 16
_DTYPES = {"packed": torch.uint8, "scale": torch.float8_e4m3fn, "global_scale": torch.float32}


@dataclass
class ExpertWeights:
    """One quantized experts parameter as per-expert NVFP4 ``[out, in]`` matrices.

    Attributes:
        data: uint8 codes [E, out, in/2]; scale: float8_e4m3fn [E, out, in/16];
        global_scale: float32 decode scales [E]; amax: the FP32 ``max |W[e]|`` each global
        scale was computed from, when known (a training model), else None.
    """

    data: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor
    amax: list[float] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(E, out, in)`` of the GEMM matrices."""
        num, out, half = self.data.shape
        return num, out, 2 * half

    def expert(self, e: int, rows: slice = slice(None), dtype: torch.dtype = torch.float32
               ) -> QTensor:
        """Expert ``e``'s weight (the row range ``rows``) as a 1x16-scaled QTensor."""
        data, scale = self.data[e, rows], self.scale[e, rows]
        return QTensor(data=data, scale=scale, global_scale=self.global_scale[e],
                       fmt="nvfp4", shape=torch.Size((data.shape[0], 2 * data.shape[1])),
                       dtype=dtype, tile=(1, BLOCK))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """All experts' represented ``[E, out, in]`` matrices in ``dtype``."""
        return torch.stack([self.expert(e).dequantize(dtype) for e in range(self.shape[0])])


@dataclass
class PackedExperts:
    """The state of an experts module whose weights are packed in memory (inference)."""

    recipe: Recipe
    backend: str
    params: tuple[str, ...]
    previous_implementation: str | None
    sr_seed: int = 0


class KeepScaleDtypes:
    """A packed experts module's ``_apply``, set on the instance (the class is transformers'):
    module-wide dtype conversions (``.to(dtype)``, ``.half()``) move its block and global
    scales without converting them, as :class:`~hf_nvfp4.nn.packed.NVFP4PackedLinear` does."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        module = self.module
        names = [f"{p}_{s}" for p in module._hf_nvfp4_packed.params
                 for s in ("scale", "global_scale")]
        return apply_keeping_dtypes(module, names,
                                    lambda f, r: type(module)._apply(module, f, r), fn, recurse)


def is_packed_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds packed NVFP4 experts (see the module docstring)."""
    return isinstance(getattr(module, "_hf_nvfp4_packed", None), PackedExperts)


def iter_quantized_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every NVFP4 experts module, training or packed."""
    for name, mod in model.named_modules():
        if is_packed_experts(mod) or isinstance(getattr(mod, "_hf_nvfp4", None),
                                                ExpertsQuantization):
            yield name, mod


def quantized_params(module: nn.Module) -> tuple[str, ...]:
    """The quantized parameters of an NVFP4 experts module, training or packed (see
    :func:`hf_nvfp4.experts.expert_params`)."""
    if is_packed_experts(module):
        return module._hf_nvfp4_packed.params
    return expert_params(module)


def gemm_matrices(module: nn.Module, name: str) -> torch.Tensor:
    """The ``[E, out, in]`` GEMM matrices of a training experts parameter (a view)."""
    w = expert_matrices(module, name).detach()
    return w.transpose(1, 2) if weights_transposed(module) else w


def expert_weights(module: nn.Module) -> dict[str, ExpertWeights]:
    """``{parameter: ExpertWeights}`` of an NVFP4 experts module, as its forward uses them.

    A training module's matrices are quantized with the recipe's weight spec by the
    reference quantizer (the source of truth every backend matches bit for bit); a packed
    module's buffers are returned as they are.
    """
    from ..backends.reference import quantize_spec

    if is_packed_experts(module):
        return {p: ExpertWeights(*(getattr(module, f"{p}_{s}") for s in EXPERT_SUFFIXES))
                for p in module._hf_nvfp4_packed.params}
    spec = _role_specs(module._hf_nvfp4.recipe).w
    if spec is None or spec.fmt != "nvfp4":
        raise ValueError(
            f"only NVFP4 expert weights can be packed; this {type(module).__name__}'s recipe "
            f"quantizes its weights as {spec.fmt if spec else 'bf16'!r}"
        )
    out = {}
    for p in quantized_params(module):
        qs = [quantize_spec(w, spec) for w in gemm_matrices(module, p).unbind(0)]
        out[p] = ExpertWeights(
            torch.stack([q.data for q in qs]), torch.stack([q.scale for q in qs]),
            torch.stack([q.global_scale.reshape(()).float() for q in qs]),
            [float(w.float().abs().amax()) for w in gemm_matrices(module, p).unbind(0)],
        )
    return out


def pack_experts_module(
    module: nn.Module, recipe: Recipe, backend: str, *,
    weights: dict[str, ExpertWeights] | None = None,
    shapes: dict[str, tuple[int, int, int]] | None = None,
) -> None:
    """Swap an experts module's quantized parameters for packed buffers, in place.

    Either ``weights`` (the values, e.g. from :func:`expert_weights`) or ``shapes``
    (``{parameter: (E, out, in)}``: empty buffers on the module's device, to be loaded).
    """
    register_packed()
    training = getattr(module, "_hf_nvfp4", None)
    given = weights or shapes
    params = tuple(p for p in expert_params(module) if p in given)
    if set(params) != set(given):
        raise ValueError(f"packed experts parameters {sorted(given)} of "
                         f"{type(module).__name__} are not its {list(params)}")
    previous = (training.previous_implementation if training is not None
                else current_implementation(module))
    seed = training.sr_seed if training is not None else 0
    for p in params:
        device = getattr(module, p).device
        delattr(module, p)
        if weights is not None:
            w = weights[p]
            tensors = {"packed": w.data, "scale": w.scale, "global_scale": w.global_scale}
        else:
            num, out, inp = shapes[p]
            tensors = {
                "packed": torch.empty(num, out, inp // 2, dtype=torch.uint8, device=device),
                "scale": torch.empty(num, out, inp // BLOCK, dtype=torch.float8_e4m3fn,
                                     device=device),
                "global_scale": torch.empty(num, dtype=torch.float32, device=device),
            }
        for suffix, t in tensors.items():
            module.register_buffer(f"{p}_{suffix}", t)
    if "sr_state" in module._buffers:
        del module._buffers["sr_state"]
    if training is not None:
        del module._hf_nvfp4
    module._hf_nvfp4_packed = PackedExperts(recipe, backend, params, previous, seed)
    module._apply = KeepScaleDtypes(module)
    # Every tensor of the module comes from the checkpoint: transformers' weight init (which
    # would look for the removed parameters) skips it.
    module._is_hf_initialized = True
    set_implementation(module, PACKED_IMPLEMENTATION)


def unpack_experts_module(module: nn.Module, dtype: torch.dtype, sr_seed: int) -> None:
    """Turn a packed experts module back into a trainable NVFP4 one (dequantized masters)."""
    info: PackedExperts = module._hf_nvfp4_packed
    weights = expert_weights(module)
    for p, w in weights.items():
        values = w.dequantize(dtype)
        for suffix in EXPERT_SUFFIXES:
            delattr(module, f"{p}_{suffix}")
        values = values.transpose(1, 2).contiguous() if weights_transposed(module) else values
        if is_grouped_linear(module):  # [G, out, in] -> the Linear's [G * out, in]
            values = values.reshape(-1, values.shape[-1])
        setattr(module, p, nn.Parameter(values))
    del module._hf_nvfp4_packed
    module.__dict__.pop("_apply", None)
    set_implementation(module, info.previous_implementation)
    convert_experts_module(module, info.recipe, info.backend, sr_seed)


def _packed_grouped(
    module: nn.Module, name: str, x: torch.Tensor, counts: list[int], backend: Any,
    spec: Any,
) -> torch.Tensor:
    """Per-expert ``x @ W[e]^T + b[e]`` on the packed weight ``name`` (group-sorted rows)."""
    w = expert_weights(module)[name]
    bias = getattr(module, f"{name}_bias", None) if getattr(module, "has_bias", False) else None
    out_features = w.shape[1]
    used = sum(counts)
    outs = []
    for e, (rows, n) in enumerate(zip(x[:used].split(counts), counts, strict=True)):
        if n == 0:
            continue
        q_x, _ = backend.quantize_rowcol(rows, spec, None, None)
        y = backend.gemm(q_x, w.expert(e, dtype=rows.dtype), rows.dtype)
        outs.append(y + bias[e].to(y.dtype) if bias is not None else y)
    if used < x.shape[0]:
        outs.append(x.new_zeros((x.shape[0] - used, out_features)))
    if not outs:
        return x.new_zeros((x.shape[0], out_features))
    return torch.cat(outs)


def packed_projector(module: nn.Module, device: torch.device) -> tuple[Project, int]:
    """``(project, num_experts)`` of a packed experts module (see
    :func:`hf_nvfp4.experts.nvfp4_projector`; inference only)."""
    info: PackedExperts | None = getattr(module, "_hf_nvfp4_packed", None)
    if info is None:
        raise RuntimeError(
            f"{type(module).__name__} dispatches to the {PACKED_IMPLEMENTATION!r} experts "
            "implementation but holds no packed NVFP4 weights"
        )
    backend = backend_instance(resolve_backend(info.backend, device))
    spec = _role_specs(info.recipe).x

    def project(x: torch.Tensor, stage: int, counts: list[int]) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                f"{type(module).__name__}: packed NVFP4 experts are inference only, no gradient "
                "flows through them to their input; for training load the model with "
                "hf_nvfp4.checkpoint.load_packed(..., mode='train') (or run under "
                "torch.no_grad())"
            )
        return _packed_grouped(module, info.params[stage], x, counts, backend, spec)

    return project, getattr(module, f"{info.params[-1]}_packed").shape[0]


def packed_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``"hf_nvfp4_packed"`` experts implementation: the inference forward of
    :func:`hf_nvfp4.experts.nvfp4_experts_forward` on packed weights (same outputs)."""
    project, num_experts = packed_projector(self, hidden_states.device)
    return routed_experts_forward(self, hidden_states, top_k_index, top_k_weights,
                                  num_experts, project)


PROJECTORS[PACKED_IMPLEMENTATION] = packed_projector


def register_packed() -> None:
    """Register ``"hf_nvfp4_packed"`` in transformers' ``ExpertsInterface`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(PACKED_IMPLEMENTATION, packed_experts_forward)


# --- packed checkpoints ---------------------------------------------------------------


def packed_experts_state(
    model: nn.Module,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The packed tensors of every NVFP4 experts module, and the state-dict keys they
    replace (the expert parameters and ``sr_state``), which the high-precision state
    skips."""
    tensors: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()
    for name, mod in iter_quantized_experts(model):
        for p, w in expert_weights(mod).items():
            for suffix, t in zip(EXPERT_SUFFIXES, (w.data, w.scale, w.global_scale),
                                 strict=True):
                tensors[f"{name}.{p}_{suffix}"] = t
                replaced.add(f"{name}.{p}_{suffix}")
            replaced.add(f"{name}.{p}")
        replaced.add(f"{name}.sr_state")
    return tensors, replaced


def refuse_unpackable_experts(model: nn.Module, what: str) -> None:
    """Raise ``ValueError`` naming an experts module that runs NVFP4 but whose recipe
    quantizes its weights in another format (MXFP4, FP8): it has no packed NVFP4 form."""
    for name, mod in iter_nvfp4_experts(model):
        spec = _role_specs(mod._hf_nvfp4.recipe).w
        if spec is None or spec.fmt != "nvfp4":
            raise ValueError(
                f"{what}: experts module {name!r} quantizes its weights as "
                f"{spec.fmt if spec else 'bf16'!r}, which has no packed NVFP4 form"
            )


def validate_packed_experts(
    infos: dict[str, TensorInfo],
) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Check the packed experts tensors of a native checkpoint.

    Returns ``{module: {parameter: (E, out, in)}}``. Per parameter: ``<p>_packed`` U8
    [E, out, in/2], ``<p>_scale`` F8_E4M3 [E, out, in/16], ``<p>_global_scale`` F32 [E].
    """
    found: dict[str, dict[str, tuple[int, int, int]]] = {}
    for key, info in infos.items():
        if not key.endswith("_packed") or (key.endswith(".weight_packed")
                                            and len(info.shape) != 3):
            continue
        module, _, leaf = key[: -len("_packed")].rpartition(".")
        if info.dtype != "U8" or len(info.shape) != 3:
            raise CheckpointError(
                f"tensor {key!r} in {info.file} must be a 3D U8 tensor [E, out, in/2]; got "
                f"dtype {info.dtype}, shape {list(info.shape)}"
            )
        num, out, inp = info.shape[0], info.shape[1], 2 * info.shape[2]
        if out % BLOCK or inp % BLOCK:
            raise CheckpointError(
                f"tensor {key!r} in {info.file}: shape {list(info.shape)} gives [{out}, {inp}] "
                f"expert matrices; both dimensions must be multiples of {BLOCK}"
            )
        base = f"{module}.{leaf}"
        for suffix, dtype, shape in (("scale", "F8_E4M3", (num, out, inp // BLOCK)),
                                     ("global_scale", "F32", (num,))):
            other = infos.get(f"{base}_{suffix}")
            if other is None or other.dtype != dtype or other.shape != shape:
                got = (f"dtype {other.dtype}, shape {list(other.shape)}" if other is not None
                       else "missing")
                raise CheckpointError(
                    f"tensor {base + '_' + suffix!r} of packed experts {key!r} ({info.file}) "
                    f"must be {dtype} {list(shape)}; got {got}"
                )
        if base in infos:
            raise CheckpointError(
                f"experts parameter {base!r} is both packed and plain ({infos[base].file}); "
                "the checkpoint is inconsistent"
            )
        found.setdefault(module, {})[leaf] = (num, out, inp)
    return found


def prepare_packed_experts(
    model: nn.Module, infos: dict[str, TensorInfo], recipe: Recipe, backend: str
) -> None:
    """Swap the packed experts modules of a (meta) model for their packed form."""
    for name, params in validate_packed_experts(infos).items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            mod = None
        if mod is None or not is_experts_module(mod):
            raise CheckpointError(
                f"the checkpoint holds packed experts for {name!r}, which is not an experts "
                f"module of {type(model).__name__} ({type(mod).__name__ if mod else 'absent'})"
            )
        expected = {p: tuple(gemm_matrices(mod, p).shape) for p in quantized_params(mod)}
        if expected != params:
            raise CheckpointError(
                f"packed experts of {name!r} hold {params} but the module's expert matrices "
                f"are {expected} (parameter: (E, out, in))"
            )
        pack_experts_module(mod, recipe, backend, shapes=params)


def finalize_packed_experts(
    model: nn.Module, infos: dict[str, TensorInfo], read: Callable[[TensorInfo], torch.Tensor]
) -> None:
    """After loading: packed experts buffers have their dtypes and valid scales (a buffer
    left on meta or cast to the model dtype is read again from its file)."""
    for name, mod in model.named_modules():
        if not is_packed_experts(mod):
            continue
        for p in mod._hf_nvfp4_packed.params:
            for suffix in EXPERT_SUFFIXES:
                attr = f"{p}_{suffix}"
                t = getattr(mod, attr)
                if t.is_meta or t.dtype != _DTYPES[suffix]:
                    key = f"{name}.{attr}"
                    if key not in infos:
                        raise CheckpointError(f"tensor {key!r} was not loaded and is not on disk")
                    device = next((b.device for b in mod.buffers() if not b.is_meta),
                                  torch.device("cpu"))
                    setattr(mod, attr, read(infos[key]).to(device))
            scale, gs = getattr(mod, f"{p}_scale"), getattr(mod, f"{p}_global_scale")
            for e in range(gs.shape[0]):
                check_packed_values(f"{name}.{p}[{e}]", scale[e], gs[e],
                                    infos[f"{name}.{p}_scale"].file)


# --- exports ----------------------------------------------------------------------------


@dataclass
class ExpertExport:
    """The per-expert linears an export writes, and the renaming of the other tensors."""

    layers: list[PackedLayer] = field(default_factory=list)
    amax: dict[str, float] = field(default_factory=dict)
    replaced: set[str] = field(default_factory=set)
    routers: list[str] = field(default_factory=list)
    model: nn.Module | None = None

    def rename(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` (no experts among them) under the original checkpoint's names, as
        ``save_pretrained`` writes them (only a pure renaming is accepted)."""
        if self.model is None or not tensors:
            return tensors
        out = _revert_to_hub_names(self.model, dict(tensors))
        ids = {id(t) for t in tensors.values()}
        if len(out) != len(tensors) or any(id(t) not in ids for t in out.values()):
            raise ValueError(
                f"transformers' checkpoint conversion of {type(self.model).__name__} does more "
                "than rename the non-expert tensors; refusing to export its MoE layout"
            )
        return out

    def rename_all(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An export's tensors with every non-expert one renamed (:meth:`rename`); the
        per-expert tensors already carry their final names."""
        prefixes = tuple(f"{layer.name}." for layer in self.layers)
        experts = {k: t for k, t in tensors.items() if prefixes and k.startswith(prefixes)}
        others = self.rename({k: t for k, t in tensors.items() if k not in experts})
        clash = sorted(set(others) & set(experts))
        if clash:
            raise ValueError(f"renamed tensor {clash[0]!r} collides with an expert tensor")
        return {**others, **experts}

    def rename_module(self, name: str) -> str:
        """A module name under the original checkpoint's names (via its ``weight`` key)."""
        if self.model is None:
            return name
        return next(iter(self.rename({f"{name}.weight": torch.empty(0)}))).rpartition(".")[0]


def require_expert_input_amax(
    input_amax: dict[str, float] | None, experts: ExpertExport, export: str
) -> None:
    """A W4A4 export of NVFP4 experts needs every per-expert linear's input amax."""
    missing = [layer.name for layer in experts.layers
               if not (input_amax or {}).get(layer.name, 0) > 0]
    if missing:
        raise ValueError(
            f"{export}: a W4A4 export needs the input amax of each expert's linears (e.g. "
            f"{missing[0]!r}), which calibrate_input_amax does not measure for MoE experts; "
            "export with weight_only=True (NVFP4A16), or pass those amaxes in input_amax"
        )


def refuse_high_precision_experts(model: nn.Module, export: str) -> None:
    """Raise naming the first experts module kept in high precision (its per-expert
    layout and ignore entries for the engines are not determined)."""
    for name, mod in model.named_modules():
        if is_grouped_linear(mod):  # kept high precision, it is a plain Linear weight
            continue
        if is_experts_module(mod) and not isinstance(getattr(mod, "_hf_nvfp4", None),
                                                     ExpertsQuantization):
            raise ValueError(
                f"{export} cannot export experts module {name!r}: it is kept in high "
                "precision (e.g. a first/last BF16 block), and the per-expert layout engines "
                "read for unquantized experts next to NVFP4 ones is not determined; convert "
                "every MoE block to NVFP4 (first_bf16_blocks/last_bf16_blocks) or save with "
                "hf_nvfp4.checkpoint.save_packed"
            )


def _probe(modules: list[tuple[str, nn.Module]]):
    """Index tensors shaped like each fused parameter (2 columns): value
    ``offset + 2 * (e * out + row) + col``, unique across parameters."""
    probe: dict[str, torch.Tensor] = {}
    sources: list[tuple[int, str, nn.Module, str, int, int]] = []
    offset = 0
    for name, mod in modules:
        for p in quantized_params(mod):
            num, out = gemm_matrices_shape(mod, p)[:2]
            values = torch.arange(num * out * 2, dtype=torch.int64).view(num, out, 2) + offset
            probe[f"{name}.{p}"] = values
            sources.append((offset, name, mod, p, num, out))
            offset += num * out * 2
    return probe, sources


def gemm_matrices_shape(module: nn.Module, name: str) -> tuple[int, int, int]:
    """``(E, out, in)`` of an experts parameter's GEMM matrices (training or packed)."""
    if is_packed_experts(module):
        num, out, half = getattr(module, f"{name}_packed").shape
        return num, out, 2 * half
    return tuple(gemm_matrices(module, name).shape)


def _revert_to_hub_names(model: nn.Module, tensors: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` under the architecture's checkpoint names (transformers'
    ``revert_weight_conversion``), also for a model loaded from names that needed no
    conversion: a packed checkpoint holds the fused experts, so ``from_pretrained`` records an
    empty list of conversions, which reverts nothing. Exports want the per-expert names engines
    read, so the architecture's default mapping stands in, as for a model built from config."""
    from transformers.core_model_loading import revert_weight_conversion

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None or len(conversions) > 0:
        return revert_weight_conversion(model, tensors)
    model._weight_conversions = None
    try:
        return revert_weight_conversion(model, tensors)
    finally:
        model._weight_conversions = conversions


def expert_export(model: nn.Module, export: str) -> ExpertExport:
    """The per-expert NVFP4 linears of ``model`` under its original checkpoint's names.

    Raises ``ValueError`` naming the module where the layout cannot be determined (see the
    module docstring). A model without NVFP4 experts gives an empty :class:`ExpertExport`
    (and no renaming).
    """
    refuse_high_precision_experts(model, export)
    modules = list(iter_quantized_experts(model))
    if not modules:
        return ExpertExport()
    for name, mod in modules:
        if is_grouped_linear(mod):
            raise ValueError(
                f"{export} cannot export {name!r} ({type(mod).__name__}): its NVFP4 groups have "
                "a global scale each, which one exported weight tensor cannot carry; keep it "
                f"in high precision (exclude=[{name.rpartition('.')[2]!r}] in the config) or "
                "save the model with hf_nvfp4.checkpoint.save_packed"
            )
        if weights_transposed(mod) or getattr(mod, "has_bias", False):
            what = "stores [in, out] matrices" if weights_transposed(mod) else "has expert biases"
            raise ValueError(
                f"{export} cannot export experts module {name!r} ({type(mod).__name__}): it "
                f"{what}, and the per-expert layout engines read for it is not determined; "
                "save the model with hf_nvfp4.checkpoint.save_packed instead"
            )
    probe, sources = _probe(modules)
    reverted = _revert_to_hub_names(model, probe)
    fused = sorted(set(probe) & set(reverted))
    if fused:
        raise ValueError(
            f"{export} cannot export experts parameter {fused[0]!r}: transformers has no "
            f"per-expert checkpoint names for {type(model).__name__} (its conversion mapping "
            "keeps the fused tensor), so the per-expert layout is not determined"
        )
    weights = {name: expert_weights(mod) for name, mod in modules}
    result = ExpertExport(model=model)
    covered = {(s[1], s[3]): torch.zeros(s[4], s[5], dtype=torch.int32) for s in sources}
    for key, t in reverted.items():
        layer = _expert_rows(key, t, sources)
        if layer is None:
            raise ValueError(
                f"{export}: transformers maps the fused experts to {key!r} with shape "
                f"{list(t.shape)}, which is not a row range of one expert's [out, in] "
                "matrix; refusing to export this MoE layout"
            )
        module_name, mod, p, e, rows = layer
        covered[(module_name, p)][e, rows] += 1
        w = weights[module_name][p]
        lin = key[: -len(".weight")]
        q = w.expert(e, rows)  # own copies: files may not hold views of one storage
        q = dataclasses.replace(q, data=q.data.clone(), scale=q.scale.clone(),
                                global_scale=q.global_scale.clone())
        result.layers.append(PackedLayer(lin, mod, q, None))
        if w.amax is not None:
            result.amax[lin] = w.amax[e]
    for (module_name, p), count in covered.items():
        if not bool((count == 1).all()):
            raise ValueError(
                f"{export}: transformers' per-expert names do not cover every row of "
                f"{module_name}.{p} exactly once; refusing to export this MoE layout"
            )
    result.layers.sort(key=lambda layer: _natural(layer.name))
    for name, mod in modules:
        result.replaced |= {f"{name}.{p}" for p in quantized_params(mod)}
        result.replaced |= {f"{name}.{p}_{s}" for p in quantized_params(mod)
                            for s in EXPERT_SUFFIXES}
        result.replaced.add(f"{name}.sr_state")
        router = f"{name.rpartition('.')[0]}.gate"
        if isinstance(getattr(_submodule(model, router), "weight", None), torch.Tensor):
            result.routers.append(router)
    return result


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _expert_rows(key: str, t: torch.Tensor, sources):
    """``(module name, module, parameter, expert, rows)`` when the reverted probe tensor
    ``t`` named ``key`` is a whole-width row range of one expert's matrix, else None."""
    if not key.endswith(".weight") or t.dim() != 2 or t.shape[1] != 2 or t.shape[0] == 0:
        return None
    first = int(t[0, 0])
    for offset, name, mod, p, num, out in sources:
        if offset <= first < offset + num * out * 2:
            index = (first - offset) // 2
            e, row = divmod(index, out)
            n = t.shape[0]
            want = offset + 2 * (e * out + row + torch.arange(n)).unsqueeze(1) + torch.arange(2)
            if row + n > out or not torch.equal(t, want):
                return None
            return name, mod, p, e, slice(row, row + n)
    return None


__all__ = [
    "EXPERT_SUFFIXES",
    "PACKED_IMPLEMENTATION",
    "ExpertExport",
    "ExpertWeights",
    "KeepScaleDtypes",
    "PackedExperts",
    "expert_export",
    "expert_weights",
    "finalize_packed_experts",
    "is_packed_experts",
    "iter_quantized_experts",
    "pack_experts_module",
    "packed_experts_forward",
    "packed_projector",
    "packed_experts_state",
    "prepare_packed_experts",
    "refuse_high_precision_experts",
    "refuse_unpackable_experts",
    "register_packed",
    "require_expert_input_amax",
    "unpack_experts_module",
    "validate_packed_experts",
]
