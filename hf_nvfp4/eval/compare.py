"""``compare``: several models on the same tasks, deltas against a baseline, significance.

For every task and every non-baseline model the items are paired by id with the baseline's;
the report gives the difference in the primary metric with a paired-bootstrap 95% interval
and, where per-item scores are 0/1, the exact McNemar p-value. Outputs in ``output_dir``:
``{model}/{task}.json`` (per item), ``comparison.json``, ``comparison.md`` and
``comparison.png``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_nvfp4.eval.plot import plot_comparison
from hf_nvfp4.eval.runner import EvalOptions, TaskResult, evaluate, write_json
from hf_nvfp4.eval.stats import mcnemar_exact, paired_bootstrap


def _paired(base: TaskResult, other: TaskResult) -> tuple[list, list, list]:
    by_id = {r["id"]: r for r in other["items"]}
    pairs = [(r, by_id[r["id"]]) for r in base["items"] if r["id"] in by_id]
    return (
        [a["value"] for a, _ in pairs],
        [b["value"] for _, b in pairs],
        [a.get("weight", 1.0) for a, _ in pairs],
    )


def significance(base: TaskResult, other: TaskResult, seed: int = 0) -> dict[str, Any]:
    """Paired difference ``other - base`` of one task: CI and (0/1 scores) McNemar."""
    a, b, w = _paired(base, other)
    if not a:
        raise ValueError(f"{base['task']}: no item in common between the two models")
    ci = paired_bootstrap(a, b, w, seed=seed)
    row: dict[str, Any] = {
        "n": len(a),
        "diff": ci.diff,
        "ci_low": ci.low,
        "ci_high": ci.high,
        "confidence": ci.confidence,
        "only_baseline": None,
        "only_model": None,
        "mcnemar_p": None,
    }
    if all(v in (0.0, 1.0) for v in a + b):
        only_a, only_b, p = mcnemar_exact([v == 1.0 for v in a], [v == 1.0 for v in b])
        row.update(only_baseline=only_a, only_model=only_b, mcnemar_p=p)
    return row


def compare_results(
    results: Mapping[str, Mapping[str, TaskResult]], baseline: str | None = None
) -> dict[str, Any]:
    """Summarise ``{model: {task: result}}`` against ``baseline`` (default: first model)."""
    models = list(results)
    baseline = baseline or models[0]
    if baseline not in results:
        raise ValueError(f"baseline must be one of {models}; got {baseline!r}")
    tasks = list(results[baseline])
    summary: dict[str, Any] = {"baseline": baseline, "models": models, "tasks": {}}
    for task in tasks:
        base = results[baseline][task]
        entry = {
            "metric": base["metric"],
            "higher_is_better": base["higher_is_better"],
            "scores": {m: results[m][task]["metrics"][base["metric"]] for m in models},
            "metrics": {m: results[m][task]["metrics"] for m in models},
            "notes": base["notes"],
            "vs_baseline": {
                m: significance(base, results[m][task]) for m in models if m != baseline
            },
        }
        summary["tasks"][task] = entry
    return summary


def _num(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def _p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def to_markdown(summary: Mapping[str, Any], paths: Mapping[str, str] | None = None) -> str:
    """The comparison as markdown: scores with deltas, paired tests, notes."""
    base, models = summary["baseline"], summary["models"]
    lines = ["# Evaluation comparison", ""]
    if paths:
        lines += [f"- **{m}**{' (baseline)' if m == base else ''}: `{paths[m]}`" for m in models]
        lines.append("")
    lines += ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for task, entry in summary["tasks"].items():
        cells = []
        for m in models:
            score = _num(entry["scores"][m])
            if m != base:
                score += f" ({_num(entry['vs_baseline'][m]['diff'], signed=True)})"
            cells.append(score)
        lines.append(f"| {task} | {entry['metric']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Paired differences against {base}",
        "",
        "Δ = model − baseline on the same items; 95% paired-bootstrap interval; exact "
        "McNemar test on per-item correctness (n/a for non-binary scores); "
        "b/c = items only the baseline / only the model got right.",
        "",
        "| task | model | n | Δ | 95% CI | b / c | McNemar p |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, entry in summary["tasks"].items():
        for m, row in entry["vs_baseline"].items():
            bc = "—"
            if row["only_baseline"] is not None:
                bc = f"{row['only_baseline']} / {row['only_model']}"
            lines.append(
                f"| {task} | {m} | {row['n']} | {_num(row['diff'], signed=True)} | "
                f"[{_num(row['ci_low'], signed=True)}, {_num(row['ci_high'], signed=True)}] | "
                f"{bc} | {_p(row['mcnemar_p'])} |"
            )
    notes = [f"- {task}: {note}" for task, e in summary["tasks"].items() for note in e["notes"]]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def compare(
    models: Mapping[str, str | os.PathLike],
    tasks: str | Sequence[str],
    baseline: str | None = None,
    options: EvalOptions | None = None,
    output_dir: str | os.PathLike = "eval_results",
    reuse: bool = False,
) -> dict[str, Any]:
    """Evaluate every model on ``tasks`` and write the comparison report.

    Args:
        models: ``{name: checkpoint path or Hub id}``, in table order.
        tasks: task names or a comma-separated string.
        baseline: the reference model's name (default: the first).
        options: :class:`EvalOptions` shared by all models.
        output_dir: receives per-model results and ``comparison.{json,md,png}``.
        reuse: keep per-task results already in ``output_dir`` (resume an interrupted run).

    Returns:
        The summary written to ``comparison.json`` (with ``"files"`` naming the outputs).
    """
    if not models:
        raise ValueError("models must name at least one checkpoint")
    out = Path(output_dir)
    results = {
        name: evaluate(path, tasks, options, output_dir=out / name, model_name=name, reuse=reuse)
        for name, path in models.items()
    }
    return write_comparison(results, out, baseline, {n: str(p) for n, p in models.items()})


def write_comparison(
    results: Mapping[str, Mapping[str, TaskResult]],
    output_dir: str | os.PathLike,
    baseline: str | None = None,
    paths: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``comparison.{md,json,png}`` in ``output_dir`` from results already computed
    (``{model: {task: result}}``, e.g. read back from the per-task JSON files of
    :func:`evaluate`); ``paths`` names each model's checkpoint in the table. Returns the
    summary written to ``comparison.json``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = compare_results(results, baseline)
    paths = dict(paths) if paths is not None else {name: name for name in results}
    scores = {t: e["scores"] for t, e in summary["tasks"].items()}
    metrics = {t: e["metric"] for t, e in summary["tasks"].items()}
    files = {
        "markdown": out / "comparison.md",
        "json": out / "comparison.json",
        "plot": out / "comparison.png",
    }
    files["markdown"].write_text(to_markdown(summary, paths), encoding="utf-8")
    plot_comparison(scores, metrics, summary["baseline"], files["plot"])
    summary["files"] = {k: str(v) for k, v in files.items()}
    summary["paths"] = paths
    write_json(files["json"], summary)
    return summary
