"""Compile a model's decoder blocks: the configuration of our end-to-end speed figures.

NVFP4 adds a dozen quantization ops per linear layer. Run eagerly, their host time bounds
small models; compiled per decoder block with CUDA graphs (``mode="reduce-overhead"``) the
step is GPU-bound (``bench/e2e.py``'s compiled columns, which call this; figures in
``bench/README.md``). Blocks, not the whole model: each block traces whole (NVFP4 layers have
no graph breaks) and the embeddings, head and loss stay eager.

CUDA graphs replay into memory that the next replay overwrites, so a training loop calls
:func:`step_begin` before each step's forward (``hf_nvfp4.Trainer`` does). They also record
one graph (and its memory) per distinct input shape: feed batches of one shape (sequences
packed or padded to a fixed length), or use ``mode="default"`` when lengths vary.
"""

from __future__ import annotations

import torch
from torch import nn

#: ``torch.compile`` modes that capture CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: The modes :func:`compile_blocks` takes (``torch.compile``'s).
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_MARK = "_hf_nvfp4_compiled_blocks"


def compile_blocks(
    model: nn.Module, mode: str = "reduce-overhead", *, backend: str = "inductor",
    fullgraph: bool = False,
) -> int:
    """Compile each decoder block of ``model`` in place (``nn.Module.compile``: parameter
    names, ``state_dict`` and saving are unchanged). Returns the number of blocks compiled.

    Args:
        mode: a ``torch.compile`` mode (:data:`MODES`); ``"reduce-overhead"`` and
            ``"max-autotune"`` capture CUDA graphs on CUDA devices (call :func:`step_begin`
            before each training step).
        backend: ``torch.compile``'s backend (``"aot_eager"`` traces without generating code).
        fullgraph: refuse graph breaks inside a block.

    Raises:
        ValueError: an unknown mode, or a model without decoder blocks (the blocks are found
            as :func:`hf_nvfp4.convert` finds them).
    """
    from .convert import find_blocks

    if mode not in MODES:
        raise ValueError(f"compile_blocks: unknown mode {mode!r}; expected one of {MODES}")
    found = find_blocks(model)
    if not found:
        raise ValueError(
            f"compile_blocks: no decoder blocks found in {type(model).__name__} (an "
            "nn.ModuleList of blocks holding Linear layers); compile its modules yourself"
        )
    n = 0
    for name, _ in found:
        for block in model.get_submodule(name):
            block.compile(mode=mode, backend=backend, fullgraph=fullgraph)
            n += 1
    setattr(model, _MARK, mode)
    return n


def compiled_blocks_mode(model: nn.Module) -> str | None:
    """The mode :func:`compile_blocks` compiled ``model``'s blocks with, or None."""
    return getattr(model, _MARK, None)


def uses_cuda_graphs(model: nn.Module) -> bool:
    """Whether ``model``'s blocks were compiled in a mode that captures CUDA graphs."""
    return compiled_blocks_mode(model) in CUDA_GRAPH_MODES


def step_begin() -> None:
    """Start a new step for CUDA graphs (``torch.compiler.cudagraph_mark_step_begin``): the
    previous step's graph outputs may now be overwritten."""
    torch.compiler.cudagraph_mark_step_begin()


__all__ = ["CUDA_GRAPH_MODES", "MODES", "compile_blocks", "compiled_blocks_mode", "step_begin",
           "uses_cuda_graphs"]
