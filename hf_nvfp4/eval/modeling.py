"""Load any Hugging Face causal LM, our NVFP4 checkpoints included, the same way."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {
    "auto": "auto",
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``; decided at the call."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    path: str | os.PathLike, device: str | None = None, dtype: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a local directory or Hub id, in eval mode.

    ``hf_nvfp4`` is imported first so that its quantization method is registered with
    transformers and NVFP4 checkpoints load through ``AutoModelForCausalLM`` like any other.

    Args:
        path: checkpoint directory or Hub id.
        device: where to place the model; :func:`default_device` when None.
        dtype: one of ``DTYPES`` ("auto" keeps the checkpoint's dtype).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    importlib.import_module("hf_nvfp4")
    device = device or default_device()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], device_map={"": device})
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
