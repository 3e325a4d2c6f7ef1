"""NVFP4 pretraining on 1 and 2 GPUs through ``accelerate launch`` (DDP and FSDP2).

Runs examples/pretrain.py with the same global batch under integrations/accelerate's
single_gpu, ddp and fsdp2 configs, with stochastic rounding on (the paper's recipe) and off,
plus an FSDP2 save/resume check and FSDP2 with the 4-bit weight all-gather, and writes one
JSON with loss curves, throughput and the comparisons. Usage (on a 2-GPU machine):

    NCCL_NVLS_ENABLE=0 python bench/multi_gpu.py --out bench/results/multi_gpu.json

Scaling (weak, 1 to 8 GPUs; DDP/FSDP2, BF16/NVFP4, FSDP2 with the 4-bit all-gather):

    NCCL_NVLS_ENABLE=0 python bench/multi_gpu.py --scaling 1,2,4,8 \\
        --model-args "--hidden 2048 --layers 16 --seq 2048" --out bench/results/scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "integrations" / "accelerate"
RECIPES = {
    "sr": CONFIGS / "nvfp4_recipe.yaml",
    "sr_gather4": CONFIGS / "nvfp4_fsdp2_recipe.yaml",  # FSDP2 all-gathers 4-bit codes
    "no_sr": ROOT / "bench" / "recipes" / "nvfp4_no_sr.yaml",
    "no_sr_reduced": ROOT / "bench" / "recipes" / "nvfp4_no_sr_reduce_amax.yaml",
    "bf16": None,  # no conversion: the control for GPU summation-order effects
}


def launch(config: str, recipe: str, per_device_batch: int, out: Path, extra: list[str],
           common: list[str], num_processes: int | None = None) -> dict:
    """One ``accelerate launch`` run (on ``num_processes`` GPUs when given, else the
    config's); returns its metrics.json (or the error)."""
    env = {**os.environ, "HF_NVFP4_RECIPE": str(RECIPES[recipe] or "false"),
           "NCCL_NVLS_ENABLE": "0", "PYTHONPATH": str(ROOT)}
    procs = [] if num_processes is None else ["--num_processes", str(num_processes)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(CONFIGS / f"{config}.yaml"), *procs, str(ROOT / "examples" / "pretrain.py"),
           "--batch", str(per_device_batch), "--out", str(out), *common, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    result = {"config": config, "recipe": recipe, "cmd": " ".join(cmd[1:]),
              "wall_s": time.perf_counter() - t0, "returncode": proc.returncode}
    if proc.returncode == 0:
        result.update(json.loads((out / "metrics.json").read_text()))
    else:
        result["error"] = proc.stderr[-3000:]
    print(f"{config:>10} {recipe:>5} rc={proc.returncode} "
          f"final={result.get('losses', [float('nan')])[-1]:.4f} "
          f"tok/s={result.get('tokens_per_s', 0):,.0f}", flush=True)
    return result


def max_rel_diff(a: list[float], b: list[float]) -> float:
    """Largest relative difference between two loss curves."""
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def main() -> None:
    """Run all configurations and write the summary JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--scaling", default=None,
                   help="comma-separated GPU counts, e.g. 1,2,4,8: weak-scaling runs (the "
                        "per-GPU batch of --global-batch / 2) of DDP and FSDP2, BF16 and NVFP4, "
                        "and FSDP2 with the 4-bit all-gather, named scale<N>_<config>_<recipe>")
    p.add_argument("--model-args", default="--hidden 512 --layers 4 --seq 256",
                   help="examples/pretrain.py model arguments")
    p.add_argument("--runs", default=None,
                   help="comma-separated subset of run names (default: all); runs of an "
                        "existing --out file are kept and the comparisons recomputed")
    args = p.parse_args()
    common = ["--steps", str(args.steps), *args.model_args.split()]
    tmp = Path(tempfile.mkdtemp())
    gb, half = args.global_batch, args.steps // 2
    specs = {f"{kind}_{recipe}": (config, recipe, batch, [])
             for recipe in RECIPES
             for kind, config, batch in (("single", "single_gpu", gb), ("ddp", "ddp", gb // 2),
                                         ("fsdp2", "fsdp2", gb // 2))}
    specs = {k: v for k, v in specs.items() if k == "fsdp2_sr_gather4" or "gather4" not in k}
    specs["single_no_sr_reduced_repeat"] = specs["single_no_sr_reduced"]
    specs["fsdp2_first_half"] = ("fsdp2", "sr", gb // 2,
                                 ["--stop-at", str(half), "--save-state-at", str(half)])
    specs["fsdp2_resumed"] = ("fsdp2", "sr", gb // 2,
                              ["--resume-from", str(tmp / "fsdp2_first_half" / f"state-{half}")])
    gpus = [int(n) for n in args.scaling.split(",")] if args.scaling else []
    for n in gpus:
        for config, recipe in (("ddp", "bf16"), ("ddp", "sr"), ("fsdp2", "bf16"),
                               ("fsdp2", "sr"), ("fsdp2", "sr_gather4")):
            specs[f"scale{n}_{config}_{recipe}"] = (config, recipe, gb // 2, [], n)
    if args.runs is not None:
        names = args.runs.split(",")
    else:  # --scaling runs only the scaling runs
        names = [n for n in specs if n.startswith("scale") or not gpus]
    unknown = sorted(set(names) - set(specs))
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; expected names from {list(specs)}")
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    if previous and previous.get("steps") != args.steps:
        raise SystemExit(f"{out} holds {previous['steps']}-step runs; got --steps {args.steps}")
    runs = dict(previous.get("runs", {}))
    for name in names:
        config, recipe, batch, extra, *procs = specs[name]
        runs[name] = launch(config, recipe, batch, tmp / name, extra, common, *procs)
    resumed = runs.get("fsdp2_resumed", {})

    summary: dict = {"steps": args.steps, "global_batch": gb, "runs": runs, "comparisons": {}}
    for recipe in RECIPES:
        single = runs.get(f"single_{recipe}", {})
        for kind in ("ddp", "fsdp2"):
            multi = runs.get(f"{kind}_{recipe}", {})
            if "losses" in single and "losses" in multi:
                summary["comparisons"][f"{kind}_vs_single_{recipe}"] = {
                    "max_rel_loss_diff": max_rel_diff(multi["losses"], single["losses"]),
                    "final_loss_single": single["losses"][-1],
                    "final_loss_multi": multi["losses"][-1],
                    "exact": multi["losses"] == single["losses"],
                    "throughput_scaling": multi["tokens_per_s"] / single["tokens_per_s"],
                }
    single, repeat = runs.get("single_no_sr_reduced", {}), runs.get("single_no_sr_reduced_repeat",
                                                                      {})
    if "losses" in single and "losses" in repeat:
        summary["comparisons"]["single_vs_itself_no_sr_reduced"] = {
            "max_rel_loss_diff": max_rel_diff(repeat["losses"], single["losses"]),
            "exact": repeat["losses"] == single["losses"],
        }
    gather4, fsdp2 = runs.get("fsdp2_sr_gather4", {}), runs.get("fsdp2_sr", {})
    if "losses" in gather4 and "losses" in fsdp2:
        summary["comparisons"]["fsdp2_gather4_vs_fsdp2"] = {
            "exact": gather4["losses"] == fsdp2["losses"],
            "max_rel_loss_diff": max_rel_diff(gather4["losses"], fsdp2["losses"]),
            "tokens_per_s_ratio": gather4["tokens_per_s"] / fsdp2["tokens_per_s"],
        }
    for name, run in runs.items():
        one = runs.get("scale1_" + name.partition("_")[2], {})
        if name.startswith("scale") and "tokens_per_s" in run and "tokens_per_s" in one:
            n = int(name[len("scale"):].partition("_")[0])
            summary["comparisons"][f"{name}_efficiency"] = {
                "gpus": n, "tokens_per_s": run["tokens_per_s"],
                "scaling_efficiency": run["tokens_per_s"] / (n * one["tokens_per_s"]),
                "peak_memory_mb": run.get("peak_memory_mb"),
            }
    if "losses" in resumed and "losses" in runs.get("fsdp2_sr", {}):
        ref = runs["fsdp2_sr"]["losses"][half:]
        summary["comparisons"]["fsdp2_resume"] = {
            "exact": resumed["losses"] == ref,
            "max_rel_loss_diff": max_rel_diff(resumed["losses"], ref),
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["comparisons"], indent=2))


if __name__ == "__main__":
    main()
