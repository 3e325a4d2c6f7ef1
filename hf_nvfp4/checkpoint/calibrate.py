"""A short calibration pass: the input amax of every quantized linear layer.

Serving engines quantize activations with a static per-tensor global scale (NVFP4 W4A4):
compressed-tensors stores ``input_global_scale = 448 * 6 / amax`` (encode), ModelOpt
``input_scale = amax / (6 * 448)`` (decode). Forward hooks record the running maximum of
``|x|`` at each quantized layer's input over a few sample texts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .layers import is_quantized_linear

# Generic English prose; enough to exercise typical activation ranges in a few forwards.
SAMPLE_TEXTS = (
    "The history of science is the study of the development of science and scientific "
    "knowledge, including both the natural and social sciences.",
    "In mathematics, a prime number is a natural number greater than one that is not a "
    "product of two smaller natural numbers. Primes are central in number theory.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n",
    "Question: A train travels 120 kilometres in two hours. What is its average speed?\n"
    "Answer: The average speed is 120 / 2 = 60 kilometres per hour.",
    "The weather in the mountains changes quickly; hikers should carry warm clothes, "
    "water and a map, and tell someone where they are going.",
    "Large language models are trained on vast amounts of text to predict the next token, "
    "and low-precision arithmetic makes that training cheaper.",
    "Il était une fois une petite ville au bord de la mer, où les pêcheurs partaient chaque "
    "matin avant le lever du soleil.",
    "1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584, 4181, 6765",
)


def calibration_batches(
    tokenizer: Any = None,
    texts: Sequence[str] | None = None,
    *,
    vocab_size: int | None = None,
    max_length: int = 128,
) -> list[torch.Tensor]:
    """Token id tensors ``[1, L]`` for calibration, one per text.

    With a tokenizer the texts are tokenized; without one (a checkpoint that ships none)
    the UTF-8 bytes of the texts, modulo ``vocab_size``, serve as token ids.
    """
    texts = list(texts or SAMPLE_TEXTS)
    if not texts:
        raise ValueError("calibration needs at least one text")
    out = []
    for text in texts:
        if tokenizer is not None:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            out.append(ids["input_ids"])
        else:
            if not vocab_size:
                raise ValueError("calibration without a tokenizer needs vocab_size")
            raw = list(text.encode("utf-8"))[:max_length]
            out.append(torch.tensor([[b % vocab_size for b in raw]], dtype=torch.long))
    return out


def _hook(store: dict[str, float], name: str):
    def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        amax = float(args[0].detach().abs().amax().float())
        store[name] = max(store.get(name, 0.0), amax)

    return record


@torch.no_grad()
def calibrate_input_amax(
    model: nn.Module, batches: Iterable[torch.Tensor], *, progress: bool = False
) -> dict[str, float]:
    """``{layer name: max |input|}`` for every quantized linear over ``batches`` of ids."""
    store: dict[str, float] = {}
    handles = [
        mod.register_forward_pre_hook(_hook(store, name))
        for name, mod in model.named_modules()
        if is_quantized_linear(mod)
    ]
    if not handles:
        raise ValueError(f"{type(model).__name__} has no quantized linear layers to calibrate")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        batches = list(batches)
        for ids in tqdm(batches, desc="calibrating", disable=not progress):
            model(input_ids=ids.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return store


def input_amax_or_fail(
    amax: dict[str, float] | None, names: Iterator[str] | Sequence[str]
) -> dict[str, float]:
    """Check a calibration result covers every layer in ``names`` with a positive amax."""
    if amax is None:
        raise ValueError(
            "exporting NVFP4 activations (W4A4) needs input_amax from calibrate_input_amax; "
            "pass weight_only=True for an NVFP4A16 export"
        )
    for name in names:
        if name not in amax or not amax[name] > 0:
            raise ValueError(
                f"no positive calibrated input amax for layer {name!r} (got "
                f"{amax.get(name)!r}); did the calibration pass reach it?"
            )
    return amax


__all__ = ["SAMPLE_TEXTS", "calibrate_input_amax", "calibration_batches", "input_amax_or_fail"]
