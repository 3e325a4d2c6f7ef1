"""NVFP4 mixture-of-experts layers through transformers' ``ExpertsInterface``.

transformers 5 keeps a MoE block's experts as fused 3D parameters (``gate_up_proj`` or
``up_proj`` [E, out, in], ``down_proj``, optional ``*_bias`` [E, out]; [E, in, out] when the
class is declared ``is_transposed``) in a module whose forward dispatches on
``config._experts_implementation`` through ``transformers.integrations.moe.
ALL_EXPERTS_FUNCTIONS``. We register the implementation ``"hf_nvfp4"`` there and point
each converted experts module at it, through a private copy of its config, so that the
other experts modules (e.g. in the blocks kept BF16) keep theirs. No model class is patched:
every MoE model built on that interface converts without code here.

Two families of experts classes outside that interface run the same quantized GEMMs, their
forward overridden on the instance (:func:`set_implementation`), again not on the class:

* batched experts (:data:`BATCHED_EXPERTS`: Llama 4's ``Llama4TextExperts``) get ``[E * T, H]``
  rows already weighted by the router, expert ``e``'s at rows ``e*T`` to ``(e+1)*T``, and run
  both projections with ``T`` rows per expert;
* parallel experts (:data:`PARALLEL_EXPERTS`: JetMoE's ``JetMoeParallelExperts``) hold one
  projection of every expert (``weight`` [E, out, in]) and get rows already sorted by expert
  with the count per expert (``forward(inputs, expert_size)``); the MoE (and JetMoE's
  mixture-of-attention) block around them routes and combines.
* grouped linears (:data:`GROUPED_LINEARS`: DeepSeek V4's ``DeepseekV4GroupedLinear``, the
  block-diagonal first half of its attention output projection) are ``nn.Linear`` modules
  whose ``weight`` [G * out, in] holds G matrices, group ``g``'s applied to ``x[..., g, :]``;
  each group is an "expert" that every token visits.
* shared experts (:data:`SHARED_EXPERTS`: Inkling's ``InklingSharedExperts``) are dense
  gated MLPs that every token visits, ``gate_proj``/``up_proj`` [E, I, H] and ``down_proj``
  [E, H, I] as three parameters, each expert's output scaled by a per-token gamma from the
  router and summed over experts (``forward(hidden_states, gammas)``).

Numerics per expert are those of :class:`~hf_nvfp4.nn.linear.NVFP4Linear` (fprop x 1x16
RTN and W 16x16, dgrad SR, wgrad RHT + SR; :mod:`hf_nvfp4.nn.grouped`). Tensor scales are
per expert and per call: the amax of an expert's activations (gradients) is taken over the
tokens routed to it on this rank, the weight's over that expert's matrix, like a separate
NVFP4Linear per expert. Data-parallel ranks route different tokens, so the amaxes are not
all-reduced across ranks for experts (``reduce_amax`` applies to the dense layers only).

Execution: the tokens are sorted by expert and :func:`~hf_nvfp4.nn.grouped.
quantized_grouped_linear` runs every expert's quantized GEMMs (grouped Triton kernels on CUDA,
the backend per expert elsewhere). The token counts are read on the host, one sync per MoE
layer call: compiled models break the graph there.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._names import derives_from
from .distributed import rank
from .nn.functional import LinearPlan, build_plan
from .nn.grouped import expert_keys, quantized_grouped_linear
from .quant.sr import draws_keys, new_state
from .recipe import Recipe

IMPLEMENTATION = "hf_nvfp4"


@dataclass
class ExpertsQuantization:
    """What a converted experts module runs: recipe, backend and the plans per device."""

    recipe: Recipe
    backend: str
    previous_implementation: str | None
    sr_seed: int
    plans: dict[tuple, LinearPlan] = field(default_factory=dict)

    def plan(self, device: torch.device) -> LinearPlan:
        """The :class:`LinearPlan` of every expert GEMM on ``device`` (cached)."""
        key = (str(device), self.recipe)
        plan = self.plans.get(key)
        if plan is None:
            plan = build_plan(self.recipe.role_specs(), self.backend, device)
            self.plans[key] = plan
        return plan


#: Experts classes outside the ExpertsInterface whose ``forward(hidden_states)`` is
#: ``bmm(x.view(E, -1, H), gate_up_proj)``, then ``up * act_fn(gate)`` (gate the first half),
#: then ``bmm(., down_proj)``: weights ``[E, in, out]``, ``hidden_states`` already split into
#: equal slices per expert (and weighted) by the caller.
BATCHED_EXPERTS = frozenset({"Llama4TextExperts"})

#: Experts classes outside the ExpertsInterface holding one projection of every expert,
#: ``weight`` ``[E, out, in]``, whose ``forward(inputs, expert_size)`` is ``F.linear`` of each
#: expert's slice of the expert-sorted ``inputs`` (``expert_size[e]`` rows for expert ``e``).
PARALLEL_EXPERTS = frozenset({"JetMoeParallelExperts"})

#: ``nn.Linear`` subclasses whose ``forward(x)`` maps ``x`` [..., G, in] to [..., G, out] with
#: group ``g``'s rows ``g*out`` to ``(g+1)*out`` of ``weight`` ([G * out, in], ``n_groups``
#: = G), without the bias.
GROUPED_LINEARS = frozenset({"DeepseekV4GroupedLinear"})

#: Modules of E dense gated MLPs that every token visits, ``gate_proj``/``up_proj``
#: [E, I, H] and ``down_proj`` [E, H, I], whose ``forward(hidden_states, gammas)`` is
#: ``sum_e gammas[..., e] * (act_fn(x @ gate_proj[e]^T) * (x @ up_proj[e]^T)) @ down_proj[e]^T``
#: (summed in FP32, returned in ``hidden_states``' dtype).
SHARED_EXPERTS = frozenset({"InklingSharedExperts"})
#: The three GEMM stages of a :data:`SHARED_EXPERTS` module, in forward order.
SHARED_PARAMS = ("gate_proj", "up_proj", "down_proj")

Project = Callable[[torch.Tensor, int, list[int]], torch.Tensor]


def is_batched_experts(module: nn.Module) -> bool:
    """Whether ``module`` is of a class in :data:`BATCHED_EXPERTS` or derived from one (FSDP2's
    ``fully_shard`` swaps in a subclass), packed or not."""
    return derives_from(module, BATCHED_EXPERTS)


def is_parallel_experts(module: nn.Module) -> bool:
    """Whether ``module`` is of a class in :data:`PARALLEL_EXPERTS` or derived from one,
    packed or not."""
    return derives_from(module, PARALLEL_EXPERTS)


def is_grouped_linear(module: nn.Module) -> bool:
    """Whether ``module`` is of a class in :data:`GROUPED_LINEARS` or derived from one, packed
    or not."""
    return derives_from(module, GROUPED_LINEARS)


def is_shared_experts(module: nn.Module) -> bool:
    """Whether ``module`` is of a class in :data:`SHARED_EXPERTS` or derived from one, packed
    or not."""
    return derives_from(module, SHARED_EXPERTS)


def _instance_family(module: nn.Module) -> str | None:
    """``"batched"``, ``"parallel"``, ``"grouped"`` or ``"shared"``: the families whose
    forward is set on the instance."""
    if is_batched_experts(module):
        return "batched"
    if is_parallel_experts(module):
        return "parallel"
    if is_grouped_linear(module):
        return "grouped"
    if is_shared_experts(module):
        return "shared"
    return None


def weights_transposed(module: nn.Module) -> bool:
    """Whether the module's 3D expert weights are ``[E, in, out]`` (else ``[E, out, in]``)."""
    return bool(getattr(module, "is_transposed", False)) or is_batched_experts(module)


