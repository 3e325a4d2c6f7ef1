"""FSDP2 all-gathers quantized weights as codes and scales, not as FP32 or BF16 values.

Under FSDP2 (``fully_shard``) every rank keeps a shard of each weight (rows of ``W [N, K]``)
and all-gathers the whole weight before each forward. A layer whose recipe quantizes ``W`` in
square tiles (NVFP4 16x16, MXFP4 32x32, FP8 block 128x128) with round-to-nearest uses only the
tiles' codes and scales, so the all-gather can move those instead: 0.5625 bytes per weight for
NVFP4 (a 4-bit code and one E4M3 scale per 16 values) instead of 2 (BF16) or 4 (FP32).

How, through FSDP2's own extension points (the tensor hooks ``fsdp_pre_all_gather`` /
``fsdp_post_all_gather`` that torchao's float8 and Transformer Engine also implement):

* :class:`ShardedWeight` wraps the master weight (FP32 as the optimizer and checkpoints see
  it; every op runs on the wrapped tensor). Before an all-gather each rank quantizes only its
  shard: NVFP4's per-tensor amax is all-reduced (max) over the shard group first, so every
  rank encodes with the scale of the whole weight. Shards hold whole tiles (``N`` a multiple
  of ``world x tile``), so each tile, its scale and its codes are exactly those of the
  unsharded weight.
* :class:`GatheredWeight` is the whole weight as FSDP hands it to the layer: the gathered
  codes and tile scales plus the global scale. The forward reads W from them; the backward
  derives W^T by transposing the tiles FSDP2 gathered again (or kept)
  (:func:`hf_nvfp4.numerics.quantize.transpose_tiles`): the same codes and scales quantizing
  W^T would give, and no W^T held from forward to backward.

Training is therefore bitwise that of the unsharded layer (same global batch, ``reduce_amax``
for the activations). Weights whose shape does not split into whole tiles per rank, and
layers whose recipe does not quantize W in square RTN tiles, all-gather their values as usual.
The gathered weight supports only what a quantized linear needs; any other op on it raises,
naming the op (e.g. the late switch to BF16 needs the master weights:
:func:`~hf_nvfp4.schedule.switch_to_high_precision` refuses it up front).

State dicts hold the plain master (:func:`plain_state_dict`), and a
``load_state_dict(..., assign=True)``, which replaces the parameter, wraps the loaded tensor
again (:func:`register_state_dict_hooks`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

from ..backends import backend_instance, resolve_backend
from ..numerics.formats import get_format
from ..numerics.quantize import QTensor, tensor_amax
from ..recipe import QuantSpec

aten = torch.ops.aten

# Ops whose outputs FSDP2 (sharding at init, copy-in, state-dict loads) and ``.to()`` must
# get back as sharded weights, so the shard FSDP keeps still carries the all-gather hooks.
_KEEPS_WRAPPER = {
    aten.empty_like.default, aten.new_zeros.default, aten.new_empty.default,
    aten.slice.Tensor, aten.copy_.default, aten.view.default, aten.as_strided.default,
    aten._to_copy.default, aten._pin_memory.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.clone.default, aten.detach.default,
    aten.alias.default, aten.chunk.default,
}


def gathers_codes(spec: QuantSpec | None, spec_t: QuantSpec | None) -> bool:
    """Whether a weight quantized by ``spec`` (W) and ``spec_t`` (W^T) can be all-gathered
    as codes: both the same square-tile round-to-nearest spec without the RHT, so W^T's codes
    are W's transposed."""
    return (
        spec is not None and spec == spec_t and spec.tile[0] == spec.tile[1] > 1
        and spec.rounding == "nearest" and not spec.rht
    )


def _splits_into_tiles(shape: torch.Size, world: int, tile: int) -> bool:
    n, k = shape
    return n % (world * tile) == 0 and k % tile == 0


