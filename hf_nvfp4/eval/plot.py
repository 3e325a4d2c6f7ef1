"""Bar chart of the primary metric per task and model (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot_comparison(
    scores: Mapping[str, Mapping[str, float]],
    metrics: Mapping[str, str],
    baseline: str,
    path: str | Path,
) -> Path:
    """One panel per task, one bar per model, the baseline's value as a dashed line.

    Args:
        scores: ``{task: {model: value}}`` of the primary metric.
        metrics: ``{task: metric name}`` for the panel titles.
        baseline: the model drawn in grey with a reference line.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(scores)
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes.flat, tasks, strict=False):
        models = list(scores[task])
        values = [scores[task][m] for m in models]
        colors = [
            "0.55" if m == baseline else palette[i % len(palette)] for i, m in enumerate(models)
        ]
        bars = ax.bar(models, values, color=colors)
        ax.bar_label(bars, labels=[_label(v) for v in values], fontsize=8, padding=2)
        ax.axhline(scores[task][baseline], color="0.3", linestyle="--", linewidth=0.8)
        ax.set_title(f"{task}: {metrics[task]}", fontsize=10)
        _limits(ax, values)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _limits(ax: Any, values: list[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return
    low, high = min(finite + [0.0]), max(finite + [0.0])
    pad = 0.12 * (high - low or 1.0)
    top = high + pad if high > 0 or low == high else high
    ax.set_ylim(low - pad if low < 0 else low, top)
