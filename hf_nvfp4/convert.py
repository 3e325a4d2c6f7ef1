"""Model conversion: swap the right ``nn.Linear`` modules of a transformer for NVFP4Linear.

GPT-2-style ``Conv1D`` modules (transformers' linear with its weight stored ``[in, out]``)
become :class:`~hf_nvfp4.nn.NVFP4Conv1D` under the same rules, keeping their weight layout.
Mixture-of-experts modules that keep their experts as fused 3D parameters behind
transformers' ``ExpertsInterface`` (and the experts classes of Llama 4, JetMoE and Inkling's
shared experts outside it) run their expert GEMMs in NVFP4 (:mod:`hf_nvfp4.experts`), again
under the same rules (a router that is an ``nn.Linear`` is a Linear like any other).

Rules (the paper's): only Linear layers inside the decoder blocks are quantized; embeddings,
the output head, norms and the attention score/value matmuls (not Linear modules) stay in
high precision, and so do the first and last few blocks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ._names import derives_from, shown_names
from .backends import describe_backend
from .config import NVFP4Config
from .experts import (
    BATCHED_EXPERTS,
    PARALLEL_EXPERTS,
    SHARED_EXPERTS,
    convert_experts_module,
    is_experts_module,
    unsupported_reason,
)
from .nn.conv1d import NVFP4Conv1D, is_conv1d
from .nn.linear import NVFP4Linear

logger = logging.getLogger(__name__)

# Module types that do the work of a Linear but that we cannot swap (bitsandbytes, GPTQ).
_UNSUPPORTED_LINEAR_LIKE = ("Linear8bitLt", "Linear4bit", "QuantLinear")
_ADAPTER = "a PEFT adapter or tuner layer (kept high precision, as QLoRA keeps adapters)"
# Reasons that are the user's or the recipe's choice, not a layer convert could not handle.
_INTENDED = (
    _ADAPTER,
    "already NVFP4Linear",
    "already NVFP4 experts",
    "listed in modules_to_not_convert",
    "not matched by include patterns",
    "matched an exclude pattern",
    "outside the decoder blocks (embeddings, head, projections)",
)
# nn.Linear subclasses whose own forward is the Linear's ``x @ W^T + b`` (they convert).
_PLAIN_FORWARD_LINEARS = ("FalconLinear",)
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SPLIT_REASONS = ("in the first ", "in the last ")
_WARN_SHARE = 0.10  # warn when more than this share of the NVFP4 blocks' matrices stays


@dataclass
class LayerDecision:
    """What convert did with one module, and why."""

    name: str
    quantized: bool
    reason: str
    params: int


@dataclass
class ConversionSummary:
    """The outcome of :func:`convert`: per-layer decisions and parameter totals."""

    layers: list[LayerDecision] = field(default_factory=list)
    num_blocks: int = 0
    bf16_blocks: tuple[int, int] = (0, 0)
    total_params: int = 0
    #: Matrix parameters inside the decoder blocks that are not Linear weights (MoE experts
    #: stored as fused 3D tensors, routers kept as bare parameters, ...): all high precision.
    #: Parameters used only elementwise (biases, Mamba's ``A_log``) are not matmul weights and
    #: are not listed.
    other_matmuls: list[LayerDecision] = field(default_factory=list)
    #: Layers whose weights FSDP2 all-gathers as codes (``fsdp_quantized_all_gather``).
    gathered_quantized: list[str] = field(default_factory=list)
    #: The backend the quantized layers were given (``NVFP4Config.backend``).
    backend: str = "auto"

    def block_matmul_share(self) -> tuple[int, int]:
        """``(NVFP4, total)`` matrix-parameter counts of the blocks that the split puts in
        NVFP4 (user choices such as ``exclude`` count as intended and are left out)."""
        total = quantized = 0
        for d in [*self.layers, *self.other_matmuls]:
            if d.reason in _INTENDED or d.reason.startswith(_SPLIT_REASONS):
                continue
            total += d.params
            quantized += d.params if d.quantized else 0
        return quantized, total

    @property
    def quantized_layers(self) -> list[str]:
        """Names of the layers now in NVFP4."""
        return [d.name for d in self.layers if d.quantized]

    @property
    def quantized_params(self) -> int:
        """Parameters of the quantized layers."""
        return sum(d.params for d in self.layers if d.quantized)

    def table(self) -> str:
        """A human-readable summary."""
        q = self.quantized_params
        n_q = len(self.quantized_layers)
        lines = [
            f"hf_nvfp4.convert: {n_q} of {len(self.layers)} linear layers quantized "
            f"({self.num_blocks} blocks; first {self.bf16_blocks[0]} and last "
            f"{self.bf16_blocks[1]} kept in BF16)",
            f"  parameters in quantized layers: {q:,} ({100 * q / max(self.total_params, 1):.1f}%"
            f" of {self.total_params:,}); kept high precision: {self.total_params - q:,}",
        ]
        reasons: dict[str, int] = {}
        for d in self.layers:
            if not d.quantized:
                reasons[d.reason] = reasons.get(d.reason, 0) + 1
        for reason, n in sorted(reasons.items()):
            lines.append(f"  kept: {n} x {reason}")
        other: dict[str, list[int]] = {}
        for d in self.other_matmuls:
            other.setdefault(d.reason, []).append(d.params)
        for reason, params in sorted(other.items()):
            lines.append(f"  kept: {len(params)} x {reason} ({sum(params):,} parameters)")
        if self.gathered_quantized:
            lines.append(f"  FSDP2 all-gathers {len(self.gathered_quantized)} weights as "
                         "quantized codes")
        quantized, total = self.block_matmul_share()
        if total:
            lines.append(
                f"  matrix parameters of the NVFP4 blocks in NVFP4: {quantized:,} of {total:,} "
                f"({100 * quantized / total:.1f}%)"
            )
        if n_q:
            lines.append(f"  backend: {describe_backend(self.backend)}")
        return "\n".join(lines)


def find_blocks(model: nn.Module) -> list[tuple[str, int]]:
    """The model's decoder-block ModuleLists as ``[(dotted name, length)]``; empty if none.

    The longest ``nn.ModuleList`` whose length equals ``config.num_hidden_layers`` when the
    model has a config and one matches. Otherwise (no config, or a ``num_hidden_layers`` that
    counts something else, such as HRM's recurrent cache slots) the outermost ModuleLists of
    modules that contain Linears or GPT-2's ``Conv1D`` (or linear-like modules we cannot swap,
    such as bitsandbytes layers, so that convert can report them) of the greatest length, all
    of them when several hold blocks of one class: stacks run one after another or in turn
    (HRM's high- and low-level modules, BLT's patcher, local encoder, global transformer and
    local decoder). Their blocks are numbered one after the other, in module order.
    """
    num = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0
        and any(_is_linear_like(m) for m in mod.modules())
    ]
    matching = [(name, len(mod)) for name, mod in lists if len(mod) == num]
    if matching:
        return matching[:1]
    outermost = [(name, mod) for name, mod in lists
                 if not any(name.startswith(other + ".") for other, _ in lists)]
    if not outermost:
        return []
    longest = max(len(mod) for _, mod in outermost)
    kind = next(type(mod[0]) for _, mod in outermost if len(mod) == longest)
    return [(name, len(mod)) for name, mod in outermost
            if len(mod) == longest and type(mod[0]) is kind]


def _is_linear_like(mod: nn.Module) -> bool:
    return (isinstance(mod, nn.Linear) or is_conv1d(mod)
            or type(mod).__name__ in _UNSUPPORTED_LINEAR_LIKE)


def _own_forward(mod: nn.Module) -> bool:
    """Whether ``mod`` is an ``nn.Linear`` subclass with a forward of its own (a router that
    returns its top-k, another quantizer's linear): NVFP4Linear would replace that forward,
    so it stays as it is. A forward inherited from a class of :data:`_PLAIN_FORWARD_LINEARS`
    (also through FSDP2's subclass) is the Linear's."""
    forward = type(mod).forward
    return (isinstance(mod, nn.Linear) and forward is not nn.Linear.forward
            and not any(c.__name__ in _PLAIN_FORWARD_LINEARS and c.forward is forward
                        for c in type(mod).__mro__))


def _is_tuner_layer(mod: nn.Module) -> bool:
    """Whether ``mod`` is a PEFT tuner layer (derived from peft's ``BaseTunerLayer``)."""
    return derives_from(mod, ("BaseTunerLayer",))


def _adapter_modules(model: nn.Module) -> frozenset[str]:
    """Names of the modules of PEFT adapters: everything inside a PEFT tuner layer (a class
    derived from peft's ``BaseTunerLayer``, e.g. LoRA's ``lora_A``/``lora_B``) but its
    ``base_layer``, the model's own layer."""
    out = set()
    for name, mod in model.named_modules():
        if _is_tuner_layer(mod):
            head = f"{name}." if name else ""
            out.update(head + child for child, _ in mod.named_modules()
                       if child and child.split(".", 1)[0] != "base_layer")
    return frozenset(out)


def _features(mod: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or a Conv1D (weight ``[in, out]``)."""
    if is_conv1d(mod):
        return mod.weight.shape[0], mod.weight.shape[1]
    return mod.in_features, mod.out_features


def _block_of(name: str, blocks: list[tuple[str, int]]) -> int | None:
    """The block index of a module name (numbered across ``blocks``), or None if outside."""
    offset = 0
    for prefix, length in blocks:
        head = prefix + "." if prefix else ""
        if name.startswith(head):
            index = name[len(head) :].split(".", 1)[0]
            if index.isdigit():
                return offset + int(index)
        offset += length
    return None


def _decide(
    name: str, mod: nn.Module, block: int | None, n_blocks: int, split: tuple[int, int],
    config: NVFP4Config, adapters: frozenset[str],
) -> str | None:
    """None to quantize, else the reason to keep the layer in high precision."""
    if isinstance(mod, NVFP4Linear):
        return "already NVFP4Linear"
    if name in adapters or _is_tuner_layer(mod):
        return _ADAPTER
    if any(name == m or name.startswith(m + ".") for m in config.modules_to_not_convert):
        return "listed in modules_to_not_convert"
    if config.include and not any(re.search(p, name) for p in config.include):
        return "not matched by include patterns"
    if any(re.search(p, name) for p in config.exclude):
        return "matched an exclude pattern"
    if block is None:
        return "outside the decoder blocks (embeddings, head, projections)"
    first, last = split
    if block < first:
        return f"in the first {first} blocks (kept BF16)"
    if block >= n_blocks - last:
        return f"in the last {last} blocks (kept BF16)"
    if is_experts_module(mod):
        if getattr(mod, "_hf_nvfp4", None) is not None:
            return "already NVFP4 experts"
        return unsupported_reason(mod)
    if _own_forward(mod):
        return (f"an nn.Linear subclass with its own forward ({type(mod).__name__}), which "
                "NVFP4Linear would replace")
    if any(n % 16 for n in _features(mod)):
        return "dimensions not multiples of 16"
    return None


def _warn_unmatched_names(model: nn.Module, names: list[str]) -> None:
    """Warn for each ``modules_to_not_convert`` entry that names no module of ``model``
    (entries are exact names or prefixes; transformers' own field also matches suffixes, so
    a short name like ``"o_proj"`` would otherwise keep nothing in high precision silently)."""
    modules = [n for n, _ in model.named_modules()]
    for entry in names:
        if any(n == entry or n.startswith(entry + ".") for n in modules):
            continue
        ends = [n for n in modules if n.endswith("." + entry)]
        hint = (f"; {len(ends)} module names end with it (e.g. {ends[0]!r}): list them, or use "
                f"exclude=[r'\\.{re.escape(entry)}$']") if ends else ""
        logger.warning(
            "hf_nvfp4.convert: modules_to_not_convert entry %r names no module of %s (entries "
            "are exact module names or name prefixes)%s", entry, type(model).__name__, hint)


def convert(
    model: nn.Module,
    config: NVFP4Config | dict[str, Any] | None = None,
    *,
    verbose: bool = True,
) -> ConversionSummary:
    """Replace eligible ``nn.Linear`` modules of ``model`` by :class:`NVFP4Linear`, in place.

    GPT-2-style ``Conv1D`` modules become :class:`~hf_nvfp4.nn.NVFP4Conv1D` under the same
    rules (their ``[in, out]`` weight quantized as the Linear weight it is the transpose of).
    Parameters are shared, not copied, so an optimizer built before conversion still
    updates the same tensors. Returns (and with ``verbose`` logs) a
    :class:`ConversionSummary`. MoE experts modules (fused 3D weights dispatched through
    transformers' ``ExpertsInterface``, Llama 4's batched, JetMoE's parallel and Inkling's
    shared experts) switch to the ``"hf_nvfp4"`` experts implementation
    (:mod:`hf_nvfp4.experts`), and so does DeepSeek V4's block-diagonal grouped linear.
    Linear-like modules that cannot be swapped (bitsandbytes layers, GPTQ's ``QuantLinear``,
    ``nn.Linear`` subclasses with a forward of their own such as Llama 4's router) are
    reported with the reason. PEFT adapters (LoRA's ``lora_A``/``lora_B``, ...) stay in high
    precision; the layers they adapt (``base_layer``) convert.
    """
    config = NVFP4Config.load(config)
    recipe = config.get_recipe()
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(
            f"hf_nvfp4.convert could not find the decoder blocks of {type(model).__name__}: "
            "no nn.ModuleList of blocks containing nn.Linear or Conv1D. Supported: Llama, "
            "Mistral, Qwen2/3, Gemma, GPT-NeoX, GPT-2-style models; for others use "
            "NVFP4Linear.from_linear directly."
        )
    n_blocks = sum(length for _, length in blocks)
    split = config.block_split(n_blocks)
    summary = ConversionSummary(
        num_blocks=n_blocks,
        bf16_blocks=split,
        total_params=sum(p.numel() for p in model.parameters()),
        backend=config.backend,
    )
    replacements: list[tuple[str, nn.Module]] = []
    experts: list[nn.Module] = []
    adapters = _adapter_modules(model)
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if is_experts_module(mod):
            reason = _decide(name, mod, _block_of(name, blocks), n_blocks, split, config,
                             adapters)
            summary.layers.append(LayerDecision(name, reason is None, reason or "",
                                                _nparams(mod)))
            if reason is None:
                experts.append(mod)
            continue
        if cls in _UNSUPPORTED_LINEAR_LIKE:
            summary.layers.append(
                LayerDecision(name, False, f"unsupported module type {cls}", _nparams(mod))
            )
            continue
        conv1d = is_conv1d(mod)
        if not (conv1d or isinstance(mod, nn.Linear)):
            continue
        block = _block_of(name, blocks)
        reason = _decide(name, mod, block, n_blocks, split, config, adapters)
        summary.layers.append(LayerDecision(name, reason is None, reason or "", _nparams(mod)))
        if reason is None:
            seed = config.sr_seed + len(replacements)
            wrap = NVFP4Conv1D.from_conv1d if conv1d else NVFP4Linear.from_linear
            replacements.append(
                (name, wrap(mod, recipe, config.backend, sr_seed=seed,
                            reduce_amax=config.reduce_amax))
            )
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    for i, mod in enumerate(experts):
        convert_experts_module(mod, recipe, config.backend, config.sr_seed + len(replacements) + i)
    if config.fsdp_quantized_all_gather:
        summary.gathered_quantized = gather_quantized_weights(model)
        left = len(replacements) - len(summary.gathered_quantized)
        if left:
            logger.warning(
                "hf_nvfp4.convert: fsdp_quantized_all_gather: %d of %d quantized layers "
                "gather their high-precision weights (GPT-2 Conv1D layers, or a recipe "
                "without square round-to-nearest weight tiles)", left, len(replacements),
            )
    if any(d.reason.startswith("unsupported") for d in summary.layers):
        logger.warning(
            "hf_nvfp4.convert: some linear-like modules have unsupported types and stay in "
            "high precision: %s",
            sorted({d.reason for d in summary.layers if d.reason.startswith("unsupported")}),
        )
    summary.other_matmuls = _other_matmuls(model, blocks, n_blocks, split, adapters)
    _warn_unmatched_names(model, config.modules_to_not_convert)
    _warn_ragged(summary)
    _warn_high_precision_share(summary)
    if verbose:
        print(summary.table())
    return summary


def gather_quantized_weights(model: nn.Module) -> list[str]:
    """Let FSDP2 all-gather the weights of ``model``'s NVFP4Linear layers as codes
    (:meth:`NVFP4Linear.gather_quantized`; idempotent); call before ``fully_shard``. Returns
    the names of the layers that do."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, NVFP4Linear) and mod.gather_quantized()]


def _warn_ragged(summary: ConversionSummary) -> None:
    """Warn, naming them, about block layers kept high precision for their ragged sizes."""
    ragged = [d.name for d in summary.layers if d.reason == "dimensions not multiples of 16"]
    if not ragged:
        return
    shown = shown_names(ragged)
    logger.warning(
        "hf_nvfp4.convert: %d of %d linear layers stay in HIGH PRECISION because their "
        "in/out features are not multiples of 16 (NVFP4Linear needs 16-element blocks): %s. "
        "%s",
        len(ragged), len(summary.layers), shown,
        "No layer is quantized: this model trains entirely in high precision."
        if not summary.quantized_layers else "The other layers train in NVFP4.",
    )


def _other_matmuls(
    model: nn.Module, blocks: list[tuple[str, int]], n_blocks: int, split: tuple[int, int],
    adapters: frozenset[str],
) -> list[LayerDecision]:
    """Matrix parameters (2D and up) in the blocks that no Linear-like module owns, outside
    PEFT ``adapters``.

    Parameters that are not matmul weights are not counted: convolutions (``nn.Conv1d`` etc.,
    e.g. Mamba's depthwise conv) and the parameters :func:`_is_elementwise` names. A parameter
    that a Linear-like module owns too is that Linear's weight (the ``te.Linear`` inside an
    NVFP4Linear on the te backend shares its weight): not counted either.
    """
    owned = {id(p) for m in model.modules() if _is_linear_like(m)
             for p in m.parameters(recurse=False)}
    out = []
    for mod_name, mod in model.named_modules():
        if (_is_linear_like(mod) or is_experts_module(mod) or isinstance(mod, _CONVOLUTIONS)
                or mod_name in adapters):
            continue
        block = _block_of(mod_name, blocks)
        if block is None:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() < 2 or _is_elementwise(pname) or id(p) in owned:
                continue
            if block < split[0]:
                reason = f"in the first {split[0]} blocks (kept BF16)"
            elif block >= n_blocks - split[1]:
                reason = f"in the last {split[1]} blocks (kept BF16)"
            elif p.dim() == 3:
                families = BATCHED_EXPERTS | PARALLEL_EXPERTS | SHARED_EXPERTS
                reason = (f"a 3D parameter of {type(mod).__name__} (MoE experts convert "
                          "through transformers' ExpertsInterface or as "
                          f"{', '.join(sorted(families))})")
            else:
                reason = f"a bare matrix parameter of {type(mod).__name__}, not a Linear"
            out.append(LayerDecision(f"{mod_name}.{pname}", False, reason, p.numel()))
    return out


def _is_elementwise(param_name: str) -> bool:
    """Whether a bare parameter of this name is, by convention, used elementwise only.

    Biases (a ``bias`` word in the name: RecurrentGemma's ``input_gate_bias``, DeepSeek-V4's
    ``position_bias``, routers' ``e_score_correction_bias``) are added, not multiplied; a
    state-space mixer's ``A_log`` (Mamba, Jamba: ``[d_inner, d_state]``) is the log of the
    diagonal state matrix, which the selective scan uses as ``exp(A_log)`` elementwise.
    """
    return param_name == "A_log" or re.search(r"(^|_)bias(es)?($|_)", param_name) is not None


def _warn_high_precision_share(summary: ConversionSummary) -> None:
    """Warn when much of what should be NVFP4 stays high precision, saying why."""
    quantized, total = summary.block_matmul_share()
    if not total or (total - quantized) <= _WARN_SHARE * total:
        return
    kept: dict[str, int] = {}
    for d in [*summary.layers, *summary.other_matmuls]:
        if not d.quantized and d.reason not in _INTENDED and not d.reason.startswith(
            _SPLIT_REASONS
        ):
            kept[d.reason] = kept.get(d.reason, 0) + d.params
    top = "; ".join(f"{n:,} parameters: {r}" for r, n in sorted(kept.items(), key=lambda x: -x[1]))
    logger.warning(
        "hf_nvfp4.convert: only %.1f%% of the matrix parameters of the blocks meant for NVFP4 "
        "are NVFP4; %.1f%% stay in high precision (%s)",
        100 * quantized / total, 100 * (total - quantized) / total, top,
    )


def _nparams(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters(recurse=False))


def iter_nvfp4_linears(model: nn.Module) -> Iterator[tuple[str, NVFP4Linear]]:
    """Yield ``(name, module)`` for every NVFP4Linear of ``model`` (NVFP4Conv1D included: its
    weight is ``[in, out]``, see :func:`hf_nvfp4.nn.conv1d.weight_matrix`)."""
    for name, mod in model.named_modules():
        if isinstance(mod, NVFP4Linear):
            yield name, mod