class ShardedWeight(torch.Tensor):
    """A master weight whose FSDP2 all-gather moves quantized tiles (see the module doc).

    Every op runs on the wrapped tensor; the ops FSDP2 shards, copies and moves it with
    return a :class:`ShardedWeight` again. Build one with :func:`wrap_weight`.

    Attributes:
        spec: the weight's :class:`~hf_nvfp4.recipe.QuantSpec` (square tiles, RTN).
        backend: the layer's backend name (``"auto"`` resolved per device), which quantizes
            the shard before each all-gather.
    """

    _inner: torch.Tensor
    spec: QuantSpec
    backend: str

    @staticmethod
    def __new__(cls, inner: torch.Tensor, spec: QuantSpec,
                backend: str = "auto") -> ShardedWeight:  # noqa: D102
        self = torch.Tensor._make_wrapper_subclass(
            cls, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, layout=inner.layout, device=inner.device,
            requires_grad=inner.requires_grad,
        )
        self._inner = inner
        self.spec = spec
        self.backend = backend
        return self

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: D105
        seen = []

        def unwrap(t: ShardedWeight) -> torch.Tensor:
            seen.append(t)
            return t._inner

        args, kwargs = tree_map_only(ShardedWeight, unwrap, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _KEEPS_WRAPPER:
            return out
        first = seen[0]
        return tree_map_only(torch.Tensor, lambda t: ShardedWeight(t, first.spec, first.backend),
                             out)

    def __tensor_flatten__(self) -> tuple[list[str], tuple[QuantSpec, str]]:  # noqa: D105
        return ["_inner"], (self.spec, self.backend)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):  # noqa: D105
        return ShardedWeight(inner["_inner"], *meta)

    def __repr__(self) -> str:  # noqa: D105
        return f"ShardedWeight({self._inner!r}, fmt={self.spec.fmt}, tile={self.spec.tile})"

    @property
    def data(self) -> torch.Tensor:
        """As ``Tensor.data``: a detached :class:`ShardedWeight` sharing the master."""
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        # ``param.data = param.data.to(torch.float32)`` (Accelerate's FSDP2 upcast) changes
        # the wrapper's metadata; the master it wraps must follow or the two disagree.
        if not isinstance(new, ShardedWeight):
            new = ShardedWeight(new, self.spec, self.backend)
        torch.Tensor.data.__set__(self, new)
        self._inner = new._inner

    @property
    def master(self) -> torch.Tensor:
        """The wrapped high-precision tensor."""
        return self._inner

    def fsdp_pre_all_gather(
        self,
        mesh: Any,
        outer_size: torch.Size,
        outer_stride: tuple[int, ...],
        module: torch.nn.Module,
        mp_policy: Any,
    ) -> tuple[tuple[torch.Tensor, ...], Any]:
        """FSDP2 hook: this rank's quantized shard (codes, tile scales; :meth:`shard_codes`),
        or its values when the weight does not split into whole tiles per rank or the mesh
        has one rank (nothing crosses a wire, and FSDP2's one-rank path copies only the
        first all-gather input)."""
        dtype = mp_policy.param_dtype or self.dtype
        local = self._inner.to(dtype)
        world = mesh.size()
        if world == 1 or not _splits_into_tiles(outer_size, world, self.spec.tile[0]):
            rows = -(-outer_size[0] // world)
            if local.shape[0] < rows:  # FSDP2 pads uneven shards at the end
                local = torch.nn.functional.pad(local, (0, 0, 0, rows - local.shape[0]))
            return (local,), None
        return self.shard_codes(local, outer_size, mesh.get_group())

    def shard_codes(
        self, local: torch.Tensor, outer_size: torch.Size, group: Any = None
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple]:
        """The shard ``local`` (whole tiles of the weight of shape ``outer_size``) as codes
        and tile scales, encoded with the whole weight's scale (NVFP4: the amax all-reduced
        over ``group``), and the metadata :meth:`fsdp_post_all_gather` reads."""
        amax = None
        if get_format(self.spec.fmt).global_scale:
            amax = tensor_amax(local).float()
            torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=group)
        backend = backend_instance(resolve_backend(self.backend, local.device))
        q = backend.quantize_weight(local, self.spec, amax=amax)[0]
        return (q.data, q.scale), (q.global_scale, local.dtype, tuple(outer_size))

    def fsdp_post_all_gather(
        self,
        outputs: tuple[torch.Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None:
        """FSDP2 hook: the whole weight from the gathered shards (a :class:`GatheredWeight`,
        or the gathered values). With ``out`` (later steps) the gathered buffers are
        ``out``'s own, refilled in place: only the new global scale is set."""
        if metadata is None:
            (values,) = outputs
            return None if out is not None else (values, ())
        global_scale, dtype, shape = metadata
        if out is not None:
            out._global_scale = global_scale
            return None
        data, scale = outputs
        return GatheredWeight(data, scale, global_scale, self.spec, torch.Size(shape), dtype), ()


class GatheredWeight(torch.Tensor):
    """A whole weight ``[N, K]`` as gathered codes and tile scales (FSDP2's unsharded
    parameter of a :class:`ShardedWeight`).

    :func:`gathered_weight` gives W as the linear GEMMs read it; gradients flow to it as
    to any parameter. Other ops raise: its high-precision values were never gathered.
    """

    @staticmethod
    def __new__(
        cls, data: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None,
        spec: QuantSpec, shape: torch.Size, dtype: torch.dtype, requires_grad: bool = False,
    ) -> GatheredWeight:  # noqa: D102
        self = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=data.device, requires_grad=requires_grad
        )
        self._data, self._scale, self._global_scale = data, scale, global_scale
        self.spec = spec
        return self

    __torch_function__ = torch._C._disabled_torch_function_impl

    def _same(self, requires_grad: bool = False) -> GatheredWeight:
        return GatheredWeight(self._data, self._scale, self._global_scale, self.spec,
                              self.shape, self.dtype, requires_grad)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: D105
        # the gathered weight need not be the first argument (torch.cat([x, w]), x + w)
        w = next(t for t in tree_flatten((args, kwargs or {}))[0]
                 if isinstance(t, GatheredWeight))
        if args[0] is w:
            if func in (aten.detach.default, aten.alias.default):
                return w._same()
            # FSDP2 views the unsharded parameter at its own shape
            if func in (aten.as_strided.default, aten.view.default) and (
                tuple(args[1]) == tuple(w.shape)
            ):
                return w._same()
        raise NotImplementedError(
            f"{func} on an NVFP4 weight that FSDP2 all-gathered as {w.spec.fmt} codes "
            "(NVFP4Config(fsdp_quantized_all_gather=True)): only quantized linear layers can "
            "read it. Turn fsdp_quantized_all_gather off for code that needs the weight's "
            "values (the late switch to BF16, weight tying, custom forwards)."
        )

    def __tensor_flatten__(self) -> tuple[list[str], tuple]:  # noqa: D105
        inner = ["_data", "_scale"] + (["_global_scale"] if self._global_scale is not None else [])
        return inner, (self.spec, self.shape, self.dtype, self.requires_grad)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):  # noqa: D105
        spec, shape, dtype, requires_grad = meta
        return GatheredWeight(inner["_data"], inner["_scale"], inner.get("_global_scale"), spec,
                              shape, dtype, requires_grad)

    def __repr__(self) -> str:  # noqa: D105
        return (f"GatheredWeight(shape={tuple(self.shape)}, fmt={self.spec.fmt}, "
                f"tile={self.spec.tile})")


