"""Compile the kernels' launch variants for a GPU target on a machine without a GPU.

Triton's interpreter (``TRITON_INTERPRET=1``, how the tests run the kernels on a CPU) executes
kernel bodies as Python and never runs Triton's code generator, so code only the compiler
rejects (a plain Python global read in jitted code, a ``return`` inside a constexpr ``if``
followed by another of a different type) passes there and fails on the GPU. Compiling for a
target needs no device, only Triton's CUDA backend and the ``ptxas`` it ships:

1. :func:`record_launches` runs launcher calls (:func:`workload`: those training and
   inference make) on meta tensors, nothing allocated, and records each kernel launch instead
   of running it, with every tuning candidate of the calls that ask for them;
2. :func:`variants` specializes the recorded arguments exactly as a launch does (argument
   types, constexprs, 16-divisibility, options) and keeps the distinct compilations;
3. :func:`compile_variant` compiles one for the target (sm_90 by default) and reads its
   registers and spill bytes with ``cuobjdump -res-usage``, its shared memory from Triton.

This needs a process where ``TRITON_INTERPRET`` is unset (under the interpreter ``triton.jit``
builds interpreted functions, which cannot be compiled): ``python -m hf_nvfp4.kernels.aot``
prints the results as JSON (see :func:`main`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import interpret_requested

#: The modules scanned for the ``@triton.jit`` kernels they launch.
KERNEL_MODULES = ("sr_keys", "amax", "quantize_rowcol", "quantize_2d", "dequantize", "gemm",
                  "adamw", "grouped", "quantize_fp8", "quantize_mxfp4")
H200_SMS = 132  # the persistent GEMM's grid and split-K candidates depend on the SM count
H200_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)


@dataclasses.dataclass(frozen=True)
class Call:
    """A launcher call: ``run()`` launches kernels (recorded by :func:`record_launches`)."""

    label: str
    run: Callable[[], object]
    every_candidate: bool = False  # every tuning candidate, else the default one (as off CUDA)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    kernel: str  # "module:function"
    call: Call  # the call that made it
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Variant:
    """One distinct compilation of a kernel: what Triton compiles at that launch."""

    kernel: str
    label: str  # constexprs, floating-point pointer types, options
    call: str  # the label of the first Call that launched it
    main: bool  # launched by a main call (one whose tuning candidates are all launched)
    fn: Any = dataclasses.field(repr=False)  # the JITFunction
    signature: dict[str, str] = dataclasses.field(repr=False)
    constexprs: dict = dataclasses.field(repr=False)
    attrs: dict = dataclasses.field(repr=False)
    options: dict = dataclasses.field(repr=False)

    @property
    def key(self) -> str:
        """Equal keys compile the same code."""
        return repr((self.kernel, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))


@dataclasses.dataclass
class Result:
    """The outcome of compiling one :class:`Variant` (JSON-serializable)."""

    kernel: str
    label: str
    call: str
    main: bool
    ok: bool
    cpu_seconds: float  # this process's and its children's (ptxas, cuobjdump)
    error: str = ""
    registers: int | None = None
    # per thread; Triton inlines every helper, so the stack frame holds register spills
    stack_bytes: int | None = None
    local_bytes: int | None = None
    shared_bytes: int | None = None  # dynamic shared memory the launch requests


def launched_kernels(module: str) -> list[str]:
    """The ``@triton.jit`` functions a kernel module defines and launches (``name[grid]`` in
    its source), found without importing it; jitted helpers are compiled within the kernels
    that call them."""
    tree = ast.parse((Path(__file__).parent / f"{module}.py").read_text())

    def is_jit(d: ast.expr) -> bool:
        d = d.func if isinstance(d, ast.Call) else d
        return isinstance(d, ast.Attribute) and d.attr == "jit" \
            and isinstance(d.value, ast.Name) and d.value.id == "triton"

    jitted = {n.name for n in tree.body
              if isinstance(n, ast.FunctionDef) and any(map(is_jit, n.decorator_list))}
    return sorted({n.value.id for n in ast.walk(tree) if isinstance(n, ast.Subscript)
                   and isinstance(n.value, ast.Name) and n.value.id in jitted})


def _module(name: str) -> Any:
    return importlib.import_module(f"{__package__}.{name}")


def record_launches(calls: list[Call]) -> list[Launch]:
    """Run ``calls`` with the kernels of :data:`KERNEL_MODULES` replaced by recorders (and
    tuning replaced by running the candidates), returning the launches in order.

    ``TRITON_INTERPRET`` must be unset (the launchers read it at each call), so the GEMM
    builds its CUDA configs; it sees an H200's SM count.
    """
    launches: list[Launch] = []
    current = calls[0] if calls else None  # the call running now

    class Recorder:
        def __init__(self, kernel: str) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: object) -> Callable[..., None]:
            return lambda *args, **kwargs: launches.append(
                Launch(self.kernel, current, args, kwargs))

    def pick(key: tuple, make_candidates: Callable[[], dict[str, Callable[[], object]]],
             device: torch.device, fixed: str | None = None) -> str:
        candidates = make_candidates()
        chosen = fixed if fixed in candidates else next(iter(candidates))
        for name, run in candidates.items():
            if current.every_candidate or name == chosen:
                run()
        return chosen

    patches: list[tuple[object, str, object]] = [(_module("gemm"), "_num_sms",
                                                  lambda index: H200_SMS)]
    for mod_name in KERNEL_MODULES:
        module = _module(mod_name)
        patches += [(module, k, Recorder(f"{mod_name}:{k}")) for k in launched_kernels(mod_name)]
        if hasattr(module, "pick"):
            patches.append((module, "pick", pick))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        for current in calls:
            current.run()
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    return launches


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def workload() -> list[Call]:
    """The launcher calls of training and inference, on meta tensors, main ones first.

    The flag combinations are read off the call sites by hand, so keep them in step:
    ``nn/functional.py`` through ``backends/triton_backend.py`` (activations forward with BF16
    row values, gradients backward with both copies as values, each copy absent when its GEMM
    is not needed; RHT and stochastic rounding per recipe), ``quantize_weight`` (training: W
    as BF16 values, W^T packed; FSDP2's shards: both packed; 1x16 through the row/column
    kernel, 16x16 through ``quantize_2d``), ``nn/packed.py`` (inference: packed row copy),
    ``quant/sr.py`` (keys), ``optim/adamw.py`` (fused step; its parity argument is
    specialized when 1) and the ``fp8_block`` recipe (both copies of activations and
    gradients, a copy alone when the other GEMM is not needed, 128x128 weights) and the
    ``mxfp4`` recipe (as NVFP4 but always packed: RHT and SR per recipe, 32x32 weights through
    ``quantize_2d``, 1x32 weights through the row/column kernel). Activations
    and gradients are BF16, then FP16 and FP32 once each; weights BF16 or FP32 (master
    weights). The main calls try every tuning candidate, the
    rest only the default one, to keep the compile count down. Sizes are multiples of 16, as
    in training (Triton specializes them as 16-divisible); the wgrad GEMM's long K makes
    split-K candidates.
    """
    from ..numerics.hadamard import TE_RHT_SIGN
    from ..quant.sr import N_KEYS
    from . import (
        adamw,
        dequantize,
        gemm,
        grouped,
        quantize_2d,
        quantize_fp8,
        quantize_mxfp4,
        quantize_rowcol,
        sr_keys,
    )

    tokens, hidden = 8192, 1024
    keys = _meta(2, dtype=torch.int32)

    def rowcol(label: str, dt: torch.dtype, row: bool, col: bool, rht: bool, sr: bool,
               values: tuple[bool, bool], every: bool = False) -> Call:
        sign = TE_RHT_SIGN if rht else None
        return Call(label, lambda: quantize_rowcol.quantize_rowcol_nvfp4(
            _meta(tokens, hidden, dtype=dt), row, col, sign, sr, sr, keys,
            row_values=values[0], col_values=values[1]), every)

    def scaled(label: str, m: int, n: int, k: int, out: torch.dtype, every: bool = False,
               pad: int = 0) -> Call:
        # pad: operand rows padded by `pad` elements, a row stride TMA cannot describe
        a, b = _meta(m, k + pad)[:, :k], _meta(n, k + pad)[:, :k]
        gs = _meta(dtype=torch.float32)
        return Call(label, lambda: gemm.gemm_scaled(a, b, gs, gs, out), every)

    def packed(rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        # (data, E4M3 scale, S_dec, rows) of a QTensor
        return (_meta(rows, k // 2, dtype=torch.uint8),
                _meta(rows, k // 16, dtype=torch.float8_e4m3fn), _meta(dtype=torch.float32),
                rows)

    def adam(label: str, beta1: float, square_tiles: bool, step: int) -> Call:
        n = hidden * hidden
        state = {f"{m}{s}": _meta(*shape, dtype=dt) for m in ("exp_avg", "exp_avg_sq")
                 for s, shape, dt in (("_data", (n // 2,), torch.uint8),
                                      ("_scale", (n // 16,), torch.float8_e4m3fn),
                                      ("_global_scale", (), torch.float32))}
        return Call(label, lambda: adamw.fused_adamw_nvfp4_(
            _meta(n, dtype=torch.float32), _meta(n, dtype=torch.float32), state,
            adamw.new_scratch(torch.device("meta")), lr=1e-3, beta1=beta1, beta2=0.999,
            eps=1e-8, weight_decay=0.1, step=step, m_seed=1, v_seed=2,
            square_tiles=square_tiles))

    experts, ffn = 8, 512
    layout = grouped.GroupLayout.build([tokens // experts] * experts, torch.device("meta"))
    g_keys = _meta(experts, 2, dtype=torch.int32)
    g_amax = _meta(experts, 2, dtype=torch.float32)

    def g_rowcol(label: str, row: bool, col: bool, sr: bool, col_values: bool) -> Call:
        # nn/grouped.py: x forward (packed column copy), dy backward (column values, SR)
        return Call(label, lambda: grouped.grouped_quantize_rowcol(
            _meta(tokens, hidden), layout, g_amax, g_keys, row=row, col=col,
            col_rht_sign=TE_RHT_SIGN, row_sr=sr, col_sr=sr, col_values=col_values))

    def g_gemm(label: str, wgrad: bool) -> Call:
        if wgrad:
            a, b = _meta(ffn * layout.rows16), _meta(hidden * layout.rows16)
            out = _meta(experts, ffn, hidden, dtype=torch.float32)
        else:
            a, b, out = _meta(tokens, hidden), _meta(experts, ffn, hidden), _meta(tokens, ffn)
        return Call(label, lambda: grouped.grouped_gemm(
            a, b, out, g_amax[:, 0], g_amax[:, 1], layout, wgrad=wgrad))

    def fp8(label: str, dt: torch.dtype, row: bool, col: bool, every: bool = False) -> Call:
        return Call(label, lambda: quantize_fp8.quantize_rowcol_fp8(
            _meta(tokens, hidden, dtype=dt), row, col), every)

    def fp8_weight(label: str, dt: torch.dtype) -> Call:
        return Call(label, lambda: quantize_fp8.quantize_2d_fp8(_meta(hidden, hidden, dtype=dt)))

    def mx(label: str, dt: torch.dtype, row: bool, col: bool, rht: bool, sr: bool,
           every: bool = False) -> Call:
        return Call(label, lambda: quantize_mxfp4.quantize_rowcol_mxfp4(
            _meta(tokens, hidden, dtype=dt), row, col, TE_RHT_SIGN if rht else None, sr, sr,
            keys), every)

    def mx_weight(label: str, dt: torch.dtype) -> Call:
        return Call(label, lambda: quantize_2d.quantize_2d_mxfp4(_meta(hidden, hidden, dtype=dt)))

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    return [
        rowcol("fwd x (rht)", bf16, True, True, True, False, (True, False), every=True),
        rowcol("bwd dy (rht, sr)", bf16, True, True, True, True, (True, True), every=True),
        scaled("fprop/dgrad gemm", tokens, 4 * hidden, hidden, bf16, every=True),
        scaled("wgrad gemm", hidden, hidden, tokens, fp32, every=True),
        Call("sr keys", lambda: sr_keys.advance_keys_triton(_meta(2, dtype=torch.int64), 0,
                                                            N_KEYS)),
        Call("dequantize", lambda: dequantize.dequantize_fp4(
            *packed(tokens, hidden)[:2], None, tokens, bf16)),
        Call("weight 16x16", lambda: quantize_2d.quantize_2d_nvfp4(_meta(hidden, hidden),
                                                                   values=True)),
        adam("adamw, odd step", 0.9, False, 1),
        adam("adamw, even step", 0.9, False, 2),
        fp8("fp8 x / dy", bf16, True, True, every=True),
        fp8("fp8 x, frozen weight", bf16, True, False, every=True),
        fp8_weight("fp8 weight 128x128", bf16),
        mx("mxfp4 x (rht)", bf16, True, True, True, False, every=True),
        mx("mxfp4 dy (rht, sr)", bf16, True, True, True, True, every=True),
        mx_weight("mxfp4 weight 32x32", bf16),
        rowcol("fwd x (no rht)", bf16, True, True, False, False, (True, False)),
        rowcol("fwd x, frozen weight", bf16, True, False, False, False, (True, False)),
        rowcol("bwd dy (rn)", bf16, True, True, True, False, (True, True)),
        rowcol("bwd dy, no wgrad", bf16, True, False, False, True, (True, True)),
        rowcol("bwd dy, no dgrad", bf16, False, True, True, True, (True, True)),
        rowcol("weight 1x16", fp32, True, True, False, False, (True, False)),
        rowcol("weight 1x16, FSDP2 shard (packed)", fp32, True, True, False, False,
               (False, False)),
        rowcol("inference x (packed)", bf16, True, False, False, False, (False, False)),
        rowcol("fwd x fp16", fp16, True, True, True, False, (True, False)),
        rowcol("fwd x fp32", fp32, True, True, True, False, (True, False)),
        Call("weight 16x16 fp32", lambda: quantize_2d.quantize_2d_nvfp4(
            _meta(hidden, hidden, dtype=fp32), values=True)),
        Call("weight 16x16, FSDP2 shard (packed)", lambda: quantize_2d.quantize_2d_nvfp4(
            _meta(hidden, hidden, dtype=fp32))),
        scaled("gemm fp16 out", tokens, hidden, hidden, fp16),
        scaled("gemm, N % 8 != 0 (no TMA store)", tokens, 1004, hidden, bf16),
        scaled("gemm, operands TMA cannot describe", tokens, hidden, hidden, bf16, pad=4),
        Call("fused gemm", lambda: gemm.gemm_nvfp4(packed(tokens, hidden),
                                                   packed(hidden, hidden), bf16, "fused")),
        adam("adamw square tiles", 0.9, True, 1),
        adam("adamw beta1 < 0.5", 0.3, False, 1),
        Call("moe amax", lambda: grouped.grouped_amax(_meta(tokens, hidden), layout, True,
                                                     True, TE_RHT_SIGN)),
        g_rowcol("moe fwd x", True, True, False, False),
        g_rowcol("moe bwd dy (sr)", True, True, True, True),
        Call("moe weights 16x16", lambda: grouped.grouped_quantize_weight(
            _meta(experts, ffn, hidden))),
        g_gemm("moe fprop/dgrad gemm", False),
        g_gemm("moe wgrad gemm", True),
        fp8("fp8 dy, no dgrad", bf16, False, True),
        fp8("fp8 x fp16", fp16, True, True),
        fp8("fp8 x fp32", fp32, True, True),
        fp8_weight("fp8 weight 128x128 fp32", fp32),
        mx("mxfp4 x, frozen weight", bf16, True, False, False, False),
        mx("mxfp4 dy, no wgrad", bf16, True, False, False, True),
        mx("mxfp4 dy, no dgrad", bf16, False, True, True, True),
        mx("mxfp4 x (no rht)", bf16, True, True, False, False),
        mx("mxfp4 weight 1x32", fp32, True, True, False, False),
        mx("mxfp4 x fp16", fp16, True, True, True, False),
        mx("mxfp4 x fp32", fp32, True, True, True, False),
        mx_weight("mxfp4 weight 32x32 fp32", fp32),
    ]


def variants(launches: list[Launch], arch: int = 90) -> list[Variant]:
    """The distinct compilations of ``launches`` for ``sm_<arch>``, in first-launch order,
    specialized as ``JITFunction.run`` specializes a launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    out: dict[str, Variant] = {}
    for launch in launches:
        mod_name, name = launch.kernel.split(":")
        fn = getattr(_module(mod_name), name)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*launch.args, **launch.kwargs)
        opts, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound,
                                                           specialization, options)
        consts = dict(zip(signature, (s[1] for s in specialization), strict=True))
        label = " ".join(
            [f"{p}={int(v) if isinstance(v, bool) else v}" for p, v in consts.items()
             if signature[p] == "constexpr" and p != "INTERPRET"]
            + [f"{p.removesuffix('_ptr')}:{t}" for p, t in signature.items()
               if t.startswith(("*fp", "*bf", "tensordesc"))]
            + [f"w{opts.num_warps}s{opts.num_stages}"])
        v = Variant(launch.kernel, label, launch.call.label, launch.call.every_candidate, fn,
                    signature, constexprs, attrs, dict(opts.__dict__))
        out.setdefault(v.key, v).main |= v.main
    return list(out.values())