def up_weight_name(module: nn.Module) -> str | None:
    """``"gate_up_proj"`` or ``"up_proj"``: the first projection's 3D parameter, if any."""
    for name in ("gate_up_proj", "up_proj"):
        p = getattr(module, name, None)
        if isinstance(p, torch.Tensor) and p.dim() == 3:
            return name
    return None


def expert_params(module: nn.Module) -> tuple[str, ...]:
    """The expert parameters of an (unpacked) experts module, one per GEMM stage: the first
    projection and ``down_proj``, a parallel experts module's or grouped linear's
    ``weight``, or a shared experts module's :data:`SHARED_PARAMS`."""
    if is_parallel_experts(module) or is_grouped_linear(module):
        return ("weight",)
    if is_shared_experts(module):
        return SHARED_PARAMS
    return (up_weight_name(module), "down_proj")


def expert_matrices(module: nn.Module, name: str) -> torch.Tensor:
    """Parameter ``name`` of an (unpacked) experts module as ``[E, a, b]`` (a view): as
    stored, and a grouped linear's ``[G * out, in]`` weight as ``[G, out, in]``."""
    w = getattr(module, name)
    if is_grouped_linear(module):
        return w.view(module.n_groups, -1, w.shape[-1])
    return w


def _is_3d(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, torch.Tensor) and p.dim() == 3


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` holds fused 3D experts dispatched through the ExpertsInterface, or is
    a :data:`BATCHED_EXPERTS`, :data:`PARALLEL_EXPERTS` or :data:`SHARED_EXPERTS` module or
    a :data:`GROUPED_LINEARS` linear (unpacked, in all cases)."""
    if is_parallel_experts(module):
        return _is_3d(module, "weight")
    if is_shared_experts(module):
        return all(_is_3d(module, p) for p in SHARED_PARAMS) and hasattr(module, "act_fn")
    if is_grouped_linear(module):
        w = getattr(module, "weight", None)
        groups = getattr(module, "n_groups", 0)
        return (isinstance(w, torch.Tensor) and w.dim() == 2 and groups > 0
                and w.shape[0] % groups == 0)
    if not _is_3d(module, "down_proj"):
        return False
    if is_batched_experts(module):
        return up_weight_name(module) == "gate_up_proj" and hasattr(module, "act_fn")
    return (
        up_weight_name(module) is not None
        and hasattr(module, "has_gate") and hasattr(module, "config")
    )


def expert_shapes(module: nn.Module) -> list[tuple[str, int, int]]:
    """``(parameter, in_features, out_features)`` of each projection of one expert."""
    transposed = weights_transposed(module)
    out = []
    for name in expert_params(module):
        _, a, b = expert_matrices(module, name).shape
        out.append((name, b, a) if not transposed else (name, a, b))
    return out


def unsupported_reason(module: nn.Module) -> str | None:
    """Why an experts module cannot run in NVFP4, or None."""
    for name, fin, fout in expert_shapes(module):
        if fin % 16 or fout % 16:
            return f"expert {name} dimensions ({fout} x {fin}) not multiples of 16"
    if getattr(module, "_is_expert_parallel", False):
        return "expert parallel experts are not supported"
    return None


def register() -> None:
    """Register ``"hf_nvfp4"`` in transformers' ``ExpertsInterface`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, nvfp4_experts_forward)


