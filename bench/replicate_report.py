"""Report of the replication runs: curves, relative gaps, a table, and the paper's predictions.

    python bench/replicate_report.py --runs eval/reports/replicate/runs \\
        --out eval/reports/replicate
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PREDICTIONS = (
    ("NVFP4 within ~1.5% of BF16", lambda g: g("nvfp4", "bf16") <= 1.5),
    ("MXFP4 worse than NVFP4", lambda g: g("mxfp4", "nvfp4") > 0),
    ("no stochastic rounding is worse", lambda g: g("nvfp4_no_sr", "nvfp4") > 0),
    ("no RHT is worse", lambda g: g("nvfp4_no_rht", "nvfp4") > 0),
    ("no 2D weights is worse", lambda g: g("nvfp4_no_2d", "nvfp4") > 0),
    ("all blocks in FP4 is the worst NVFP4 variant",
     lambda g: all(g("nvfp4_all_blocks", r) >= 0
                   for r in ("nvfp4", "nvfp4_no_sr", "nvfp4_no_rht", "nvfp4_no_2d"))),
    ("late switch closes most of the gap",
     lambda g: g("nvfp4_late_switch", "bf16") <= 0.5 * g("nvfp4", "bf16")),
)


def load_runs(folder: Path) -> dict[str, dict]:
    """Finished runs by name."""
    runs = {}
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        if r.get("done"):
            runs[r["run"]] = r
    return runs


def isolated_throughput(folder: Path, runs: dict[str, dict]) -> None:
    """Replace each run's tokens/s by its ``--probe-steps`` measurement (the run alone on the
    GPU) where one exists, and mark the run ``"throughput": "probe"``. Peak memory is the
    run's own (per process, unaffected by runs sharing the GPU)."""
    for name, r in runs.items():
        path = folder / "probe" / f"{name}.json"
        if path.exists():
            r.update(tokens_per_s=json.loads(path.read_text())["tokens_per_s"],
                     throughput="probe")


def rel_gap(runs: dict[str, dict], a: str, b: str) -> float:
    """Relative final validation-loss gap of run ``a`` over run ``b``, in percent."""
    return 100 * (runs[a]["final_val_loss"] - runs[b]["final_val_loss"]) / runs[b][
        "final_val_loss"]


def plot(runs: dict[str, dict], out: Path) -> None:
    """loss_curves.png and relative_gap.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in runs.items():
        steps, losses = zip(*r["val"], strict=True)
        ax.plot([s * r["tokens_per_step"] / 1e6 for s in steps], losses, label=name)
    ax.set(xlabel="tokens (M)", ylabel="validation loss", title="Validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, base in zip(axes, ("bf16", "fp8_block"), strict=True):
        if base not in runs:
            continue
        ref = dict(runs[base]["val"])
        for name, r in runs.items():
            if name == base:
                continue
            pts = [(s, 100 * (v - ref[s]) / ref[s]) for s, v in r["val"] if s in ref and s > 0]
            if pts:
                steps, gaps = zip(*pts, strict=True)
                ax.plot([s * r["tokens_per_step"] / 1e6 for s in steps], gaps, label=name)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xlabel="tokens (M)", ylabel=f"relative val-loss gap vs {base} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "relative_gap.png", dpi=120)
    plt.close(fig)


def report(folder: Path, out: Path) -> str:
    """Write README.md, results.json and the PNGs into ``out``; returns the markdown."""
    runs = load_runs(folder)
    if "bf16" not in runs:
        raise SystemExit(f"no finished bf16 run in {folder}: the baseline is needed")
    isolated_throughput(folder, runs)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, out)
    lines = [
        "| run | val loss | vs BF16 | vs FP8 | tokens/s | peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        fp8 = f"{rel_gap(runs, name, 'fp8_block'):+.2f}%" if "fp8_block" in runs else "-"
        lines.append(
            f"| {name} | {r['final_val_loss']:.4f} | {rel_gap(runs, name, 'bf16'):+.2f}% | {fp8}"
            f" | {r['tokens_per_s']:,.0f} | {r.get('peak_memory_mb', 0):,.0f} |"
        )
    lines += ["", "| the paper predicts | here |", "|---|---|"]
    for text, check in PREDICTIONS:
        try:
            verdict = "held" if check(lambda a, b: rel_gap(runs, a, b)) else "not held"
        except KeyError as missing:
            verdict = f"not run ({missing})"
        lines.append(f"| {text} | {verdict} |")
    md = "\n".join(lines)
    (out / "README.md").write_text(
        "# Replication at small scale\n\n"
        f"Runs: `{folder}`; params {next(iter(runs.values()))['params']:,}; tokens per run "
        f"{next(iter(runs.values()))['steps'] * next(iter(runs.values()))['tokens_per_step']:,}."
        "\n\ntokens/s: the run alone on its GPU (`--probe-steps`) where marked in results.json "
        "(`throughput: probe`), else the run's own average."
        f"\n\n![loss](loss_curves.png)\n![gap](relative_gap.png)\n\n{md}\n"
    )
    (out / "results.json").write_text(json.dumps(
        {n: {k: r.get(k) for k in ("final_val_loss", "tokens_per_s", "peak_memory_mb", "params",
                                    "steps", "throughput")}
         for n, r in runs.items()}, indent=2))
    return md


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    print(report(Path(args.runs), Path(args.out)))


if __name__ == "__main__":
    main()
