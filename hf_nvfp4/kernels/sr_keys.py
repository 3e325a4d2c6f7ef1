"""Advance a layer's stochastic-rounding state and derive the call's keys, in one launch.

Computes exactly :func:`hf_nvfp4.numerics.rng.derive_keys` of ``[seed, step + 1]`` on
32-bit words (uint32 arithmetic wraps mod 2^32 as the reference's masks do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fmix(h):
    # numerics.rng's FMIX_C1 / FMIX_C2 as literals: jitted code reads no plain globals.
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit(do_not_specialize=["rank"])  # a specialized rank == 1 hashes as a signed int
def _advance_kernel(state_ptr, keys_ptr, rank, N: tl.constexpr):
    seed = tl.load(state_ptr)
    step = tl.load(state_ptr + 1) + 1
    tl.store(state_ptr + 1, step)
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    h = _fmix(hi)
    h = _fmix(h * 0x9E3779B9 + lo)
    h = _fmix(h * 0x9E3779B9 + (step & 0xFFFFFFFF).to(tl.uint32))
    h = _fmix(h * 0x9E3779B9 + rank.to(tl.uint32))
    for i in tl.static_range(N):
        tl.store(keys_ptr + i, _fmix(h * 0x9E3779B9 + (i + 1)).to(tl.int32, bitcast=True))


def advance_keys_triton(state: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    """``state[1] += 1`` in place; the int32 [n] keys of the new state on ``rank``."""
    keys = torch.empty(n, dtype=torch.int32, device=state.device)
    _advance_kernel[(1,)](state, keys, rank, N=n)
    return keys