#: ``(project, num_experts)`` of a module per experts implementation: this module's
#: :func:`nvfp4_projector`, and the packed one of :mod:`hf_nvfp4.checkpoint.experts`.
PROJECTORS: dict[str, Callable[[nn.Module, torch.device], tuple[Project, int]]] = {}


class InstanceForward:
    """The instance forward of a batched, parallel or shared experts module or a grouped
    linear: its family's forward (:data:`FAMILY_FORWARDS`) on the projector of its
    implementation, named (:data:`PROJECTORS`), so that the module pickles and deep-copies
    with it (a copy's forward runs the copy). Takes the class forward's arguments.

    A shallow copy (``copy.copy``, ``torch.nn.DataParallel``'s replicas) shares this object,
    so it would run the original's tensors: an input on another device than those is refused
    with that reason."""

    def __init__(self, module: nn.Module, implementation: str) -> None:
        self.module = module
        self.implementation = implementation

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        own = next((t for t in (*self.module._parameters.values(),
                                *self.module._buffers.values()) if t is not None), None)
        if own is not None and own.device != x.device:
            raise RuntimeError(
                f"{type(self.module).__name__} holds its tensors on {own.device} but got an "
                f"input on {x.device}: a shallow copy of a converted module (e.g. a "
                "torch.nn.DataParallel replica) runs the original's forward; copy it with "
                "copy.deepcopy, and train on several GPUs with one process each (accelerate "
                "launch, torchrun)"
            )
        project, num_experts = PROJECTORS[self.implementation](self.module, x.device)
        forward = FAMILY_FORWARDS[_instance_family(self.module)]
        return forward(self.module, *args, **kwargs, num_experts=num_experts, project=project)


