"""Report of the replication runs: curves, relative gaps, a table, and the paper's predictions.

    python bench/replicate_report.py --runs eval/reports/replicate/runs \\
        --out eval/reports/replicate [--seed-runs FOLDER ...] [--eval FOLDER ...]

``--eval``: folders (one per seed) of the ``eval_<run>.tgz`` result tarballs
bench/gpu_replicate.sh copies back (each ``<run>/<task>.json`` of the eval suite, run on the
device while the model existed); each folder's BF16, FP8 block and NVFP4 ones are compared,
the first folder's into ``OUT/eval``, the others' into ``OUT/eval_<folder name>``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_nvfp4.telemetry import SQRT3, WGRAD_NOISE_RATIO

# the finished runs of each data-order seed, by run name, labelled by their folder's name
# (the main folder first)
Pools = list[tuple[str, dict[str, dict]]]
# (claim, run a, run b): the paper predicts loss(a) > loss(b), except the first claim
# (gap <= 1.5%) and the late switch (judged by its gain over the run that stays in NVFP4).
PREDICTIONS = (
    ("NVFP4 within ~1.5% of BF16", "nvfp4", "bf16"),
    ("MXFP4 worse than NVFP4", "mxfp4", "nvfp4"),
    ("no stochastic rounding is worse", "nvfp4_no_sr", "nvfp4"),
    ("no RHT is worse", "nvfp4_no_rht", "nvfp4"),
    ("no 2D weights is worse", "nvfp4_no_2d", "nvfp4"),
    ("all blocks in FP4 is worse than the recipe", "nvfp4_all_blocks", "nvfp4"),
    ("late switch closes most of the gap", "nvfp4_late_switch", "bf16"),
)


def seed_noise(pools: Pools) -> dict | None:
    """Relative NVFP4-vs-BF16 gap (%) per data-order seed (each pool with both runs) and its
    sample standard deviation: the run-to-run noise of a difference between two runs. None
    when fewer than two seeds have both."""
    gaps = {label: rel_gap(runs, "nvfp4", "bf16") for label, runs in pools
            if "nvfp4" in runs and "bf16" in runs}
    if len(gaps) < 2:
        return None
    values = list(gaps.values())
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return {"gaps": gaps, "mean": mean, "sd": sd}


def same_data_noise(runs: dict[str, dict]) -> float | None:
    """Largest relative val-loss difference (%) between ``nvfp4`` and ``nvfp4_late_switch``
    over the second half of training before the switch: the same configuration on the same
    data and initialization, so this is the run-to-run noise of the GPU itself (atomics,
    kernel choices), the floor for differences between runs of one seed. None when the late
    switch was forked from ``nvfp4`` (``bench/replicate.py --fork``: one computation before
    the switch, so no second sample of it)."""
    if "nvfp4" not in runs or "nvfp4_late_switch" not in runs:
        return None
    r = runs["nvfp4_late_switch"]
    if r.get("forked_from"):
        return None
    switch = r["nvfp4"]["switch_to_bf16_at"] * r["steps"]
    ref = dict(runs["nvfp4"]["val"])
    diffs = [100 * abs(v - ref[s]) / ref[s] for s, v in r["val"]
             if s in ref and r["steps"] / 2 <= s < switch]
    return max(diffs) if diffs else None


def pools_for(pools: Pools, a: str, b: str) -> Pools:
    """The seeds whose runs hold ``a`` and ``b`` (and, for the late switch, the NVFP4 and
    BF16 runs it is judged against): a prediction compares runs of one data order."""
    need = {a, b} | ({"nvfp4", "bf16"} if a == "nvfp4_late_switch" else set())
    return [(label, runs) for label, runs in pools if need <= set(runs)]


def verdict(pools: Pools, a: str, b: str, sd: float | None) -> str:
    """The outcome of one prediction, with its numbers, over every seed that ran ``a`` and
    ``b`` (each named, unless the only one is the first pool): judged on the mean of their
    differences, ``held`` / ``not held`` when it exceeds twice the seed noise ``sd``, ``weak``
    when it does not (but exceeds the largest same-data floor of those seeds, where one was
    measured), ``within noise`` below that floor. The late switch, judged in the first seed
    that ran it, holds when it closes more than half of NVFP4's gap to BF16."""
    found = pools_for(pools, a, b)
    if not found:
        have = set().union(*(runs for _, runs in pools))
        return f"not run ({', '.join(sorted({a, b} - have)) or f'{a} and {b} in one seed'})"
    floors = [f for _, runs in found if (f := same_data_noise(runs)) is not None]
    floor = max(floors) if floors else None
    if a == "nvfp4_late_switch":
        seed, runs = found[0]
        where = "" if seed == pools[0][0] else f"{seed}: "
        gap = rel_gap(runs, "nvfp4", "bf16")
        d = -rel_gap(runs, a, "nvfp4")
        what = f"{where}switch vs NVFP4 {-d:+.2f}%, NVFP4 vs BF16 {gap:+.2f}%"
        if gap <= 0:
            return f"untestable: NVFP4 is not behind BF16 ({what})"
        closed = (runs["nvfp4"]["final_val_loss"] - runs[a]["final_val_loss"]) / (
            runs["nvfp4"]["final_val_loss"] - runs["bf16"]["final_val_loss"])
        what += f": closes {100 * closed:.0f}% of the gap"
        sign = "held" if closed > 0.5 else "not held"
    else:
        gaps = {seed: rel_gap(runs, a, b) for seed, runs in found}
        d = sum(gaps.values()) / len(gaps)
        if len(gaps) == 1:
            seed = next(iter(gaps))
            numbers = ("" if seed == pools[0][0] else f"{seed}: ") + f"{d:+.2f}%"
        else:
            numbers = ", ".join(f"{seed} {g:+.2f}%" for seed, g in gaps.items()) + (
                f": mean {d:+.2f}%")
        if a == "nvfp4" and b == "bf16":
            return f"{'held' if d <= 1.5 else 'not held'} ({numbers})"
        what = f"{a} vs {b}: {numbers}"
        sign = "held" if d > 0 else "not held"
    if floor is not None and abs(d) <= floor:
        return f"within noise ({what})"
    if sd is not None and abs(d) <= 2 * sd:
        above = "above same-data noise, " if floor is not None else ""
        return f"{sign}, weak: {above}within seed noise ({what})"
    return f"{sign} ({what})"


