"""Where ``save_pretrained`` writes the tensors: transformers' checkpoint conversion, reverted.

transformers 5 loads many architectures from checkpoints laid out differently from the model
(:mod:`transformers.conversion_mapping`): tensors renamed (EXAONE's ``transformer.h.N...``
for a model that runs as Llama), fused or split (``Concatenate``/``Chunk``), or stored
transposed (Ergo's shared expert ``feed_forward.shared_up_proj``, an ``[in, out]`` matrix
that ``Transpose`` turns into ``mlp.shared_experts.up_proj.weight``). ``save_pretrained``
reverts that conversion (``revert_weight_conversion``), so an hf_nvfp4 master checkpoint holds
its quantized layers' weights under those original names, and a check of its files must ask
for them.

Such a conversion may depend on the tensor's shape (a transpose, a chunk along a dimension),
so :func:`saved_name` asks transformers with a meta tensor of the state-dict entry's own shape
and dtype (no memory, no data): the answer is the name (or names, when saving splits the
tensor) the file holds. A conversion that cannot be applied to the tensor alone (one that
merges it with sibling tensors on save) gives no name; :attr:`SavedName.error` says why, and
the check that needs the tensor says so rather than guess.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SavedName:
    """One state-dict tensor and where a checkpoint of its model holds it.

    Attributes:
        key: the state-dict key (the model's name).
        names: the names ``save_pretrained`` writes it under (several when saving splits it;
            ``(key,)`` when transformers converts nothing for it, or when ``error`` is set).
        error: why transformers' conversion could not be applied to this tensor alone
            (None when ``names`` is its answer).
    """

    key: str
    names: tuple[str, ...]
    error: str | None = None

    def found_in(self, infos: Container[str]) -> bool:
        """Whether the checkpoint whose tensor names are ``infos`` holds this tensor: under
        every converted name, or under the model's own name (``save_original_format=False``
        or ``save_packed``, which write the model's names)."""
        return self.key in infos or all(name in infos for name in self.names)


def saved_name(model: nn.Module, key: str, like: torch.Tensor | None = None) -> SavedName:
    """Where ``save_pretrained`` writes the tensor ``key`` of ``model``.

    Args:
        model: a transformers model (meta or materialized).
        key: a state-dict key of ``model``.
        like: a tensor with the shape and dtype of that entry (default: looked up in
            ``model.state_dict()``; pass it when asking for many keys); only its shape and
            dtype are used.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without checkpoint conversions saves model names
        return SavedName(key, (key,))
    if like is None:
        like = model.state_dict()[key]
    probe = torch.empty(like.shape, dtype=like.dtype, device="meta")
    try:
        names = tuple(revert_weight_conversion(model, {key: probe}))
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
        return SavedName(key, (key,), f"{type(e).__name__}: {e}")
    if not names:
        return SavedName(key, (key,), "the conversion drops it")
    return SavedName(key, names)


__all__ = ["SavedName", "saved_name"]
