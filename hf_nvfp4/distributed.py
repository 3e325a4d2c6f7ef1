"""This process's place in the default torch.distributed group (one process when there is none)."""

from __future__ import annotations

import torch


def _initialized() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Rank in the default process group; 0 without one."""
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    """Size of the default process group; 1 without one."""
    return torch.distributed.get_world_size() if _initialized() else 1


#: Why NVFP4 training with stochastic rounding refuses ``torch.nn.DataParallel``, and what
#: to do instead.
DATA_PARALLEL_ADVICE = (
    "NVFP4 training with stochastic rounding does not run under torch.nn.DataParallel (its "
    "replicas hold copies of one rounding state, all as rank 0, so every GPU's share of the "
    "batch would round with the same random bits); launch one process per GPU (`accelerate "
    "launch --num_processes N train.py` or `torchrun --nproc_per_node N train.py`: "
    "DistributedDataParallel), or make one GPU visible (CUDA_VISIBLE_DEVICES=0)"
)


def refuse_data_parallel_replica(module: torch.nn.Module) -> None:
    """Raise if ``module`` is a replica made by ``torch.nn.DataParallel``.

    Every replica gets a copy of the same stochastic-rounding state and runs as rank 0, so
    the GPUs' shares of a batch would round with the same random bits: correlated errors
    that do not average out as independent streams (DDP's, one per rank) do.
    transformers' Trainer uses DataParallel when one process sees several GPUs.
    """
    if getattr(module, "_is_replica", False):
        raise RuntimeError(f"{type(module).__name__}: {DATA_PARALLEL_ADVICE}")