def gap_curve(run: dict, base: dict) -> list[tuple[int, float]]:
    """``(step, relative val-loss gap of run over base in %)`` at every step both validated."""
    ref = dict(base["val"])
    return [(s, 100 * (v - ref[s]) / ref[s]) for s, v in run["val"] if s in ref]


def gap_trend(runs: dict[str, dict]) -> dict | None:
    """"FP4 All the Way": the FP4 penalty grows late in training. The mean relative NVFP4-BF16
    gap (%) over the validations of the second quarter of training (``mid``) and of the last
    quarter (``late``), their difference (``trend``) and its standard error (``se``, the
    points taken as independent). None without both runs or with fewer than two points in a
    quarter."""
    if not {"nvfp4", "bf16"} <= set(runs):
        return None
    steps = runs["nvfp4"]["steps"]
    pts = gap_curve(runs["nvfp4"], runs["bf16"])
    mid = [g for s, g in pts if steps / 4 <= s < steps / 2]
    late = [g for s, g in pts if s >= 3 * steps / 4]
    if len(mid) < 2 or len(late) < 2:
        return None

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    def var(xs: list[float]) -> float:
        return sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)

    return {"mid": mean(mid), "late": mean(late), "trend": mean(late) - mean(mid),
            "se": (var(mid) / len(mid) + var(late) / len(late)) ** 0.5}


def trend_verdict(pools: Pools) -> str:
    """The gap-growth prediction over every seed with NVFP4 and BF16: ``held`` when each
    seed's trend exceeds twice its standard error, ``not held`` when each is below minus
    twice it, ``within noise`` otherwise."""
    trends = {seed: t for seed, runs in pools if (t := gap_trend(runs)) is not None}
    if not trends:
        return "not run (nvfp4 and bf16 in one seed)"
    what = "; ".join(f"{seed}: {t['mid']:+.2f}% -> {t['late']:+.2f}% ({t['trend']:+.2f} "
                     f"+- {t['se']:.2f})" for seed, t in trends.items())
    if all(t["trend"] > 2 * t["se"] for t in trends.values()):
        return f"held ({what})"
    if all(t["trend"] < -2 * t["se"] for t in trends.values()):
        return f"not held ({what})"
    return f"within noise ({what})"


