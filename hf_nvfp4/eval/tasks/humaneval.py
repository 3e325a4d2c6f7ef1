"""HumanEval (OpenAI): 164 Python functions, completions run against the official tests.

Zero-shot; the prompt is the problem's ``prompt`` as given; generation stops at
``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif`` or ``\\nprint``. The program
``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`` runs in
:mod:`hf_nvfp4.eval.sandbox`; a completion passes when the program exits cleanly.
pass@k uses the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` over ``n`` samples with ``c``
passing (greedy decoding gives ``n = 1`` and pass@1 only).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hf_nvfp4.eval.data import DataSource, Record, load_split
from hf_nvfp4.eval.sandbox import SandboxLimits, notify_privileges_once, run_programs
from hf_nvfp4.eval.tasks.base import Item, LoglikTask, Task, TaskData, first_n

PASS_AT_K = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` pass (Chen et al., 2021)."""
    if not 0 <= c <= n or k <= 0:
        raise ValueError(f"need 0 <= c <= n and k > 0; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def program(item: Item, completion: str) -> str:
    """The program run for one completion: prompt, completion, tests, ``check(...)``."""
    check = f"check({item['entry_point']})"
    return item["context"] + completion + "\n" + item["test"] + "\n" + check + "\n"


def _items(source: DataSource, limit: int | None) -> list[Item]:
    return [
        {
            "id": doc["task_id"],
            "context": doc["prompt"],
            "canonical_solution": doc["canonical_solution"],
            "test": doc["test"],
            "entry_point": doc["entry_point"],
        }
        for doc in first_n(load_split("humaneval", "test", source), limit)
    ]


def _zero_shot_note(num_fewshot: int | None) -> list[str]:
    if num_fewshot:
        return [f"HumanEval is zero-shot; num_fewshot={num_fewshot} ignored"]
    return []


class HumanEval(Task):
    """Functional correctness of generated code; primary metric pass@1.

    Args:
        limits: sandbox limits per program.
        max_workers: programs run in parallel (default: CPU count).
    """

    name = "humaneval"
    kind = "generate"
    metric = "pass@1"
    sampled = True
    stop = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    default_max_new_tokens = 1024

    def __init__(self, limits: SandboxLimits | None = None, max_workers: int | None = None):
        self.limits = limits or SandboxLimits()
        self.max_workers = max_workers

    def build(self, source: DataSource, limit: int | None, num_fewshot: int | None) -> TaskData:
        """The problems (the first ``limit``), prompts as given.

        Says once, here at the start, when the sandbox cannot drop root (and why).
        """
        notify_privileges_once()
        return TaskData(_items(source, limit), _zero_shot_note(num_fewshot))

    def score(self, items: Sequence[Item], outputs: Sequence[list[str]]) -> list[Record]:
        """Run every completion in the sandbox; ``value`` is the fraction that passed."""
        flat = [(i, c) for i, completions in enumerate(outputs) for c in completions]
        results = run_programs(
            [program(items[i], c) for i, c in flat], self.limits, self.max_workers
        )
        per_item: list[list] = [[] for _ in items]
        for (i, completion), result in zip(flat, results, strict=True):
            per_item[i].append((completion, result))
        records = []
        for item, runs in zip(items, per_item, strict=True):
            n, c = len(runs), sum(r.passed for _, r in runs)
            records.append(
                {
                    "id": item["id"],
                    "n": n,
                    "c": c,
                    "completions": [comp for comp, _ in runs],
                    "results": [r.reason for _, r in runs],
                    "value": c / n,
                }
            )
        return records

    def aggregate(self, records: Sequence[Record]) -> dict[str, float]:
        """pass@k for every k in (1, 10, 100) not above the number of samples."""
        n = min(r["n"] for r in records)
        return {
            f"pass@{k}": float(np.mean([pass_at_k(r["n"], r["c"], k) for r in records]))
            for k in PASS_AT_K
            if k <= n
        }


class HumanEvalLoglik(LoglikTask):
    """Log-likelihood per byte of the canonical solutions given the prompts."""

    name = "humaneval_loglik"

    def build(self, source: DataSource, limit: int | None, num_fewshot: int | None) -> TaskData:
        """Problems whose continuation is the canonical solution."""
        items = _items(source, limit)
        for item in items:
            item["continuation"] = item["canonical_solution"]
        return TaskData(items, _zero_shot_note(num_fewshot))