def gathered_weight(
    weight: GatheredWeight, spec: QuantSpec | None, spec_t: QuantSpec | None
) -> QTensor:
    """W along K from a :class:`GatheredWeight`, as the layer's weight quantizer (``spec``,
    ``spec_t``) would give for the unsharded weight; raises when those are not the gathered
    spec. (A function, not a method: torch.compile traces it.)"""
    if spec != weight.spec or spec_t != weight.spec:
        raise ValueError(
            f"this weight was all-gathered as {weight.spec} codes but the layer now "
            f"quantizes W as {spec} and W^T as {spec_t}; the recipe changed after "
            "fully_shard"
        )
    return QTensor(weight._data, weight._scale, weight._global_scale, weight.spec.fmt,
                   weight.shape, weight.dtype, weight.spec.tile)


def wrap_weight(weight: torch.nn.Parameter, spec: QuantSpec,
                backend: str = "auto") -> torch.nn.Parameter:
    """A Parameter holding a :class:`ShardedWeight` of ``weight``'s tensor (shared, not
    copied), to give to ``fully_shard``; ``weight`` itself when it is wrapped already."""
    if isinstance(weight, ShardedWeight):
        return weight
    return torch.nn.Parameter(ShardedWeight(weight.data, spec, backend), weight.requires_grad)