def sqrt3_verdict(pools: Pools) -> str:
    """Whether the wgrad noise ratio of each seed's NVFP4 run fell below sqrt(3) ("FP4 All the
    Way"'s point where FP4 gradients stop being useful), with its smallest value."""
    parts, reached = [], False
    for seed, runs in pools:
        ratios = ratio_curve(runs.get("nvfp4", {}))
        if not ratios:
            continue
        step, low = min(ratios, key=lambda sr: sr[1])
        r = runs["nvfp4"]
        tripped = r.get("sqrt3_step")
        reached |= tripped is not None
        parts.append(f"{seed}: " + (f"below at step {tripped}" if tripped is not None else
                                    f"never below; smallest {low:.2f} at step {step} of "
                                    f"{r['steps']} ({low / SQRT3:.1f}x sqrt(3))"))
    if not parts:
        return "not run (no NVFP4 telemetry)"
    return ("reached" if reached else "not reached at this length") + f" ({'; '.join(parts)})"


def ratio_curve(run: dict) -> list[tuple[int, float]]:
    """``(step, wgrad noise ratio)`` of every telemetry record of ``run`` that has one."""
    return [(s, st[WGRAD_NOISE_RATIO]) for s, st in run.get("telemetry", [])
            if WGRAD_NOISE_RATIO in st]


def load_runs(folder: Path) -> dict[str, dict]:
    """Finished runs by name."""
    runs = {}
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        if r.get("done"):
            runs[r["run"]] = r
    return runs


def same_corpus(runs: dict[str, dict]) -> None:
    """Stop unless every run trained on the same corpus (its manifest's ``files_sha256`` and
    token count; runs from before manifests were recorded count as one unknown corpus)."""
    groups: dict[tuple, list[str]] = {}
    for name, r in runs.items():
        c = r.get("corpus") or {}
        groups.setdefault((c.get("files_sha256"), c.get("tokens")), []).append(name)
    if len(groups) > 1:
        listing = "; ".join(f"{sha or 'not recorded'} ({tokens} tokens): {', '.join(names)}"
                            for (sha, tokens), names in groups.items())
        raise SystemExit(f"the runs trained on different corpora, not comparable: {listing}")


def isolated_throughput(folder: Path, runs: dict[str, dict]) -> None:
    """Replace each run's tokens/s by its ``--probe-steps`` measurement (the run alone on the
    GPU) where one exists, and mark the run ``"throughput": "probe"``. Peak memory is the
    run's own (per process, unaffected by runs sharing the GPU)."""
    for name, r in runs.items():
        path = folder / "probe" / f"{name}.json"
        if path.exists():
            r.update(tokens_per_s=json.loads(path.read_text())["tokens_per_s"],
                     throughput="probe")


def devices(run: dict) -> str:
    """The GPUs a run trained on, from its segments ("H200"; "H200, H100" when a run's calls
    landed on different cards): tokens/s compare only between runs of the same device."""
    names = dict.fromkeys(s["device"].removeprefix("NVIDIA ").split()[0]
                          for s in run.get("segments", []) if s.get("device"))
    return ", ".join(names) or "-"


def rel_gap(runs: dict[str, dict], a: str, b: str) -> float:
    """Relative final validation-loss gap of run ``a`` over run ``b``, in percent."""
    return 100 * (runs[a]["final_val_loss"] - runs[b]["final_val_loss"]) / runs[b][
        "final_val_loss"]


