"""MoE experts fwd+bwd: NVFP4 (``"hf_nvfp4"`` experts implementation) vs BF16 ``grouped_mm``.

A Qwen3-MoE-like experts module (default: 64 experts, top-8, hidden 2048, expert FFN 768,
8192 tokens, BF16 parameters) built from ``Qwen3MoeConfig``; random tokens and router
outputs (softmax weights over a random top-k). Both implementations run the same module and
inputs side by side in one process: warm-up, then CUDA-event timing of fwd+bwd.

    python bench/moe.py --out bench/results/moe_h200_grouped.json
    python bench/moe.py --device cpu --tokens 64 --experts 4 --hidden 64 --ffn 32 --reps 1
    python bench/moe.py --profile        # plus a torch.profiler table of one NVFP4 step
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_nvfp4.experts import convert_experts_module  # noqa: E402
from hf_nvfp4.recipe import PRESETS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv`` None: ``sys.argv``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path)
    p.add_argument("--profile", action="store_true",
                   help="print a torch.profiler table of one NVFP4 fwd+bwd step")
    return p.parse_args(argv)


def build(args: argparse.Namespace, implementation: str) -> torch.nn.Module:
    """The experts module (seed 0, BF16): transformers' ``grouped_mm``, or converted to NVFP4
    when ``implementation`` is ``"nvfp4"``."""
    cfg = Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.ffn,
                         num_experts=args.experts, num_experts_per_tok=args.top_k)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    module = Qwen3MoeExperts(cfg).to(device=args.device, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    if implementation == "nvfp4":
        convert_experts_module(module, PRESETS["nvfp4"], args.backend, sr_seed=0)
    return module.train()


def time_ms(fn, reps: int, warmup: int, device: torch.device) -> float:
    """Median ms of ``fn()`` (CUDA events on CUDA, wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def profile_table(fn, device: torch.device, rows: int = 30) -> str:
    """torch.profiler's table of one ``fn()`` (after warm-up), sorted by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv: list[str] | None = None) -> dict:
    """Run both implementations; print and (with ``--out``) write the JSON report."""
    args = parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(device, torch.bfloat16)
    logits = torch.randn(args.tokens, args.experts, generator=g)
    weights, idx = torch.softmax(logits, -1).topk(args.top_k, dim=-1)
    weights, idx = (weights / weights.sum(-1, keepdim=True)).to(device), idx.to(device)
    dy = torch.randn(args.tokens, args.hidden, generator=g).to(device, torch.bfloat16)
    report = {"args": {k: str(v) for k, v in vars(args).items()},
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "runs": {}}
    for name in ("grouped_mm", "nvfp4"):
        module = build(args, name)
        xi = x.clone().requires_grad_(True)

        def step(module=module, xi=xi) -> None:
            module(xi, idx, weights).backward(dy)

        ms = time_ms(step, args.reps, args.warmup, device)
        report["runs"][name] = {"fwd_bwd_ms": ms}
        print(f"{name}: {ms:.3f} ms fwd+bwd", flush=True)
        if args.profile and name == "nvfp4":
            print(profile_table(step, device), flush=True)
    base = report["runs"]["grouped_mm"]["fwd_bwd_ms"]
    report["nvfp4_vs_bf16"] = base / report["runs"]["nvfp4"]["fwd_bwd_ms"]
    print(f"NVFP4 speed vs BF16 grouped_mm: {report['nvfp4_vs_bf16']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