def _local(weight: torch.Tensor) -> torch.Tensor:
    """``weight``'s local shard when it is an FSDP2 DTensor, ``weight`` otherwise."""
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        with torch.no_grad():
            return weight.to_local()
    return weight


def is_gathered_quantized(weight: torch.Tensor) -> bool:
    """Whether FSDP2 all-gathers ``weight`` as codes: a :class:`ShardedWeight` (plain or as
    an FSDP2 DTensor's shard), or the :class:`GatheredWeight` such an all-gather gave."""
    return isinstance(_local(weight), (ShardedWeight, GatheredWeight))


def plain_state_dict(
    module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """``state_dict`` post-hook: a wrapped weight (plain or as an FSDP2 DTensor's shard)
    enters the state dict as its master tensor (same storage), so checkpoints (safetensors,
    torch.distributed.checkpoint) hold plain tensors and loads write into the master."""
    from torch.distributed.tensor import DTensor

    key = prefix + "weight"
    t = state_dict.get(key)
    if isinstance(t, ShardedWeight):
        state_dict[key] = t.master
    elif isinstance(t, DTensor) and isinstance(t.to_local(), ShardedWeight):
        state_dict[key] = DTensor.from_local(
            t.to_local().master, t.device_mesh, t.placements, run_check=False,
            shape=t.shape, stride=t.stride(),
        )


def _rewrap_assigned(
    spec: QuantSpec, backend: str, module: torch.nn.Module, incompatible_keys: Any
) -> None:
    """``load_state_dict`` post-hook: ``assign=True`` replaced the wrapped weight by the
    state dict's plain tensor (or an FSDP2 DTensor of one); wrap it again."""
    from torch.distributed.tensor import DTensor

    weight = module.weight
    local = _local(weight)
    if isinstance(local, (ShardedWeight, GatheredWeight)):
        return
    with torch.no_grad():
        if isinstance(weight, DTensor):
            wrapped = DTensor.from_local(
                ShardedWeight(local, spec, backend), weight.device_mesh, weight.placements,
                run_check=False, shape=weight.shape, stride=weight.stride(),
            )
        else:
            wrapped = ShardedWeight(weight.data, spec, backend)
    module.weight = torch.nn.Parameter(wrapped, weight.requires_grad)


def register_state_dict_hooks(module: torch.nn.Module) -> None:
    """Keep ``module.weight``, a :class:`ShardedWeight` from :func:`wrap_weight`, wrapped
    through state dicts: it saves as its plain master (:func:`plain_state_dict`), and a
    ``load_state_dict(..., assign=True)`` (Accelerate's ``cpu_ram_efficient_loading``,
    meta-device loads), which replaces the parameter, wraps the loaded tensor again with the
    same spec and backend. Call once per module, after wrapping its weight."""
    weight = _local(module.weight)
    if not isinstance(weight, ShardedWeight):
        raise TypeError(f"{type(module).__name__}.weight is not a ShardedWeight: "
                        f"{type(weight).__name__}")
    module.register_state_dict_post_hook(plain_state_dict)
    module.register_load_state_dict_post_hook(
        functools.partial(_rewrap_assigned, weight.spec, weight.backend)
    )


def master_tensor(weight: torch.Tensor) -> torch.Tensor:
    """The tensor a quantizer reads: the wrapped master of a :class:`ShardedWeight` (not
    under FSDP: the whole weight), ``weight`` otherwise."""
    return weight.master if isinstance(weight, ShardedWeight) else weight


__all__ = [
    "GatheredWeight", "ShardedWeight", "gathered_weight", "gathers_codes",
    "is_gathered_quantized", "master_tensor", "plain_state_dict", "register_state_dict_hooks",
    "wrap_weight",
]
