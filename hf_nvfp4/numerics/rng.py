"""Counter-based random numbers for stochastic rounding.

The draw for element ``i`` of a tensor is a pure function of ``(key, i)``, where the 32-bit
``key = fmix32(seed)``. A GPU kernel that hashes the same counters reproduces the
reference's rounding bit for bit, on any grid and block size.

Two sources of keys:

* a seed drawn from a ``torch.Generator`` (:func:`draw_seed`, :func:`generator_keys`): the
  functional API and tests;
* a layer's device-side state ``[seed, step]`` (:func:`derive_keys`; in training
  :func:`hf_nvfp4.quant.sr.advance_keys`): each forward advances ``step`` in place and
  derives that call's keys from ``(seed, step, rank)`` on the device, so no host
  generator, host sync or graph break is involved.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = (h * FMIX_C1) & _MASK32
    h = h ^ (h >> 13)
    h = (h * FMIX_C2) & _MASK32
    return h ^ (h >> 16)


def seed_key(seed: int) -> int:
    """The 32-bit key of ``seed``: ``fmix32(seed mod 2^32)`` (Python ints: no tensor)."""
    key = seed & _MASK32
    key ^= key >> 16
    key = (key * FMIX_C1) & _MASK32
    key ^= key >> 13
    key = (key * FMIX_C2) & _MASK32
    return key ^ (key >> 16)


def as_int32(key: int) -> int:
    """A 32-bit key as the signed int32 with the same bits (a kernel argument or element)."""
    return key - (1 << 32) if key >= 1 << 31 else key


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One 31-bit seed from ``generator`` (torch's default CPU generator when None)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))


def counter_uniform(
    seed: int, shape: torch.Size | tuple[int, ...], device: torch.device | str
) -> torch.Tensor:
    """FP32 uniforms in [0, 1) for the row-major element indices of ``shape``.

    ``u[i] = (fmix32((i * GOLDEN + fmix32(seed)) mod 2^32) >> 8) * 2^-24``, exact in FP32.
    """
    return keyed_uniform(torch.tensor(seed_key(seed), dtype=torch.int64), shape, device)


def keyed_uniform(
    key: torch.Tensor, shape: torch.Size | tuple[int, ...], device: torch.device | str
) -> torch.Tensor:
    """:func:`counter_uniform` from a 32-bit key held in a tensor (any int dtype, 0-dim).

    ``u[i] = (fmix32((i * GOLDEN + key) mod 2^32) >> 8) * 2^-24``.
    """
    n = 1
    for s in shape:
        n *= int(s)
    k = key.to(device=device, dtype=torch.int64) & _MASK32
    idx = torch.arange(n, dtype=torch.int64, device=device)
    h = _fmix32((idx * GOLDEN + k) & _MASK32)
    return ((h >> 8).to(torch.float32) * 2.0**-24).reshape(shape)


def generator_keys(generator: torch.Generator | None, n: int = 2) -> torch.Tensor | None:
    """int32 [n] keys of the child generators of :func:`split_generator` (None for None).

    ``keyed_uniform(generator_keys(g)[i], ...)`` equals ``counter_uniform(draw_seed(
    split_generator(g)[i]), ...)``: the generator API and the key API draw the same bits.
    """
    if generator is None:
        return None
    keys = [as_int32(seed_key(draw_seed(child))) for child in split_generator(generator, n)]
    return torch.tensor(keys, dtype=torch.int32)


def _mix(h: torch.Tensor, v: torch.Tensor | int) -> torch.Tensor:
    return _fmix32((h * GOLDEN + v) & _MASK32)


def derive_keys(state: torch.Tensor, rank: int | torch.Tensor, n: int = 2) -> torch.Tensor:
    """int32 [n] keys of a layer's ``state = [seed, step]`` (int64) on data-parallel ``rank``.

    ``rank`` may also be an int64 tensor of stream numbers [S] (e.g. one per MoE expert and
    GEMM): the keys come back as [S, n], row ``s`` equal to ``derive_keys(state, rank[s], n)``.

    ``h = mix(mix(mix(fmix32(seed_hi), seed_lo), step_lo), rank)``, ``key_i = mix(h, i + 1)``
    with ``mix(h, v) = fmix32((h * GOLDEN + v) mod 2^32)``, all on 32-bit words. Ranks draw
    independent streams; the Triton kernel
    :func:`hf_nvfp4.kernels.sr_keys.advance_keys_triton` computes the same words.
    """
    seed, step = state[0], state[1]
    h = _fmix32((seed >> 32) & _MASK32)
    h = _mix(h, seed & _MASK32)
    h = _mix(h, step & _MASK32)
    h = _mix(h, rank & _MASK32)
    keys = torch.stack([_mix(h, i + 1) for i in range(n)], dim=-1)
    return torch.where(keys >= 2**31, keys - 2**32, keys).to(torch.int32)


def split_generator(
    generator: torch.Generator | None, n: int = 2
) -> tuple[torch.Generator | None, ...]:
    """``n`` CPU generators, each seeded by one draw from ``generator`` (None gives Nones).

    A fused op that quantizes several copies hands one child to each, so every copy's
    stream is fixed whether or not the other copies are requested or rounded stochastically.
    """
    if generator is None:
        return (None,) * n
    return tuple(torch.Generator().manual_seed(draw_seed(generator)) for _ in range(n))
