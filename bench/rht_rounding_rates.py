"""How often the FP32 RHT butterfly is inexact or misrounded, per block and per program (CPU).

Issue 17 part 1 asks for a correctly rounded RHT output. The kernels sum the 16 products of a
16-token block in FP32 (a butterfly) and round to BF16; that double rounding differs from the
correctly rounded value only for blocks whose FP32 sum is inexact and lands near a BF16
midpoint. A kernel that fixes those blocks must first find them; the cost of finding them
depends on how often a test flags a block and, for a fix-up launch per program, how often a
program (64 tokens x 128 features = 512 blocks) holds a flagged block. This measures, for
BF16 inputs drawn from several distributions:

* ``wrong``: blocks where the butterfly's BF16 output differs from the correctly rounded one;
* ``inexact``: blocks where the FP32 butterfly sum differs from the exact sum;
* ``spread12``: blocks whose nonzero inputs span more than 12 binades (the cheap sufficient
  test for an exact FP32 sum of 16 BF16 products);
* ``interval``: blocks the kernels' interval butterfly flags (:func:`._common.rht16`: an
  output whose bounds, every sum rounded down and again up, round to different BF16 values);
* ``amax``: the amax pass's test on the FP32 maximum (the tensor cores' stand-in): a BF16
  midpoint within 2^-16 of it (per program only);
* the same as the fraction of programs holding at least one such block.

    python bench/rht_rounding_rates.py --blocks 2000000 --out bench/results/rht_rounding_rates.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_nvfp4.numerics.hadamard import TE_RHT_SIGN, rht_matrix  # noqa: E402

PROGRAM_BLOCKS = 512  # 16-token blocks in one 64 x 128 program of the row/column kernel


def butterfly_fp32(x: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """The kernels' FP32 sum: products ``x_i * d_i / 4`` (exact), then the 4-stage butterfly
    (stage s pairs ``i`` with ``i + 2^s`` as ``(a + b, a - b)``); x is [N, 16] BF16."""
    t = x.float() * (0.25 * sign)
    for s in range(4):
        u = torch.empty_like(t)
        for i in range(16):
            if (i >> s) % 2 == 0:
                u[:, i] = t[:, i] + t[:, i + (1 << s)]
            else:
                u[:, i] = t[:, i - (1 << s)] - t[:, i]
        t = u
    return t


def _add_directed(a: torch.Tensor, b: torch.Tensor, up: bool) -> torch.Tensor:
    """FP32 ``a + b`` rounded toward +inf (``up``) or -inf, from the nearest sum and its
    exact error (TwoSum), as the kernels' interpreter path does."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    bits = s.view(torch.int32)
    pos = torch.where(s > 0, 1, -1).int()
    step = torch.where(e > 0, pos, 0) if up else torch.where(e < 0, -pos, 0)
    return (bits + step).view(torch.float32)


def interval_flags(x: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Blocks the interval butterfly flags: lo and hi (every sum rounded down / up) of some
    output round to different BF16 values (lo after ``+ 0``)."""
    lo = x.float() * (0.25 * sign)
    hi = lo.clone()
    for s in range(4):
        nlo, nhi = torch.empty_like(lo), torch.empty_like(hi)
        for i in range(16):
            if (i >> s) % 2 == 0:
                j = i + (1 << s)
                nlo[:, i] = _add_directed(lo[:, i], lo[:, j], False)
                nhi[:, i] = _add_directed(hi[:, i], hi[:, j], True)
            else:
                j = i - (1 << s)
                nlo[:, i] = _add_directed(lo[:, j], -hi[:, i], False)
                nhi[:, i] = _add_directed(hi[:, j], -lo[:, i], True)
        lo, hi = nlo, nhi
    a = (lo + 0.0).to(torch.bfloat16).view(torch.int16)
    return (a != hi.to(torch.bfloat16).view(torch.int16)).any(1)


def rates(x: torch.Tensor) -> dict[str, float]:
    """The block and program rates of the module doc for BF16 blocks ``x`` [N, 16]."""
    sign = torch.tensor(TE_RHT_SIGN, dtype=torch.float32)
    exact = x.double() @ rht_matrix(TE_RHT_SIGN).double()  # exact: 16 products of BF16 inputs
    fly = butterfly_fp32(x, sign)
    right = exact.to(torch.bfloat16)  # one rounding of the exact sum
    wrong = (right.view(torch.int16) != fly.to(torch.bfloat16).view(torch.int16)).any(1)
    inexact = (fly.double() != exact).any(1)
    a = x.float().abs()
    nz = a > 0
    e = torch.floor(torch.log2(torch.where(nz, a, torch.ones_like(a))))
    spread = (torch.where(nz, e, torch.full_like(e, -1e9)).amax(1)
              - torch.where(nz, e, torch.full_like(e, 1e9)).amin(1))
    spread12 = nz.any(1) & (spread > 12)
    interval = interval_flags(x, sign)
    n = x.shape[0] // PROGRAM_BLOCKS * PROGRAM_BLOCKS
    out = {}
    for name, flag in (("wrong", wrong), ("inexact", inexact), ("spread12", spread12),
                       ("interval", interval)):
        out[f"{name}_blocks"] = flag.float().mean().item()
        per_program = flag[:n].view(-1, PROGRAM_BLOCKS).any(1)
        out[f"programs_with_{name}"] = per_program.float().mean().item()
    cmax = fly[:n].abs().reshape(-1, PROGRAM_BLOCKS * 16).amax(1)
    mid = ((cmax.view(torch.int32) & -65536) | 32768).view(torch.float32)
    out["programs_with_amax"] = ((cmax - mid).abs() < cmax * 2.0**-16).float().mean().item()
    return out


def inputs(blocks: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """BF16 blocks [blocks, 16] (16 tokens of one feature) from several distributions."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    t3 = randn(blocks, 16) / (randn(blocks, 16, 3).pow(2).mean(-1)).sqrt()  # Student t, 3 dof
    return {
        "gaussian": randn(blocks, 16),
        "student_t3": t3,
        "gaussian_scaled_per_block": randn(blocks, 16) * torch.exp(2 * randn(blocks, 1)),
        "relu_gaussian": torch.relu(randn(blocks, 16)),
        "swiglu_like": torch.nn.functional.silu(randn(blocks, 16)) * randn(blocks, 16),
    }


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=2_000_000)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    report = {"command": " ".join(["python", "bench/rht_rounding_rates.py", *sys.argv[1:]]),
              "program_blocks": PROGRAM_BLOCKS, "blocks": args.blocks, "rates": {}}
    print("| input | wrong blocks | inexact blocks | spread > 12 blocks | interval-flagged "
          "blocks | programs with wrong | with inexact | with spread > 12 | interval-flagged "
          "| amax-flagged |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, x in inputs(args.blocks).items():
        r = rates(x.to(torch.bfloat16))
        report["rates"][name] = r
        print(f"| {name} | {r['wrong_blocks']:.2g} | {r['inexact_blocks']:.2g} | "
              f"{r['spread12_blocks']:.2g} | {r['interval_blocks']:.2g} | "
              f"{r['programs_with_wrong']:.2g} | {r['programs_with_inexact']:.2g} | "
              f"{r['programs_with_spread12']:.2g} | {r['programs_with_interval']:.2g} | "
              f"{r['programs_with_amax']:.2g} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