def plot(pools: Pools, out: Path) -> None:
    """loss_curves.png, relative_gap.png and telemetry.png (the wgrad noise ratio against
    sqrt(3)): the first seed's runs solid, the others dashed (each gap against the BF16 / FP8
    run of its own seed), forked runs from their fork step on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for _, runs in pools for n in runs))
    color = {n: f"C{i % 10}" for i, n in enumerate(names)}  # one color per run in every seed

    def draw(ax, i: int, seed: str, name: str, run: dict, pts: list) -> None:
        """One curve over tokens: seed ``i`` of the pools, solid for the first; a forked run
        from its fork step on (before it, its curve is its parent's)."""
        fork = run.get("forked_from")
        pts = [p for p in pts if not fork or p[0] >= fork["step"]]
        if pts:
            steps, values = zip(*pts, strict=True)
            ax.plot([s * run["tokens_per_step"] / 1e6 for s in steps], values,
                    label=name if i == 0 else f"{name} ({seed})", ls="-" if i == 0 else "--",
                    c=color[name])

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (seed, runs) in enumerate(pools):
        for name, r in runs.items():
            draw(ax, i, seed, name, r, r["val"])
    ax.set(xlabel="tokens (M)", ylabel="validation loss", title="Validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, base in zip(axes, ("bf16", "fp8_block"), strict=True):
        for i, (seed, runs) in enumerate(pools):
            for name, r in runs.items():
                if base in runs and name != base:
                    draw(ax, i, seed, name, r, [(s, g) for s, g in gap_curve(r, runs[base])
                                                if s > 0])
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xlabel="tokens (M)", ylabel=f"relative val-loss gap vs {base} (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "relative_gap.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (seed, runs) in enumerate(pools):
        for name, r in runs.items():
            draw(ax, i, seed, name, r, ratio_curve(r))
    ax.axhline(SQRT3, color="k", lw=0.8, ls=":", label="sqrt(3)")
    ax.set(xlabel="tokens (M)", ylabel="wgrad noise ratio (gradient / quantization noise)",
           yscale="log", title="The sqrt(3) criterion of FP4 All the Way")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "telemetry.png", dpi=120)
    plt.close(fig)


def previous_study(folder: Path, pools: Pools) -> list[str]:
    """Markdown comparing these runs with an earlier, shorter study of the same runs (its
    report folder: ``results.json`` and the run JSONs of its seed folders, which give its
    tokens per step): each run's validation loss and gap to BF16 then and now (now: the mean
    over the seeds that ran it), and the seed spread of the NVFP4-BF16 gap then and now."""
    old = json.loads((folder / "results.json").read_text())
    per_step = next((r["tokens_per_step"] for r in map(json.loads, map(Path.read_text, sorted(
        folder.glob("*/*.json")))) if "tokens_per_step" in r), None)
    if per_step is None:
        raise SystemExit(f"{folder}: no run JSON with tokens_per_step in its seed folders")
    then = next(iter(old["runs"].values()))["steps"] * per_step
    first = next(iter(pools[0][1].values()))
    now = first["steps"] * first["tokens_per_step"]
    lines = [f"## Against the earlier study ({then / 1e6:.1f}M tokens per run, `{folder}`)",
             "", f"| run | val loss, {then / 1e6:.1f}M | vs BF16, {then / 1e6:.1f}M "
             f"| val loss, {now / 1e6:.0f}M ({pools[0][0]}) | vs BF16, {now / 1e6:.0f}M "
             "(mean over seeds) |", "|---|---|---|---|---|"]
    for name, r in old["runs"].items():
        gap = rel_gap(old["runs"], name, "bf16") if "bf16" in old["runs"] else None
        gaps = [rel_gap(runs, name, "bf16") for _, runs in pools
                if name in runs and "bf16" in runs]
        loss = pools[0][1][name]["final_val_loss"] if name in pools[0][1] else None
        lines.append(
            f"| {name} | {r['final_val_loss']:.4f} | "
            f"{'-' if gap is None else f'{gap:+.2f}%'} | "
            f"{'-' if loss is None else f'{loss:.4f}'} | "
            + (f"{sum(gaps) / len(gaps):+.2f}% ({len(gaps)} seed{'s' * (len(gaps) > 1)})"
               if gaps else "not run yet") + " |")
    noise, sd_now = old.get("seed_noise"), seed_noise(pools)
    lines += ["", "NVFP4 vs BF16 across data-order seeds: "
              + (f"{len(noise['gaps'])} seeds, mean {noise['mean']:+.2f}%, sd {noise['sd']:.2f}%"
                 if noise else "n/a") + f" at {then / 1e6:.1f}M tokens; "
              + (f"{len(sd_now['gaps'])} seeds, mean {sd_now['mean']:+.2f}%, sd "
                 f"{sd_now['sd']:.2f}%" if sd_now else "n/a") + f" at {now / 1e6:.0f}M.",
              "", "The two studies' corpora (and so their tokenizers) differ in size: compare "
              "the gaps, not the losses."]
    return lines


def report(folder: Path, out: Path, seed_folders: list[Path] | None = None,
           notes: Path | None = None, previous: Path | None = None) -> str:
    """Write README.md, results.json and the PNGs into ``out``; returns the markdown.

    ``folder`` holds the main runs; ``seed_folders`` runs repeated with other data-order
    seeds (each folder one seed, named by the folder). Every run is compared with the BF16
    and FP8 runs of its own seed; the spread of the NVFP4-BF16 gap over the seeds is the
    noise against which each prediction's difference is judged. ``notes`` (a markdown file:
    setup, commands, findings) is placed after the tables; ``previous`` (an earlier study's
    report folder) adds a section comparing both (:func:`previous_study`)."""
    runs = load_runs(folder)
    if "bf16" not in runs:
        raise SystemExit(f"no finished bf16 run in {folder}: the baseline is needed")
    pools = [(folder.name, runs)] + [(f.name, load_runs(f)) for f in seed_folders or []]
    same_corpus({f"{seed}/{n}": r for seed, pool in pools for n, r in pool.items()})
    isolated_throughput(folder, runs)
    out.mkdir(parents=True, exist_ok=True)
    plot(pools, out)
    noise = seed_noise(pools)
    sd = noise["sd"] if noise else None
    lines = [
        "| seed | run | val loss | vs BF16 | in seed sd | vs FP8 | tokens/s | device | peak MB "
        "| wgrad noise ratio < sqrt(3) at step | commands |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, pool in pools:
        for name, r in pool.items():
            gap = rel_gap(pool, name, "bf16") if "bf16" in pool else None
            fp8 = f"{rel_gap(pool, name, 'fp8_block'):+.2f}%" if "fp8_block" in pool else "-"
            in_sd = f"{gap / sd:+.1f}" if sd and gap is not None else "-"
            tripped = "-" if "telemetry" not in r else (
                "never" if r.get("sqrt3_step") is None else str(r["sqrt3_step"]))
            fork = r.get("forked_from")
            label = name + (f" (forked from {fork['run']} at step {fork['step']})" if fork
                            else "")
            lines.append(
                f"| {seed} | {label} | {r['final_val_loss']:.4f} | "
                f"{'-' if gap is None else f'{gap:+.2f}%'} | {in_sd} | {fp8}"
                f" | {r['tokens_per_s']:,.0f} | {devices(r)} | {r.get('peak_memory_mb', 0):,.0f}"
                f" | {tripped}"
                f" | {len(r.get('segments', [])) or '-'} |"
            )
    if noise:
        lines += ["", "| NVFP4 vs BF16 by data-order seed | relative gap |", "|---|---|"]
        lines += [f"| {k} | {v:+.2f}% |" for k, v in noise["gaps"].items()]
        lines.append(f"| mean (sd) | {noise['mean']:+.2f}% ({sd:.2f}%) |")
    lines += ["", "| the paper predicts | here |", "|---|---|"]
    lines += [f"| {text} | {verdict(pools, a, b, sd)} |" for text, a, b in PREDICTIONS]
    lines += [f"| the NVFP4 gap to BF16 grows late in training (mean gap, 2nd -> last quarter) "
              f"| {trend_verdict(pools)} |",
              f"| the wgrad noise ratio falls below sqrt(3) (FP4 gradients stop helping) "
              f"| {sqrt3_verdict(pools)} |"]
    floors = {seed: same_data_noise(pool) for seed, pool in pools
              if "nvfp4" in pool and "nvfp4_late_switch" in pool}
    forked = "n/a (the late switch was forked from nvfp4: one computation before the switch)"
    same = "; ".join(f"{seed} {forked if v is None else f'{v:.2f}%'}"
                     for seed, v in floors.items()) or "n/a (no late-switch run)"
    lines += ["", f"Noise: same-data (nvfp4 vs nvfp4_late_switch before the switch, second "
              f"half) {same}; across data-order seeds 2 sd = "
              f"{'n/a' if sd is None else f'{2 * sd:.2f}%'} (NVFP4 vs BF16 gap)."]
    if previous is not None:
        lines += [""] + previous_study(previous, pools)
    md = "\n".join(lines)
    ran = {name for _, pool in pools for name in pool}
    missing = [n for n in dict.fromkeys(x for _, a, b in PREDICTIONS for x in (a, b))
               if n not in ran]
    first = next(iter(runs.values()))
    (out / "README.md").write_text(
        "# Replication at small scale\n\n"
        f"Runs: `{folder}`" + "".join(f", `{f}`" for f in seed_folders or [])
        + f"; params {first['params']:,}; tokens per run "
        f"{first['steps'] * first['tokens_per_step']:,}."
        + (f"\n\n**In progress**: not yet run: {', '.join(missing)}"
           + (" (see the notes at the end)." if notes else ".") if missing else "")
        + "\n\ntokens/s: the run alone on its GPU (`--probe-steps`) where marked in results.json "
        "(`throughput: probe`), else the run's own average; compare it only between runs of one "
        "device (the column after it)."
        f"\n\n![loss](loss_curves.png)\n![gap](relative_gap.png)\n"
        f"![sqrt(3) criterion](telemetry.png)\n\n{md}\n"
        + (f"\n{notes.read_text()}" if notes else "")
    )
    keys = ("final_val_loss", "tokens_per_s", "peak_memory_mb", "params", "steps",
            "tokens_per_step", "throughput", "sqrt3_step", "forked_from", "segments")
    (out / "results.json").write_text(json.dumps({
        "runs": {n: {k: r.get(k) for k in keys} for n, r in runs.items()},
        "seeds": {seed: {n: {k: r.get(k) for k in keys} for n, r in pool.items()}
                  for seed, pool in pools[1:]},
        "seed_noise": noise, "same_data_noise": floors,
        "gap_trend": {seed: gap_trend(pool) for seed, pool in pools}}, indent=2))
    return md


EVAL_RUNS = ("bf16", "fp8_block", "nvfp4")


def eval_comparison(folder: Path, out: Path) -> dict | None:
    """The eval suite's comparison of the BF16, FP8 block and NVFP4 models, from the result
    tarballs in ``folder`` (``eval_<run>.tgz``, each holding ``<run>/<task>.json``), written
    to ``out`` (comparison.md/json/png, BF16 the baseline); None when none is there. Every
    model must have been scored on the same tasks and items."""
    import tarfile
    import tempfile

    from hf_nvfp4.eval.compare import write_comparison

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in EVAL_RUNS:
            archive = folder / f"eval_{run}.tgz"
            if not archive.is_file():
                continue
            with tarfile.open(archive) as tar:  # Python < 3.10.12 has no extraction filter
                tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter")
                                       else {}))
            tasks = sorted(p for p in (Path(tmp) / run).glob("*.json") if p.stem != "summary")
            if not tasks:
                raise SystemExit(f"{archive}: no task results inside (expected {run}/<task>.json)")
            results[run] = {p.stem: json.loads(p.read_text()) for p in tasks}
    if not results:
        return None
    names = {run: sorted(r) for run, r in results.items()}
    if len({tuple(v) for v in names.values()}) > 1:
        raise SystemExit(f"the eval tarballs in {folder} scored different tasks: {names}")
    return write_comparison(results, out, "bf16" if "bf16" in results else None,
                            {run: f"{folder}/eval_{run}.tgz" for run in results})


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed-runs", nargs="*", default=[],
                   help="folders of bf16 + nvfp4 runs with other --seed values (noise estimate)")
    p.add_argument("--notes", default=None, help="markdown appended to README.md")
    p.add_argument("--previous", default=None,
                   help="an earlier study's report folder (results.json and seed folders of "
                        "run JSONs): a section comparing its runs with these")
    p.add_argument("--eval", nargs="*", default=[],
                   help="folders of eval_<run>.tgz tarballs, one per seed: the first compared "
                        "into OUT/eval, each other one into OUT/eval_<folder name>")
    args = p.parse_args()
    print(report(Path(args.runs), Path(args.out), [Path(f) for f in args.seed_runs],
                 Path(args.notes) if args.notes else None,
                 Path(args.previous) if args.previous else None))
    for i, folder in enumerate(map(Path, args.eval)):
        summary = eval_comparison(folder, Path(args.out) / ("eval" if i == 0
                                                            else f"eval_{folder.name}"))
        print(f"no eval tarballs in {folder}" if summary is None
              else f"eval comparison: {summary['files']['markdown']}")


if __name__ == "__main__":
    main()
