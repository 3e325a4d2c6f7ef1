"""Optimizers with block-quantized states ("FP4 All the Way").

:class:`QuantizedAdamW` stores AdamW's moments in NVFP4, MXFP4, FP8 block or MXFP8 and does
the update in FP32 on FP32 master weights; :func:`param_groups` keeps norms, embeddings and
small tensors in FP32.

With the Hugging Face Trainer::

    opt = QuantizedAdamW(param_groups(model, weight_decay=0.01), lr=3e-4)
    Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))

or ``Trainer(..., optimizer_cls_and_kwargs=(QuantizedAdamW, {"lr": 3e-4}))``.
"""

from .adamw import QuantizedAdamW
from .groups import DEFAULT_MIN_QUANTIZED_NUMEL, param_groups
from .state import STATE_FORMATS, MomentCodec

__all__ = [
    "DEFAULT_MIN_QUANTIZED_NUMEL",
    "STATE_FORMATS",
    "MomentCodec",
    "QuantizedAdamW",
    "param_groups",
]
