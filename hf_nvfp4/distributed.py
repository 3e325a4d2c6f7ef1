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
