"""Benchmark and large-size check of the Triton NVFP4 (FP8 block, MXFP4) kernels on one CUDA device.

    python bench/kernel_speed.py --out bench/results/kernels.json   # timings, markdown table
    python bench/kernel_speed.py --check                            # bit-exactness vs reference
    python bench/kernel_speed.py --linear-formats --out F.json      # linear per format

Timings use CUDA events after warmup, median of repeats. Throughputs are in bytes of the
input tensor per second, and the copy baseline is a ``clone`` of a 1 GiB tensor in the same
units (bytes copied per second); ``copy_rw_GBps`` counts its reads plus writes.

Two times per case: ``ms`` times the Python call as a user's eager loop runs it (the host
work of a call, ~20-70 us of allocations, tuning lookup and launches, is included whenever
it exceeds the kernels'); ``graph_ms`` replays the same call from a CUDA graph of
``GRAPH_CALLS`` calls, so it is GPU time alone, as the CUDA-graph training step of
``bench/e2e.py``'s compiled columns sees it. Stochastic rounding draws with fixed device keys
in the graphs (the same kernels; a new generator draw per call would be a host copy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import hf_nvfp4  # noqa: F401
except ImportError as exc:  # the package's HF integration needs transformers; kernels do not
    print(f"note: `import hf_nvfp4` failed ({exc}); loading its subpackages directly")
    _pkg = types.ModuleType("hf_nvfp4")
    _pkg.__path__ = [str(ROOT / "hf_nvfp4")]
    sys.modules["hf_nvfp4"] = _pkg

from hf_nvfp4.backends.base import as_keys  # noqa: E402
from hf_nvfp4.backends.reference import ReferenceBackend, reference_gemm  # noqa: E402
from hf_nvfp4.backends.triton_backend import TritonBackend  # noqa: E402
from hf_nvfp4.kernels._tuning import choices, median_ms  # noqa: E402
from hf_nvfp4.kernels.amax import amax_rowcol  # noqa: E402
from hf_nvfp4.recipe import Recipe  # noqa: E402

SPECS = Recipe().role_specs()
FP8 = Recipe("fp8_block", "fp8_block", "fp8_block", rht=False,
             stochastic_rounding=False).role_specs()
MX = Recipe("mxfp4", "mxfp4", "mxfp4").role_specs()
LINEAR_SHAPES = ((8192, 4096, 4096), (8192, 8192, 8192), (16384, 4096, 14336))
# the issue's two shapes, then the 124M and 953M models' activations (32K and 16K tokens)
QUANT_SHAPES = ((8192, 4096), (16384, 14336), (32768, 768), (16384, 2048))
BF16 = torch.bfloat16


def bench_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` CUDA-event-timed runs."""
    return median_ms(fn, reps=reps, warmup=warmup)


GRAPH_CALLS = 10