#: The name :class:`InstanceForward` had when only batched experts used it (older pickles).
BatchedForward = InstanceForward


def has_instance_forward(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs an :class:`InstanceForward` (a converted or
    packed batched, parallel or shared experts module or grouped linear)."""
    return any(_instance_family(m) is not None and current_implementation(m) is not None
               for m in model.modules())


def _forward_slot(module: nn.Module) -> str:
    """Where a module's own forward lives: accelerate's hooks move it to ``_old_forward``
    and put theirs in ``forward``."""
    return "_old_forward" if "_old_forward" in module.__dict__ else "forward"


def current_implementation(module: nn.Module) -> str | None:
    """The experts implementation ``module`` runs (None: the class's own forward)."""
    if _instance_family(module) is not None:
        forward = module.__dict__.get(_forward_slot(module))
        return forward.implementation if isinstance(forward, InstanceForward) else None
    return getattr(module.config, "_experts_implementation", None)


def set_implementation(module: nn.Module, implementation: str | None) -> None:
    """Point an experts module at an experts implementation (None: its class's default).

    ExpertsInterface modules get a private copy of their config naming it; a batched,
    parallel or shared experts module or a grouped linear gets an :class:`InstanceForward` as
    its instance forward (under an accelerate hook: as the forward the hook calls).
    """
    if _instance_family(module) is not None:
        slot = _forward_slot(module)
        if implementation is not None:
            setattr(module, slot, InstanceForward(module, implementation))
        elif slot == "forward":
            module.__dict__.pop("forward", None)
        else:
            module._old_forward = types.MethodType(type(module).forward, module)
        return
    module.config = copy.copy(module.config)
    module.config._experts_implementation = implementation


def convert_experts_module(
    module: nn.Module, recipe: Recipe, backend: str, sr_seed: int
) -> None:
    """Make ``module`` (see :func:`is_experts_module`) run its experts in NVFP4, in place.

    Parameters are untouched (shared with any optimizer); a ``sr_state`` buffer is added.
    """
    register()
    previous = current_implementation(module)
    set_implementation(module, IMPLEMENTATION)
    device = getattr(module, expert_params(module)[0]).device
    module.register_buffer("sr_state", new_state(sr_seed, device))
    module._hf_nvfp4 = ExpertsQuantization(recipe, backend, previous, int(sr_seed))


def iter_nvfp4_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every experts module of ``model`` converted to NVFP4."""
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "_hf_nvfp4", None), ExpertsQuantization):
            yield name, mod


def reset_sr_state(module: nn.Module) -> None:
    """Re-seed a converted experts module's ``sr_state`` (step 0) on its weights' device."""
    device = getattr(module, expert_params(module)[0]).device
    module.sr_state = new_state(module._hf_nvfp4.sr_seed, device)


def _bias(module: nn.Module, name: str) -> torch.Tensor | None:
    return getattr(module, f"{name}_bias", None) if getattr(module, "has_bias", False) else None


def nvfp4_projector(module: nn.Module, device: torch.device) -> tuple[Project, int]:
    """``(project, num_experts)`` of a converted experts module: ``project(rows, stage,
    counts)`` runs stage ``stage`` (0: up, 1: down; a parallel experts module or a grouped
    linear has stage 0 only; shared experts 0: gate, 1: up, 2: down) of every expert on
    group-sorted rows."""
    quant: ExpertsQuantization | None = getattr(module, "_hf_nvfp4", None)
    if quant is None:
        raise RuntimeError(
            f"{type(module).__name__} dispatches to the 'hf_nvfp4' experts implementation but "
            "was not converted by hf_nvfp4.convert (it has no NVFP4 state)"
        )
    params = expert_params(module)
    weights = tuple(expert_matrices(module, p) for p in params)
    num_experts = weights[-1].shape[0]
    transposed = weights_transposed(module)
    plan = quant.plan(device)
    keys = None
    if draws_keys(module, quant.recipe.stochastic_rounding):
        keys = expert_keys(module.sr_state, rank(), num_experts, len(params))
    biases = tuple(_bias(module, p) for p in params)

    def project(x: torch.Tensor, stage: int, counts: list[int]) -> torch.Tensor:
        return quantized_grouped_linear(x, weights[stage], biases[stage], counts, plan,
                                        keys[stage] if keys is not None else None,
                                        transposed=transposed)

    return project, num_experts


def nvfp4_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``"hf_nvfp4"`` experts implementation (same contract as transformers'
    ``grouped_mm``): route, run each expert's quantized GEMMs, weight and sum per token."""
    project, num_experts = nvfp4_projector(self, hidden_states.device)
    return routed_experts_forward(self, hidden_states, top_k_index, top_k_weights,
                                  num_experts, project)


PROJECTORS[IMPLEMENTATION] = nvfp4_projector


def _gemm_dtype(rows: torch.Tensor) -> torch.Tensor:
    """As NVFP4Linear: under autocast the GEMM inputs are in the autocast dtype."""
    dev_type = rows.device.type
    if torch.is_autocast_enabled(dev_type):
        return rows.to(torch.get_autocast_dtype(dev_type))
    return rows


def batched_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    *,
    num_experts: int,
    project: Project,
) -> torch.Tensor:
    """The forward shared by the :data:`BATCHED_EXPERTS` implementations: ``hidden_states``
    ``[E * T, H]`` holds expert ``e``'s rows at ``e*T`` to ``(e+1)*T``; ``project`` runs the
    up and down projections with ``T`` rows per expert, ``up * act_fn(gate)`` between; under
    autocast the result is in the autocast dtype, as the class's ``bmm`` gives it."""
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    if rows.shape[0] % num_experts:
        raise ValueError(
            f"{type(self).__name__}: {rows.shape[0]} rows do not split into {num_experts} "
            "equal expert slices"
        )
    counts = [rows.shape[0] // num_experts] * num_experts
    rows = _gemm_dtype(rows)
    dev_type = rows.device.type
    with torch.autocast(dev_type, enabled=False):
        gate, up = project(rows, 0, counts).chunk(2, dim=-1)
    out = up * self.act_fn(gate)
    with torch.autocast(dev_type, enabled=False):
        return project(out.to(rows.dtype), 1, counts)


def parallel_experts_forward(
    self: nn.Module,
    inputs: torch.Tensor,
    expert_size: list[int],
    *,
    num_experts: int,
    project: Project,
) -> torch.Tensor:
    """The forward shared by the :data:`PARALLEL_EXPERTS` implementations: ``project`` runs
    the module's one projection on ``inputs`` (``[S, in]``, sorted by expert) with
    ``expert_size[e]`` rows for expert ``e``; under autocast in the autocast dtype, as
    ``F.linear`` would."""
    counts = [int(n) for n in expert_size]
    if len(counts) != num_experts or sum(counts) != inputs.shape[0]:
        raise ValueError(
            f"{type(self).__name__}: expert_size {counts} does not split {inputs.shape[0]} "
            f"rows among {num_experts} experts"
        )
    rows = _gemm_dtype(inputs)
    with torch.autocast(rows.device.type, enabled=False):
        return project(rows, 0, counts)


def grouped_linear_forward(
    self: nn.Module, x: torch.Tensor, *, num_experts: int, project: Project
) -> torch.Tensor:
    """The forward shared by the :data:`GROUPED_LINEARS` implementations: ``x`` [..., G, in]
    is sorted by group (T rows each), ``project`` runs each group's matrix, and the result
    comes back as [..., G, out] (the autocast dtype under autocast, as the class's bmm).
    ``num_experts`` is the number of groups G."""
    num_groups = num_experts
    if x.dim() < 2 or x.shape[-2] != num_groups:
        raise ValueError(
            f"{type(self).__name__}: input of shape {tuple(x.shape)} does not hold "
            f"{num_groups} groups in its second-to-last dimension"
        )
    lead = x.shape[:-2]
    rows = _gemm_dtype(x.reshape(-1, num_groups, x.shape[-1]).transpose(0, 1)
                       .reshape(-1, x.shape[-1]))
    counts = [rows.shape[0] // num_groups] * num_groups
    with torch.autocast(rows.device.type, enabled=False):
        out = project(rows, 0, counts)
    return out.view(num_groups, counts[0], out.shape[-1]).transpose(0, 1).reshape(
        *lead, num_groups, out.shape[-1])


def shared_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    gammas: torch.Tensor,
    *,
    num_experts: int,
    project: Project,
) -> torch.Tensor:
    """The forward shared by the :data:`SHARED_EXPERTS` implementations: every token
    ``[..., H]`` visits every expert (the rows repeated once per expert, ``T`` each);
    ``project`` runs the gate, up and down projections, ``act_fn(gate) * up * gamma`` between
    (``gammas`` [..., E]); the experts' outputs are summed in FP32 and returned in
    ``hidden_states``' dtype, as the class does."""
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    tokens = x.shape[0]
    if gammas.numel() != tokens * num_experts:
        raise ValueError(
            f"{type(self).__name__}: gammas of shape {tuple(gammas.shape)} do not hold one "
            f"value per token ({tokens}) and expert ({num_experts})"
        )
    rows = _gemm_dtype(x).repeat(num_experts, 1)
    counts = [tokens] * num_experts
    dev_type = rows.device.type
    with torch.autocast(dev_type, enabled=False):
        gate = project(rows, 0, counts)
        up = project(rows, 1, counts)
    weight = gammas.reshape(tokens, num_experts).t().reshape(-1, 1)
    activated = self.act_fn(gate) * up * weight
    with torch.autocast(dev_type, enabled=False):
        down = project(activated.to(rows.dtype), 2, counts)
    out = down.view(num_experts, tokens, down.shape[-1]).float().sum(dim=0)
    return out.to(hidden_states.dtype).view(shape)


#: The forward of each instance family, ``(module, *class forward args, num_experts=,
#: project=)``.
FAMILY_FORWARDS: dict[str, Callable[..., torch.Tensor]] = {
    "batched": batched_experts_forward,
    "parallel": parallel_experts_forward,
    "grouped": grouped_linear_forward,
    "shared": shared_experts_forward,
}


def routed_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    project: Callable[[torch.Tensor, int, list[int]], torch.Tensor],
) -> torch.Tensor:
    """The routing shared by the experts implementations (transformers' ``grouped_mm``
    contract): sort the (token, slot) rows by expert, ``project(rows, stage, counts)`` for
    the up (stage 0) and down (stage 1) projections with the gate or activation between,
    then weight and sum per token. ``counts`` (rows per expert) are read on the host."""
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape
    sorted_ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)
    rows = hidden_states[perm // num_top_k]
    counts = torch.bincount(sorted_ids.clamp(max=num_experts), minlength=num_experts + 1)
    counts = counts[:num_experts].tolist()  # the host sync of the routing
    rows = _gemm_dtype(rows)
    dev_type = rows.device.type
    with torch.autocast(dev_type, enabled=False):
        out = project(rows, 0, counts)
    out = self._apply_gate(out) if self.has_gate else self.act_fn(out)
    with torch.autocast(dev_type, enabled=False):
        out = project(out.to(rows.dtype), 1, counts)
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)

    # as transformers' grouped_mm: type promotion (FP32 router weights: FP32 weighted sum)
    weighted = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    final = weighted[inverse].view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return final.to(hidden_states.dtype)


__all__ = [
    "BATCHED_EXPERTS",
    "GROUPED_LINEARS",
    "IMPLEMENTATION",
    "FAMILY_FORWARDS",
    "PARALLEL_EXPERTS",
    "PROJECTORS",
    "SHARED_EXPERTS",
    "SHARED_PARAMS",
    "ExpertsQuantization",
    "InstanceForward",
    "Project",
    "batched_experts_forward",
    "convert_experts_module",
    "current_implementation",
    "expert_matrices",
    "expert_params",
    "expert_shapes",
    "grouped_linear_forward",
    "has_instance_forward",
    "is_batched_experts",
    "is_experts_module",
    "is_grouped_linear",
    "is_parallel_experts",
    "is_shared_experts",
    "iter_nvfp4_experts",
    "nvfp4_experts_forward",
    "nvfp4_projector",
    "parallel_experts_forward",
    "register",
    "reset_sr_state",
    "routed_experts_forward",
    "set_implementation",
    "shared_experts_forward",
    "unsupported_reason",
    "weights_transposed",
]
