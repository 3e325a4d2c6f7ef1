"""NVFP4 pretraining on 1 and 2 GPUs through ``accelerate launch`` (DDP and FSDP2).

Runs examples/pretrain.py with the same global batch under integrations/accelerate's
single_gpu, ddp and fsdp2 configs, with stochastic rounding on (the paper's recipe) and off,
plus an FSDP2 save/resume check, and writes one JSON with loss curves, throughput and the
comparisons. Usage (on a 2-GPU machine):

    NCCL_NVLS_ENABLE=0 python bench/multi_gpu.py --out bench/results/multi_gpu.json
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
    "no_sr": ROOT / "bench" / "recipes" / "nvfp4_no_sr.yaml",
    "no_sr_reduced": ROOT / "bench" / "recipes" / "nvfp4_no_sr_reduce_amax.yaml",
}


def launch(config: str, recipe: str, per_device_batch: int, out: Path, extra: list[str],
           common: list[str]) -> dict:
    """One ``accelerate launch`` run; returns its metrics.json (or the error)."""
    env = {**os.environ, "HF_NVFP4_RECIPE": str(RECIPES[recipe]), "NCCL_NVLS_ENABLE": "0",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(CONFIGS / f"{config}.yaml"), str(ROOT / "examples" / "pretrain.py"),
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
    args = p.parse_args()
    common = ["--steps", str(args.steps), "--hidden", "512", "--layers", "4", "--seq", "256"]
    tmp = Path(tempfile.mkdtemp())
    gb = args.global_batch
    runs = {}
    for recipe in ("sr", "no_sr"):
        runs[f"single_{recipe}"] = launch("single_gpu", recipe, gb, tmp / f"1_{recipe}", [], common)
        runs[f"ddp_{recipe}"] = launch("ddp", recipe, gb // 2, tmp / f"d_{recipe}", [], common)
    runs["fsdp2_sr"] = launch("fsdp2", "sr", gb // 2, tmp / "f_sr", [], common)
    runs["single_no_sr_reduced"] = launch("single_gpu", "no_sr_reduced", gb, tmp / "1_nsr",
                                          [], common)
    runs["ddp_no_sr_reduced"] = launch("ddp", "no_sr_reduced", gb // 2, tmp / "d_nsr", [],
                                       common)
    half = args.steps // 2
    first = launch("fsdp2", "sr", gb // 2, tmp / "f_half",
                   ["--stop-at", str(half), "--save-state-at", str(half)], common)
    resumed = launch("fsdp2", "sr", gb // 2, tmp / "f_resumed",
                     ["--resume-from", str(tmp / "f_half" / f"state-{half}")], common)
    runs["fsdp2_first_half"], runs["fsdp2_resumed"] = first, resumed

    summary: dict = {"steps": args.steps, "global_batch": gb, "runs": runs, "comparisons": {}}
    for recipe in ("sr", "no_sr", "no_sr_reduced"):
        single = runs[f"single_{recipe}"]
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
    if "losses" in resumed and "losses" in runs["fsdp2_sr"]:
        ref = runs["fsdp2_sr"]["losses"][half:]
        summary["comparisons"]["fsdp2_resume"] = {
            "exact": resumed["losses"] == ref,
            "max_rel_loss_diff": max_rel_diff(resumed["losses"], ref),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["comparisons"], indent=2))


if __name__ == "__main__":
    main()