def graph_ms(fn, calls: int = GRAPH_CALLS) -> float | str:
    """Median milliseconds per call of ``fn()`` replayed from one CUDA graph of ``calls``
    calls (GPU time without host overhead), or the error that stopped the capture."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # tuning picks and lazy state before the capture
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        ms = bench_ms(graph.replay) / calls
        del graph
        return ms
    except Exception as exc:  # report instead of failing the whole benchmark
        torch.cuda.synchronize()
        return f"{type(exc).__name__}: {exc}"[:200]


def device_keys(seed: int = 0) -> torch.Tensor:
    """Fixed SR keys on the GPU for the CUDA-graph timings."""
    return as_keys(torch.Generator().manual_seed(seed), torch.device("cuda"))


def randn(*shape: int, dtype=BF16) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.float32).to(dtype)


def bench_copy() -> dict:
    x = torch.empty(2**29, dtype=torch.int16, device="cuda").random_()
    ms = bench_ms(lambda: x.clone(), reps=20)
    nbytes = x.numel() * 2
    return {"bytes": nbytes, "ms": ms, "copy_GBps": nbytes / ms / 1e6,
            "copy_rw_GBps": 2 * nbytes / ms / 1e6}


def bench_quantize(tri: TritonBackend, copy: dict) -> list[dict]:
    return [r for m, k in QUANT_SHAPES
            for r in (*_quantize_rows(tri, copy, m, k), *_fp8_quantize_rows(tri, copy, m, k),
                      *_mx_quantize_rows(tri, copy, m, k))]


def _fp8_quantize_rows(tri: TritonBackend, copy: dict, m: int, k: int) -> list[dict]:
    """fp8_block (the FP8 baseline): x's 1x128 row and column copies in one pass, and a
    weight's 128x128 tiles with its transpose; no amax pass (no global scale)."""
    x = randn(m, k)
    out_bytes = 2 * (x.numel() + x.numel() // 128 * 4)  # two E4M3 copies + FP32 scales
    return _one_pass_rows(x, copy, out_bytes, (
        ("fp8_block x: row + col", lambda rng: tri.quantize_rowcol(x, FP8.x, FP8.x_t)),
        ("fp8_block w: 128x128 + w^T", lambda rng: tri.quantize_weight(x, FP8.w))))


def _mx_quantize_rows(tri: TritonBackend, copy: dict, m: int, k: int) -> list[dict]:
    """mxfp4: x's 1x32 row and column (RHT) copies in one pass, nearest and stochastic, and
    a weight's 32x32 tiles with its transpose; no amax pass (no global scale)."""
    x = randn(m, k)
    out_bytes = 2 * (x.numel() // 2 + x.numel() // 32)  # two packed copies + UE8M0 scales
    return _one_pass_rows(x, copy, out_bytes, (
        ("mxfp4 x: rtn + rht", lambda rng: tri.quantize_rowcol(x, MX.x, MX.x_t)),
        ("mxfp4 dy: sr + rht", lambda rng: tri.quantize_rowcol(x, MX.dy, MX.dy_t, rng)),
        ("mxfp4 w: 32x32 + w^T", lambda rng: tri.quantize_weight(x, MX.w))))


def _one_pass_rows(x: torch.Tensor, copy: dict, out_bytes: int, cases) -> list[dict]:
    """Timing rows of quantizers that read ``x`` once (no amax pass): ``cases`` are
    ``(name, fn)``, ``fn(rng)`` one call (rng: a CPU generator eagerly, device keys in the
    CUDA graph); ``out_bytes`` is what each writes."""
    m, k = x.shape
    in_bytes = x.numel() * x.element_size()
    rows = []
    gen, keys = torch.Generator(), device_keys()
    for name, fn in cases:
        ms = bench_ms(lambda fn=fn: fn(gen))
        rows.append({
            "shape": [m, k], "role": name, "ms": ms, "amax_pass_ms": 0.0, "encode_pass_ms": ms,
            "input_GBps": in_bytes / ms / 1e6,
            "fraction_of_copy": in_bytes / ms / 1e6 / copy["copy_GBps"],
            "traffic_fraction_of_copy_rw": (in_bytes + out_bytes) / ms / 1e6
            / copy["copy_rw_GBps"],
            "graph_amax_pass_ms": 0.0,
        })
        _add_graph(rows[-1], lambda fn=fn: fn(keys), in_bytes, copy)
        print(f"quantize {m}x{k} {name}: {ms:.3f} ms ({rows[-1]['fraction_of_copy']:.2f} of "
              f"copy), GPU {_fmt(rows[-1]['graph_ms'])} ms", flush=True)
    return rows


def _add_graph(row: dict, fn, in_bytes: int, copy: dict) -> None:
    """``row``'s CUDA-graph time of ``fn`` and its input bytes per second over copy's."""
    row["graph_ms"] = graph_ms(fn)
    if isinstance(row["graph_ms"], float):
        row["graph_fraction_of_copy"] = in_bytes / row["graph_ms"] / 1e6 / copy["copy_GBps"]


def _fmt(v, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else "-"


def _quantize_rows(tri: TritonBackend, copy: dict, m: int, k: int) -> list[dict]:
    x = randn(m, k)
    gen = torch.Generator()
    in_bytes = x.numel() * x.element_size()
    out_bytes = 2 * (x.numel() // 2 + x.numel() // 16)
    amax = lambda: amax_rowcol(x, True, True, SPECS.x_t.rht_sign)
    amax_ms, graph_amax_ms = bench_ms(amax), graph_ms(amax)
    keys = device_keys()
    rows = []
    for name, row, col in (("x: rtn + rht", SPECS.x, SPECS.x_t),
                           ("dy: sr + rht", SPECS.dy, SPECS.dy_t)):
        ms = bench_ms(lambda row=row, col=col: tri.quantize_rowcol(x, row, col, gen))
        rows.append({
            "shape": [m, k], "role": name, "ms": ms, "amax_pass_ms": amax_ms,
            "encode_pass_ms": ms - amax_ms, "input_GBps": in_bytes / ms / 1e6,
            "fraction_of_copy": in_bytes / ms / 1e6 / copy["copy_GBps"],
            "traffic_fraction_of_copy_rw": (2 * in_bytes + out_bytes) / ms / 1e6
            / copy["copy_rw_GBps"],
            "graph_amax_pass_ms": graph_amax_ms,
        })
        _add_graph(rows[-1], lambda row=row, col=col: tri.quantize_rowcol(x, row, col, keys),
                   in_bytes, copy)
        print(f"quantize {m}x{k} {name}: {ms:.3f} ms ({rows[-1]['fraction_of_copy']:.2f} of "
              f"copy), GPU {_fmt(rows[-1]['graph_ms'])} ms (amax {_fmt(graph_amax_ms)})",
              flush=True)
    return rows


def nvfp4_step(backend, x, w, dy, gen, specs=SPECS):
    """A quantized linear's forward + backward through a backend (the NVFP4Linear
    composition, with its operand forms), NVFP4 unless ``specs`` says another format."""
    x_row, x_col = backend.quantize_rowcol(x, specs.x, specs.x_t, None, values=X_VALUES)
    w_q, w_t = backend.quantize_weight(w, specs.w)
    y = backend.gemm(x_row, w_q, BF16)  # forward: y = x_row @ W^T
    dy_row, dy_col = backend.quantize_rowcol(dy, specs.dy, specs.dy_t, gen, values=DY_VALUES)
    dx = backend.gemm(dy_row, w_t, BF16)  # dgrad: dx = dy_sr @ W
    dw = backend.gemm(dy_col, x_col, BF16)  # wgrad: dW = dy_col^T @ x_col
    return y, dx, dw, x_col, w_t


# Which copies the layer's quantizers ask as BF16 block values rather than packed codes
# (hf_nvfp4.nn.functional): the copies no saved tensor keeps (x's row copy, both of dy's).
X_VALUES, DY_VALUES = (True, False), (True, True)


def bf16_step(x, w, dy):
    return x @ w.t(), dy @ w, dy.t() @ x


def bench_linear(tri: TritonBackend, reference_shapes: int) -> list[dict]:
    return [_linear_row(tri, *shape, with_reference=i < reference_shapes)
            for i, shape in enumerate(LINEAR_SHAPES)]


def _graph_ratio(row: dict, bf16_fn, fn) -> None:
    """``row``'s CUDA-graph (GPU-only) times of the BF16 and the quantized step, side by side."""
    row["graph_bf16_ms"], row["graph_ms"] = graph_ms(bf16_fn), graph_ms(fn)
    if isinstance(row["graph_bf16_ms"], float) and isinstance(row["graph_ms"], float):
        row["graph_ratio"] = row["graph_ms"] / row["graph_bf16_ms"]


def _linear_row(tri: TritonBackend, m: int, k: int, n: int, with_reference: bool) -> dict:
    gen, keys = torch.Generator(), device_keys()
    x, w, dy = randn(m, k), randn(n, k), randn(m, n)
    row = {"shape": [m, k, n], "bf16_ms": bench_ms(lambda: bf16_step(x, w, dy))}
    row["triton_ms"] = bench_ms(lambda: nvfp4_step(tri, x, w, dy, gen))
    row["ratio"] = row["triton_ms"] / row["bf16_ms"]
    _graph_ratio(row, lambda: bf16_step(x, w, dy), lambda: nvfp4_step(tri, x, w, dy, keys))
    row["quantize_ms"] = bench_ms(lambda: (
        tri.quantize_rowcol(x, SPECS.x, SPECS.x_t, None, values=X_VALUES),
        tri.quantize_weight(w, SPECS.w),
        tri.quantize_rowcol(dy, SPECS.dy, SPECS.dy_t, gen, values=DY_VALUES)))
    row["gemm_ms"] = row["triton_ms"] - row["quantize_ms"]
    _, _, _, x_col, w_t = nvfp4_step(tri, x, w, dy, gen)
    row["saved_bytes_ratio"] = (x_col.nbytes() + w_t.nbytes()) / (x.numel() * 2 + w.numel() * 2)
    if with_reference:
        row["reference_ms"] = bench_ms(
            lambda: nvfp4_step(ReferenceBackend(), x, w, dy, gen), reps=3, warmup=1)
    row["nvfp4linear_ms"] = bench_module(m, k, n, x, dy)
    print(f"linear {m}x{k}x{n}: bf16 {row['bf16_ms']:.3f} ms, triton "
          f"{row['triton_ms']:.3f} ms ({row['ratio']:.2f}x); GPU {_fmt(row['graph_bf16_ms'])} "
          f"-> {_fmt(row['graph_ms'])} ms ({_fmt(row.get('graph_ratio'), 2)}x)", flush=True)
    return row


FORMATS = (("nvfp4", SPECS), ("fp8_block", FP8), ("mxfp4", MX))
# the three shapes, then the 953M model's MLP and attention projections (16K tokens)
# and the 124M model's (32K tokens)
FORMAT_SHAPES = (*LINEAR_SHAPES, (16384, 2048, 5632), (16384, 5632, 2048), (16384, 2048, 2048),
                 (32768, 768, 2048), (32768, 2048, 768), (32768, 768, 768))


def bench_linear_formats(tri: TritonBackend) -> list[dict]:
    """Per format and shape: linear fwd+bwd vs BF16, its quantization, and each GEMM (from
    operands quantized beforehand, in the layer's forms: a packed operand's time includes its
    dequantization) vs the BF16 GEMM of the same shape."""
    return [row for shape in FORMAT_SHAPES for row in _format_rows(tri, *shape)]


def _format_rows(tri: TritonBackend, m: int, k: int, n: int) -> list[dict]:
    x, w, dy = randn(m, k), randn(n, k), randn(m, n)
    bf16 = {"step": bench_ms(lambda: bf16_step(x, w, dy)),
            "fprop": bench_ms(lambda: x @ w.t()), "dgrad": bench_ms(lambda: dy @ w),
            "wgrad": bench_ms(lambda: dy.t() @ x)}
    return [_format_row(tri, fmt, specs, x, w, dy, bf16) for fmt, specs in FORMATS]


def _format_row(tri: TritonBackend, fmt: str, specs, x, w, dy, bf16: dict) -> dict:
    gen = torch.Generator()
    (m, k), n = x.shape, w.shape[0]
    x_row, x_col = tri.quantize_rowcol(x, specs.x, specs.x_t, None, values=X_VALUES)
    w_q, w_t = tri.quantize_weight(w, specs.w)
    dy_row, dy_col = tri.quantize_rowcol(dy, specs.dy, specs.dy_t, gen, values=DY_VALUES)
    row = {"format": fmt, "shape": [m, k, n], "bf16_ms": bf16["step"],
           "ms": bench_ms(lambda: nvfp4_step(tri, x, w, dy, gen, specs)),
           "quantize_ms": bench_ms(lambda: (
               tri.quantize_rowcol(x, specs.x, specs.x_t, None, values=X_VALUES),
               tri.quantize_weight(w, specs.w),
               tri.quantize_rowcol(dy, specs.dy, specs.dy_t, gen, values=DY_VALUES)))}
    row["ratio"] = row["ms"] / row["bf16_ms"]
    keys = device_keys()
    _graph_ratio(row, lambda: bf16_step(x, w, dy), lambda: nvfp4_step(tri, x, w, dy, keys, specs))
    for role, a, b in (("fprop", x_row, w_q), ("dgrad", dy_row, w_t), ("wgrad", dy_col, x_col)):
        row[f"{role}_ms"] = bench_ms(lambda a=a, b=b: tri.gemm(a, b, BF16))
        row[f"{role}_bf16_ms"] = bf16[role]
        row[f"{role}_ratio"] = row[f"{role}_ms"] / bf16[role]
    print(f"linear {fmt} {m}x{k}x{n}: {row['ms']:.3f} ms ({row['ratio']:.2f}x BF16; quantize "
          f"{row['quantize_ms']:.3f}, GEMMs " + ", ".join(
              f"{r} {row[r + '_ratio']:.2f}x" for r in ("fprop", "dgrad", "wgrad"))
          + f"); GPU {_fmt(row.get('graph_ratio'), 2)}x BF16", flush=True)
    return row


def markdown_formats(rows: list[dict]) -> str:
    """The per-format linear table (bench/README.md)."""
    lines = ["| format | linear fwd+bwd (M,K,N) | BF16 ms | ms | ratio (<= 1.15) | GPU BF16 ms "
             "| GPU ms | GPU ratio | quantize ms | fprop / BF16 | dgrad / BF16 | wgrad / BF16 "
             "(each <= 1.10) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['format']} | {tuple(r['shape'])} | {r['bf16_ms']:.3f} | "
                     f"{r['ms']:.3f} | {r['ratio']:.2f} | {_fmt(r.get('graph_bf16_ms'))} | "
                     f"{_fmt(r.get('graph_ms'))} | {_fmt(r.get('graph_ratio'), 2)} | "
                     f"{r['quantize_ms']:.3f} | {r['fprop_ratio']:.2f} | "
                     f"{r['dgrad_ratio']:.2f} | {r['wgrad_ratio']:.2f} |")
    return "\n".join(lines)


def bench_module(m: int, k: int, n: int, x: torch.Tensor, dy: torch.Tensor) -> float | str:
    """fwd+bwd of hf_nvfp4.nn.NVFP4Linear with the triton backend, when it exists."""
    try:
        from hf_nvfp4.nn.linear import NVFP4Linear

        layer = NVFP4Linear(k, n, recipe="nvfp4", backend="triton").to("cuda", BF16)
        xr = x.detach().requires_grad_()

        def step():
            layer(xr).backward(dy)

        return bench_ms(step, reps=10)
    except Exception as exc:  # report instead of failing the whole benchmark
        return f"skipped: {type(exc).__name__}: {exc}"[:200]


def _fp_quant_nvfp4():
    """fp-quant's NVFP4 forward pseudo-quantization kernel (``nvfp4_forward_kernel_wrapper``).

    Loaded from its file when ``import fp_quant`` fails only for the package's other needs
    (its ``__init__`` imports scipy for Hadamard matrices; the kernel needs torch + Triton).
    """
    try:
        from fp_quant.module.triton.nvfp4 import nvfp4_forward_kernel_wrapper
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("fp_quant")
        if spec is None:
            raise
        path = Path(spec.submodule_search_locations[0]) / "module" / "triton" / "nvfp4.py"
        mod_spec = importlib.util.spec_from_file_location("_fp_quant_nvfp4", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        nvfp4_forward_kernel_wrapper = module.nvfp4_forward_kernel_wrapper
    return nvfp4_forward_kernel_wrapper


def bench_others(m: int, k: int, n: int, copy: dict) -> dict:
    """Side by side at one shape, as modules: BF16 nn.Linear, NVFP4Linear (triton) and
    torchao's float8 training linear (fwd+bwd); forward only: BF16, NVFP4Linear and fp-quant's
    NVFP4 pseudo-quantization (x and W through its Triton kernel, then a BF16 matmul)."""
    from hf_nvfp4.numerics.hadamard import rht_matrix

    x, dy = randn(m, k), randn(m, n)
    xr = x.detach().requires_grad_()
    out: dict = {"shape": [m, k, n]}
    base = torch.nn.Linear(k, n, bias=False).to("cuda", BF16)
    out["bf16_module_ms"] = bench_ms(lambda: base(xr).backward(dy), reps=10)
    with torch.no_grad():
        out["bf16_fwd_ms"] = bench_ms(lambda: base(x), reps=10)
    try:
        from hf_nvfp4.nn.linear import NVFP4Linear

        layer = NVFP4Linear(k, n, recipe="nvfp4", backend="triton").to("cuda", BF16)
        out["nvfp4linear_ms"] = bench_ms(lambda: layer(xr).backward(dy), reps=10)
        with torch.no_grad():
            out["nvfp4linear_fwd_ms"] = bench_ms(lambda: layer(x), reps=10)
    except Exception as exc:  # report instead of failing the whole benchmark
        out["nvfp4linear_ms"] = f"skipped: {type(exc).__name__}: {exc}"[:200]
    try:
        from torchao.float8 import convert_to_float8_training

        lin = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).to("cuda", BF16)
        convert_to_float8_training(lin)
        out["torchao_float8_ms"] = bench_ms(lambda: lin(xr).backward(dy), reps=10)
        out["torchao_version"] = __import__("torchao").__version__
    except Exception as exc:
        out["torchao_float8_ms"] = f"skipped: {type(exc).__name__}: {exc}"[:200]
    try:
        pseudo = _fp_quant_nvfp4()
        had = rht_matrix([1] * 16).to("cuda", BF16).contiguous()  # H16 / 4: no random signs
        gs = torch.ones(1, device="cuda", dtype=torch.float32)
        w = base.weight.detach()
        out["fp_quant_quantize_x_ms"] = bench_ms(lambda: pseudo(x, had, gs), reps=10)
        out["fp_quant_quantize_x_fraction_of_copy"] = (
            x.numel() * 2 / out["fp_quant_quantize_x_ms"] / 1e6 / copy["copy_GBps"])
        out["fp_quant_fwd_ms"] = bench_ms(lambda: pseudo(x, had, gs) @ pseudo(w, had, gs).t(),
                                          reps=10)
    except Exception as exc:
        out["fp_quant_fwd_ms"] = f"skipped: {type(exc).__name__}: {exc}"[:200]
    print(f"others {m}x{k}x{n}: " + ", ".join(
        f"{key}={v:.3f}" for key, v in out.items() if isinstance(v, float)), flush=True)
    return out


def _mismatch(a: torch.Tensor, b: torch.Tensor) -> int:
    if a.shape != b.shape:
        return -1
    return int((a.reshape(-1).view(torch.uint8) != b.reshape(-1).view(torch.uint8)).sum())


def _global_equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(torch.equal(a.reshape(()), b.reshape(())))


def _compare(name: str, got, want) -> dict:
    return {
        "tensor": name,
        "codes_mismatch": _mismatch(got.data, want.data),
        "scales_mismatch": _mismatch(got.scale, want.scale),
        "global_equal": _global_equal(got.global_scale, want.global_scale),
        "meta_equal": (tuple(got.shape), got.dtype, got.tile, got.rht)
        == (tuple(want.shape), want.dtype, want.tile, want.rht),
        "elements": want.data.numel() * (2 if want.format.packed else 1),
    }


CHECK_CASES = ((8192, 4096, 4096, BF16), (8200, 3072, 1040, BF16),
               (4100, 2048, 2064, torch.float32))


def check(cases=CHECK_CASES) -> dict:
    """TritonBackend vs ReferenceBackend at large sizes on the GPU (M=8200, 4100: ragged)."""
    tri, ref = TritonBackend(), ReferenceBackend()
    results = []
    for m, k, n, dtype in cases:
        x, w, dy = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype), randn(m, n, dtype=dtype)
        x[:16, :64] = 0  # zero blocks
        tag = f"{m}x{k}x{n}:{str(dtype).removeprefix('torch.')}"
        got_x = tri.quantize_rowcol(x, SPECS.x, SPECS.x_t, None)
        want_x = ref.quantize_rowcol(x, SPECS.x, SPECS.x_t, None)
        got_w, want_w = tri.quantize_weight(w, SPECS.w), ref.quantize_weight(w, SPECS.w)
        got_dy = tri.quantize_rowcol(dy, SPECS.dy, SPECS.dy_t, torch.Generator().manual_seed(1))
        want_dy = ref.quantize_rowcol(dy, SPECS.dy, SPECS.dy_t, torch.Generator().manual_seed(1))
        names = ("x", "x_t", "w", "w_t", "dy", "dy_t")
        for name, g, r in zip(names, (*got_x, *got_w, *got_dy), (*want_x, *want_w, *want_dy),
                              strict=True):
            results.append({"case": tag, **_compare(name, g, r)})
        for role, a, b in (("fprop", want_x[0], want_w[0]), ("dgrad", want_dy[0], want_w[1]),
                           ("wgrad", want_dy[1], want_x[1])):
            want = reference_gemm(a, b, torch.float32)
            got = tri.gemm(a, b, torch.float32)
            err = float((got - want).abs().max() / want.abs().max())
            results.append({"case": tag, "gemm": role, "max_rel_err": err})
        # fp8_block: the FP8 kernels (1x128 row + column copies, 128x128 weight tiles);
        # mxfp4: the MXFP4 kernels (1x32 row + RHT column copies, SR on dy, 32x32 tiles)
        for fmt, specs in (("fp8_block", FP8), ("mxfp4", MX)):
            gens = [torch.Generator().manual_seed(2) for _ in range(2)]
            got = (*tri.quantize_rowcol(x, specs.x, specs.x_t), *tri.quantize_weight(w, specs.w),
                   *tri.quantize_rowcol(dy, specs.dy, specs.dy_t, gens[0]))
            want = (*ref.quantize_rowcol(x, specs.x, specs.x_t),
                    *ref.quantize_weight(w, specs.w),
                    *ref.quantize_rowcol(dy, specs.dy, specs.dy_t, gens[1]))
            for name, g, r in zip(names, got, want, strict=True):
                results.append({"case": tag, **_compare(f"{fmt} {name}", g, r)})
        print(f"check {tag} done", flush=True)
    exact = all(r.get("codes_mismatch", 0) == 0 and r.get("scales_mismatch", 0) == 0
                and r.get("global_equal", True) and r.get("meta_equal", True) for r in results)
    return {"bit_exact": exact, "results": results}


def markdown(report: dict) -> str:
    lines = [f"Device: {report['device']}; copy {report['copy']['copy_GBps']:.0f} GB/s "
             f"(bytes copied/s; {report['copy']['copy_rw_GBps']:.0f} GB/s read+write)", "",
             "| quantize (bf16) | ms | amax pass ms | of copy | GPU ms | GPU amax pass ms "
             "| GPU of copy (>= 0.65) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["quantize"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} {r['role']} | {r['ms']:.3f} | "
                     f"{r['amax_pass_ms']:.3f} | {r['fraction_of_copy']:.2f} | "
                     f"{_fmt(r.get('graph_ms'))} | {_fmt(r.get('graph_amax_pass_ms'))} | "
                     f"{_fmt(r.get('graph_fraction_of_copy'), 2)} |")
    if "linear" not in report:  # --quantize-only
        return "\n".join(lines)
    lines += ["", "| linear fwd+bwd (M,K,N) | BF16 ms | triton ms | ratio (<= 1.15) | "
              "GPU BF16 ms | GPU ms | GPU ratio | quantize ms | gemm ms | saved bytes / BF16 "
              "| reference ms | NVFP4Linear ms |", "|---" * 12 + "|"]
    for r in report["linear"]:
        ref = f"{r['reference_ms']:.1f}" if "reference_ms" in r else "-"
        mod = r["nvfp4linear_ms"]
        mod = f"{mod:.3f}" if isinstance(mod, float) else "skipped"
        lines.append(f"| {tuple(r['shape'])} | {r['bf16_ms']:.3f} | {r['triton_ms']:.3f} | "
                     f"{r['ratio']:.2f} | {_fmt(r.get('graph_bf16_ms'))} | "
                     f"{_fmt(r.get('graph_ms'))} | {_fmt(r.get('graph_ratio'), 2)} | "
                     f"{r['quantize_ms']:.3f} | {r['gemm_ms']:.3f} | "
                     f"{r['saved_bytes_ratio']:.3f} | {ref} | {mod} |")
    lines += ["", "| side by side (M,K,N) | BF16 module ms | NVFP4Linear ms | torchao float8 "
              "ms | BF16 fwd ms | NVFP4Linear fwd ms | fp-quant fwd ms |",
              "|---|---|---|---|---|---|---|"]

    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "skipped"

    for r in report.get("others", []):
        lines.append(f"| {tuple(r['shape'])} | " + " | ".join(cell(r.get(key)) for key in (
            "bf16_module_ms", "nvfp4linear_ms", "torchao_float8_ms", "bf16_fwd_ms",
            "nvfp4linear_fwd_ms", "fp_quant_fwd_ms")) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="bit-exactness vs the reference")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--reference-shapes", type=int, default=1,
                        help="how many linear shapes also time the reference backend")
    parser.add_argument("--linear-formats", action="store_true",
                        help="only the per-format linear table (NVFP4, FP8 block, MXFP4)")
    parser.add_argument("--quantize-only", action="store_true",
                        help="only the copy bandwidth and the quantize table (a minute)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_speed.py needs a CUDA device")
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "command": " ".join(["python", *sys.argv]),
    }
    torch.manual_seed(0)

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1, default=str))

    if args.check:
        report["check"] = check()
        save()
        print(json.dumps(report["check"]["results"], indent=None))
        print(f"bit exact: {report['check']['bit_exact']}")
        return
    tri = TritonBackend()
    if args.linear_formats:
        report["linear_formats"] = bench_linear_formats(tri)
        save()
        print(markdown_formats(report["linear_formats"]))
        return
    report["copy"] = bench_copy()
    report["quantize"] = bench_quantize(tri, report["copy"])
    save()
    if args.quantize_only:
        print(markdown(report))
        return
    report["linear"] = bench_linear(tri, args.reference_shapes)
    report["kernel_choices"] = choices()
    save()
    report["others"] = [bench_others(*shape, report["copy"]) for shape in LINEAR_SHAPES]
    save()
    print(markdown(report))
    print(json.dumps({"kernel_choices": report["kernel_choices"], "others": report["others"]}))


if __name__ == "__main__":
    main()