def core(variants_: list[Variant]) -> list[Variant]:
    """The first variant of each kernel: its main configuration in the workload's order."""
    firsts: dict[str, Variant] = {}
    for v in variants_:
        firsts.setdefault(v.kernel, v)
    return list(firsts.values())


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


def toolchain_problem(arch: int = 90) -> str | None:
    """Why kernels cannot be compiled for ``sm_<arch>`` here, or None."""
    try:
        from triton.backends import backends
    except Exception as exc:  # a broken install raises anything at import
        return f"triton does not import: {type(exc).__name__}: {exc}"
    if "nvidia" not in backends:
        return "triton has no CUDA backend here"
    from triton.runtime import jit

    if not (hasattr(jit, "create_function_from_signature")
            and hasattr(jit.JITFunction, "_pack_args")):
        return "this triton lacks the launch-specialization internals used here (3.6 has them)"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        for tool in (get_ptxas(arch).path, _cuobjdump()):
            subprocess.run([tool, "--version"], check=True, capture_output=True, timeout=60)
    except Exception as exc:  # missing, or not executable on this platform
        return f"the CUDA tools shipped with triton do not run here: {exc}"
    return None


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL``, ... of the one function of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        out = subprocess.run([_cuobjdump(), "-res-usage", path], check=True,
                             capture_output=True, text=True, timeout=120).stdout
    line = re.search(r"REG:\d+.*", out)
    if line is None:
        raise RuntimeError(f"unexpected cuobjdump output: {out!r}")
    return {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", line.group(0))}


def _error_text(exc: BaseException) -> str:
    """``exc`` and its causes (Triton's compile errors point at the call site in the kernel,
    their causes at the failing line of the helper)."""
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__
    return "\ncaused by ".join(parts)


def compile_variant(v: Variant, arch: int = 90) -> Result:
    """Compile ``v`` for ``sm_<arch>``; a failure is returned with Triton's message."""
    import resource

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def cpu() -> float:
        return time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime

    start = cpu()
    try:
        k = triton.compile(ASTSource(v.fn, v.signature, v.constexprs, v.attrs),
                           target=GPUTarget("cuda", arch, 32), options=v.options)
        usage = resource_usage(k.asm["cubin"])
    except Exception as exc:  # every compile error is a result, whatever its type
        return Result(v.kernel, v.label, v.call, v.main, False, cpu() - start,
                      error=_error_text(exc))
    return Result(v.kernel, v.label, v.call, v.main, True, cpu() - start,
                  registers=usage["REG"], local_bytes=usage["LOCAL"],
                  stack_bytes=usage["STACK"], shared_bytes=k.metadata.shared)


def main(argv: list[str] | None = None) -> int:
    """Compile the workload's variants and print ``{"results": [Result as dict, ...]}`` as
    JSON, or ``{"skip": reason}`` when the toolchain cannot run here."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--tier", choices=("core", "rest", "all"), default="all",
                        help="core: each kernel's first variant; rest: the others")
    parser.add_argument("--shard", default="0/1", help="i/n: every n-th variant from the i-th")
    args = parser.parse_args(argv)
    if interpret_requested():
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    problem = toolchain_problem(args.arch)
    if problem is not None:
        print(json.dumps({"skip": problem}))
        return 0
    every = variants(record_launches(workload()), args.arch)
    first = core(every)
    firsts = {v.key for v in first}
    rest = [v for v in every if v.key not in firsts]
    todo = {"core": first, "rest": rest, "all": every}[args.tier]
    index, count = (int(p) for p in args.shard.split("/"))
    results = [dataclasses.asdict(compile_variant(v, args.arch)) for v in todo[index::count]]
    print(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
