"""Choosing a kernel variant per shape bucket by measurement, on the first call in that bucket."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

_CHOICES: dict[tuple, str] = {}  # timed picks
_FIXED: dict[tuple, str] = {}  # untimed picks (off CUDA, deterministic mode): never mixed
_TIMINGS: dict[tuple, dict[str, float | str]] = {}


def median_ms(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` CUDA-event-timed runs after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def shape_bucket(n: int) -> int:
    """``n`` rounded up to a power of two (at least 16): the sizes that share one tuning
    choice, so that variable token counts (dynamic padding, MoE experts) time the variants once
    per bucket instead of on every new length."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def pick(
    key: tuple, make_candidates: Callable[[], dict[str, Callable[[], object]]],
    device: torch.device, fixed: str | None = None,
) -> str:
    """The name of the fastest candidate for ``key`` (timed once on CUDA, then cached).

    ``make_candidates`` is called only on the first call for ``key``. A candidate that
    raises (e.g. too little shared memory for its tile) is recorded with its error and
    skipped.

    Off CUDA (the interpreter) and under ``torch.use_deterministic_algorithms(True)``
    nothing is timed: the choice is ``fixed`` when it is a candidate, else the first one, the
    same in every run, even for a shape timed before deterministic mode was turned on. Timed
    picks can differ between runs, and GEMM variants sum in different orders, so they make
    training runs differ in the last bits (the quantization variants are bit-identical
    either way).
    """
    if device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        if key not in _FIXED:
            candidates = make_candidates()
            _FIXED[key] = fixed if fixed in candidates else next(iter(candidates))
        return _FIXED[key]
    if key not in _CHOICES:
        candidates = make_candidates()
        timed: dict[str, float | str] = {}
        for name, fn in candidates.items():
            try:
                timed[name] = median_ms(fn, reps=9, warmup=2)
            except Exception as exc:  # noqa: BLE001 - any compile/launch failure skips it
                timed[name] = f"{type(exc).__name__}: {exc}"[:300]
        ok = {n: t for n, t in timed.items() if isinstance(t, float)}
        if not ok:
            raise RuntimeError(f"every kernel variant failed for {key}: {timed}")
        _TIMINGS[key] = timed
        _CHOICES[key] = min(ok, key=ok.get)
    return _CHOICES[key]


def choices() -> dict[str, dict]:
    """Every shape seen so far: the variant chosen and each candidate's ms (or error);
    untimed (fixed) choices are listed under their key with a ``:fixed`` suffix."""
    out = {}
    for cache, suffix in ((_CHOICES, ""), (_FIXED, ":fixed")):
        for key, name in cache.items():
            label = ":".join(str(p).removeprefix("torch.") for p in key[:-1]) + suffix
            out[label] = {"choice": name, "ms": _TIMINGS.get(key, {}) if not suffix else {}}
    return out
