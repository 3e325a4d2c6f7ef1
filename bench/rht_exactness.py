"""The RHT column copies on the GPU at many shapes (issue 17): Triton vs the reference, the
reference on the GPU vs on the CPU, and the quantize timings.

For each shape ``x`` [M, K] (the RHT runs over M, as in the column copy ``x^T``), RHT sign
vector (Transformer Engine's, or all +1) and input distribution (``randn``; ``wide``: randn
times 2^U(-40, 40), blocks spanning more binades than an FP32 sum of 16 terms holds
exactly), this compares on one CUDA device:

* the NVFP4 x^T (RTN + RHT) and dy^T (SR + RHT) copies and the MXFP4 x^T copy of
  ``TritonBackend`` with ``ReferenceBackend`` (codes, scales, global scale: byte counts);
* ``numerics.hadamard_transform`` of x^T on the GPU with the same on the CPU (bits).

It also measures the tensor cores' error on the RHT, which the amax pass's midpoint test
assumes below 2^-18 of a block's sum of |products| (``hf_nvfp4/kernels/amax.py``): the
largest ``|tl.dot(RHT, x) - exact| / sum|products|`` over every block, in log2.

Then it times the quantizers as ``bench/kernel_speed.py`` does (fraction of copy bandwidth).
The 2026-12-03 run of a correctly rounded RHT (commit f1c28e8, reverted) is in
``bench/results/rht_exactness_h200_correctly_rounded.json``.

    python bench/rht_exactness.py --out bench/results/rht_exactness_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_speed import (  # noqa: E402
    MX,
    QUANT_SHAPES,
    SPECS,
    _compare,
    _mx_quantize_rows,
    _quantize_rows,
    bench_copy,
)

from hf_nvfp4.backends.reference import ReferenceBackend  # noqa: E402
from hf_nvfp4.backends.triton_backend import TritonBackend  # noqa: E402
from hf_nvfp4.kernels._common import rht_blockdiag  # noqa: E402
from hf_nvfp4.numerics.hadamard import TE_RHT_SIGN, hadamard_transform, rht_matrix  # noqa: E402
from hf_nvfp4.recipe import Recipe  # noqa: E402

SHAPES = ((128, 128), (256, 272), (1024, 1024), (2048, 5120), (4096, 3072), (8192, 512),
          (8192, 11328), (16384, 4096))
ONES = Recipe(rht_sign=(1,) * 16).role_specs()
MX_ONES = Recipe("mxfp4", "mxfp4", "mxfp4", rht_sign=(1,) * 16).role_specs()


def make(m: int, k: int, dist: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g)
    if dist == "wide":
        x = x * torch.exp2(torch.randint(-40, 41, (m, k), device="cuda", generator=g).float())
    return x.to(torch.bfloat16)


@triton.jit
def _tc_rht(x_ptr, bd_ptr, y_ptr, K, BK: tl.constexpr):
    """``blockdiag(RHT^T) @ x`` of one [64, BK] tile on the tensor cores (FP32 result), as
    the amax pass computes it."""
    rows = tl.program_id(0) * 64 + tl.arange(0, 64)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    offs = tl.arange(0, 64)
    bd = tl.load(bd_ptr + offs[:, None] * 64 + offs[None, :])
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :])
    tl.store(y_ptr + rows[:, None] * K + cols[None, :], tl.dot(bd, x))


def tc_error(x: torch.Tensor) -> float:
    """log2 of the largest tensor-core RHT error over the sum of |products| of its block
    (x [M, K] BF16, M a multiple of 64, K of 64; the RHT runs over M)."""
    m, k = x.shape
    bd = rht_blockdiag(TE_RHT_SIGN, 64, torch.bfloat16, x.device)
    y = torch.empty(m, k, device=x.device, dtype=torch.float32)
    _tc_rht[(m // 64, k // 64)](x, bd, y, k, BK=64)
    chunks = x.t().double().reshape(k, m // 16, 16)
    exact = (chunks @ rht_matrix(TE_RHT_SIGN).double().to(x.device)).reshape(k, m).t()
    total = (chunks.abs().sum(-1) / 4).repeat_interleave(16, dim=1).t()
    ratio = ((y.double() - exact).abs() / total.clamp_min(1e-300)).max().item()
    return float(torch.tensor(ratio).log2()) if ratio > 0 else float("-inf")


def bits_differ(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.reshape(-1).view(torch.int16) != b.reshape(-1).view(torch.int16)).sum())


def check_case(tri, ref, m: int, k: int, sign: str, dist: str, cpu_limit: int) -> list[dict]:
    specs, mx = (SPECS, MX) if sign == "te" else (ONES, MX_ONES)
    x = make(m, k, dist, seed=m * 7 + k)
    tag = {"shape": [m, k], "sign": sign, "dist": dist}
    out = []
    # both copies, as training quantizes (the kernel variants the timing below runs too)
    for name, roles, fmt_specs, gen_seed in (("nvfp4 x_t rtn", ("x", "x_t"), specs, None),
                                             ("nvfp4 dy_t sr", ("dy", "dy_t"), specs, 5),
                                             ("mxfp4 x_t rtn", ("x", "x_t"), mx, None)):
        row, col = (getattr(fmt_specs, r) for r in roles)
        gens = [torch.Generator().manual_seed(gen_seed) if gen_seed else None for _ in range(2)]
        got = tri.quantize_rowcol(x, row, col, gens[0])[1]
        want = ref.quantize_rowcol(x, row, col, gens[1])[1]
        out.append({**tag, **_compare(name, got, want)})
    if m * k <= cpu_limit:
        xt = x.t().contiguous()
        on_gpu = hadamard_transform(xt, specs.x_t.rht_sign)
        on_cpu = hadamard_transform(xt.cpu(), specs.x_t.rht_sign)
        out.append({**tag, "tensor": "hadamard_transform gpu vs cpu",
                    "bits_mismatch": bits_differ(on_gpu.cpu(), on_cpu), "elements": xt.numel()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cpu-limit", type=int, default=40_000_000,
                    help="largest M*K also transformed on the CPU")
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    tri, ref = TritonBackend(), ReferenceBackend()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "results": []}
    # untimed kernel variants while checking (each compiles once, not every tuning candidate)
    torch.use_deterministic_algorithms(True, warn_only=True)
    for m, k in SHAPES:
        for sign in ("te", "ones"):
            for dist in ("randn", "wide"):
                rows = check_case(tri, ref, m, k, sign, dist, args.cpu_limit)
                report["results"].extend(rows)
                bad = [r for r in rows if r.get("codes_mismatch", 0) or r.get("scales_mismatch", 0)
                       or not r.get("global_equal", True) or r.get("bits_mismatch", 0)]
                print(f"{m}x{k} sign={sign} {dist}: {'MISMATCH ' + str(bad) if bad else 'exact'}",
                      flush=True)
    report["bit_exact"] = all(
        r.get("codes_mismatch", 0) == 0 and r.get("scales_mismatch", 0) == 0
        and r.get("global_equal", True) and r.get("bits_mismatch", 0) == 0
        for r in report["results"])
    report["values_compared"] = sum(r["elements"] for r in report["results"])
    print(f"bit exact: {report['bit_exact']} over {report['values_compared']:.3e} values")
    report["tensor_core_rht_error_log2"] = {}
    for dist in ("randn", "wide"):
        worst = max(tc_error(make(8192, 4096, dist, seed=s)) for s in range(4))
        report["tensor_core_rht_error_log2"][dist] = worst
        print(f"tensor-core RHT error, {dist}: 2^{worst:.2f} of the block's sum of |products| "
              "(the amax pass assumes < 2^-18)", flush=True)
    torch.use_deterministic_algorithms(False)
    if not args.no_timing:
        copy = bench_copy()
        report["copy"] = copy
        report["quantize"] = [r for m, k in QUANT_SHAPES
                              for r in (*_quantize_rows(tri, copy, m, k),
                                        *_mx_quantize_rows(tri, copy, m, k))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
