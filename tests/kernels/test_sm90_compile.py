"""Every Triton kernel compiles for sm_90 (H200), checked on a CPU without a GPU.

The rest of the suite runs the kernels in Triton's interpreter, which never runs the code
generator: a plain Python global read in jitted code, or a ``return`` inside a constexpr
``if``, passed there and failed only on the H200. Here :mod:`hf_nvfp4.kernels.aot` records
the launches the launchers make (every kernel, the tuning candidates, the flag combinations
and dtypes of the call sites; see :func:`~hf_nvfp4.kernels.aot.workload`) and compiles each
distinct variant for sm_90 with the ``ptxas`` Triton ships, in subprocesses: this process has
``TRITON_INTERPRET=1``, under which kernels cannot be compiled.

Fast: each kernel's main variant (its first launch in the workload: bf16 where the kernel
takes a float input, the launcher's default config). Slow: every other distinct variant.
Each tier is compiled once per session, split over the CPU cores (Triton's on-disk cache
makes later sessions faster). Registers, spills and shared memory are asserted only where
they are clean today and should stay so; the full table is printed with ``-s``. Spills are a
property of the compiler too: they are asserted under the Triton versions they were checked
with (:data:`SPILLS_CHECKED`) and reported under others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

from hf_nvfp4.kernels import aot  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# Triton versions whose sm_90 register allocation the no-spill assertions hold for: 3.6 (the
# H200's), 3.9 (CI's). Triton 3.8 (torch 2.14's) puts 16-56 bytes on the stack in the fix-up
# variants of the amax and MXFP4 kernels, which run only on rare flagged programs.
SPILLS_CHECKED = ("3.6.", "3.9.")
KERNELS = [f"{m}:{k}" for m in aot.KERNEL_MODULES for k in aot.launched_kernels(m)]


def _compile(tier: str) -> list[dict]:
    """``aot`` results for ``tier`` ("core" or "rest"), compiled in parallel subprocesses;
    skips the test when the CUDA toolchain cannot run here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    shards = min(4, os.cpu_count() or 1)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "hf_nvfp4.kernels.aot", "--tier", tier, "--shard",
         f"{i}/{shards}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) for i in range(shards)]
    outputs = [p.communicate(timeout=600) for p in procs]
    results = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"hf_nvfp4.kernels.aot failed:\n{err[-4000:]}"
        report = json.loads(out.splitlines()[-1])
        if "skip" in report:
            pytest.skip(report["skip"])
        results += report["results"]
    return results


@pytest.fixture(scope="session")
def core_results() -> list[dict]:
    """Each kernel's main variant, compiled once per session."""
    return _compile("core")


@pytest.fixture(scope="session")
def rest_results() -> list[dict]:
    """The other variants, compiled once per session."""
    return _compile("rest")


def _describe(r: dict) -> str:
    return f"{r['kernel']} [{r['label']}] (launched by {r['call']!r})"


def _problems(r: dict, no_spills: bool) -> list[str]:
    """What is wrong with one result: a compile error; spills (stack frame or local memory:
    Triton inlines every helper, so that is spilled registers) where ``no_spills`` and the
    installed Triton is one of :data:`SPILLS_CHECKED`; more
    shared memory than an H200 block may have (that config could never launch)."""
    if not r["ok"]:
        return [f"{_describe(r)} does not compile for sm_90:\n{r['error']}"]
    out = []
    checked = triton.__version__.startswith(SPILLS_CHECKED)
    if no_spills and checked and r["stack_bytes"] + r["local_bytes"]:
        out.append(f"{_describe(r)} spills: {r['stack_bytes']} bytes of stack frame, "
                   f"{r['local_bytes']} of local memory per thread ({r['registers']} registers)")
    if r["shared_bytes"] > aot.H200_MAX_SHARED:
        out.append(f"{_describe(r)} needs {r['shared_bytes']} bytes of shared memory; an "
                   f"H200 block has at most {aot.H200_MAX_SHARED}")
    return out


def _table(results: list[dict]) -> str:
    rows = [f"{'regs':>4} {'spill':>5} {'smem':>6} {'cpu s':>5}  kernel [variant] <- call"]
    for r in sorted(results, key=lambda r: (r["kernel"], not r["main"], r["call"])):
        if r["ok"]:
            rows.append(f"{r['registers']:>4} {r['stack_bytes'] + r['local_bytes']:>5} "
                        f"{r['shared_bytes']:>6} {r['cpu_seconds']:>5.1f}  "
                        f"{r['kernel']} [{r['label']}] <- {r['call']}")
    return "\n".join(rows)


def test_every_kernel_module_is_scanned():
    """Each listed module launches a kernel the scan finds, and no unlisted one does."""
    empty = [m for m in aot.KERNEL_MODULES if not aot.launched_kernels(m)]
    assert not empty, f"no launched @triton.jit kernel found in {empty}"
    modules = {p.stem for p in (ROOT / "hf_nvfp4" / "kernels").glob("*.py")}
    unlisted = sorted(m for m in modules - set(aot.KERNEL_MODULES) if aot.launched_kernels(m))
    assert not unlisted, f"modules launching kernels, missing from aot.KERNEL_MODULES: {unlisted}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_main_variant_compiles_for_sm90(kernel, core_results, record_property):
    """Each kernel's first variant in the workload (bf16 where it takes a float input, the
    launcher's default config) compiles, without spills, in an H200's shared memory."""
    results = [r for r in core_results if r["kernel"] == kernel]
    assert results, f"{kernel} is launched by no call of aot.workload(): add its launcher's call"
    (r,) = results
    record_property("sm90", {k: r[k] for k in ("label", "registers", "stack_bytes",
                                               "local_bytes", "shared_bytes")})
    problems = _problems(r, no_spills=True)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_every_launched_variant_compiles_for_sm90(core_results, rest_results,
                                                   record_property):
    """Every other variant compiles and fits an H200's shared memory; none of the main
    calls' variants (bf16 training quantization and GEMMs, every tuning candidate) spills.
    The other variants' spills are reported, not asserted. Registers, spills and shared
    memory of every variant are printed (``-s``)."""
    results = core_results + rest_results
    table = _table(results)
    print(f"\nsm_90 resource usage, {len(results)} variants:\n{table}")
    record_property("sm90_resources", table)
    problems = [p for r in rest_results for p in _problems(r, no_spills=r["main"])]
    assert not problems, "\n\n".join(problems)
