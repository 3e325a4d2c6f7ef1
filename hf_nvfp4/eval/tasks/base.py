"""What every task provides: items to run, a way to score the model's outputs, metrics.

A task turns benchmark records into *items* (plain dicts with at least ``id`` and ``context``)
and says which of three kinds of request the model must answer for them:

- ``generate``: continue ``context`` (greedy, or ``n`` samples) until a stop string;
- ``loglik``: log-probability of ``item["continuation"]`` given ``context``;
- ``choice``: log-probability of each of ``item["choices"]`` given ``context``.

Scoring returns one JSON-able record per item with a ``value`` (1/0 for correctness, a
fraction for pass@1 over samples, log-likelihood per byte) and a ``weight``; the task's primary
metric is the weighted mean of ``value``, which is what comparisons resample.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hf_nvfp4.eval.data import DataSource

Item = dict[str, Any]
Record = dict[str, Any]
Kind = Literal["generate", "loglik", "choice"]


@dataclass
class TaskData:
    """Items to score plus notes for the report (e.g. where few-shot exemplars came from)."""

    items: list[Item]
    notes: list[str] = field(default_factory=list)


def scored_text(context: str, continuation: str) -> str:
    """The text whose log-probability is scored for ``(context, continuation)``: the
    continuation with the context's trailing whitespace moved in front of it (tokenizers
    attach leading whitespace to the next word)."""
    return context[len(context.rstrip()):] + continuation


@dataclass(frozen=True)
class LoglikResult:
    """Log-probability of a continuation: summed over its tokens, and whether greedy."""

    logprob: float
    num_tokens: int
    is_greedy: bool


class Task(ABC):
    """A benchmark task. Subclasses set the class attributes and implement the methods."""

    name: str
    kind: Kind
    metric: str
    higher_is_better: bool = True
    stop: tuple[str, ...] = ()
    sampled: bool = False  # scores several samples per item (pass@k) when asked
    default_max_new_tokens: int = 256
    default_num_fewshot: int = 0

    @abstractmethod
    def build(self, source: DataSource, limit: int | None, num_fewshot: int | None) -> TaskData:
        """Load data and build items (prompts included); ``limit`` caps the items scored."""

    @abstractmethod
    def score(self, items: Sequence[Item], outputs: Sequence[Any]) -> list[Record]:
        """One record per item; ``outputs[i]`` is a list of completions for ``generate``,
        a :class:`LoglikResult` for ``loglik``, a list of log-probs for ``choice``."""

    def aggregate(self, records: Sequence[Record]) -> dict[str, float]:
        """Task metrics; the primary one is ``self.metric``."""
        return {self.metric: weighted_mean(records)}


def weighted_mean(records: Sequence[Record]) -> float:
    """``sum(value * weight) / sum(weight)`` over records (weight defaults to 1)."""
    total = sum(r.get("weight", 1.0) for r in records)
    if total == 0:
        return math.nan
    return sum(r["value"] * r.get("weight", 1.0) for r in records) / total


def first_n(items: Sequence[Item], limit: int | None) -> list[Item]:
    """The first ``limit`` items (all when None); ``limit`` must be positive."""
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive number of items; got {limit}")
    return list(items if limit is None else items[:limit])


class LoglikTask(Task):
    """Mean log-likelihood per UTF-8 byte of reference answers (higher is better).

    Per item, ``value`` is the log-probability of the reference divided by its byte length and
    ``weight`` is the byte length, so the primary metric is total log-prob over total bytes.
    Near chance accuracy this still separates models whose weights differ slightly.
    """

    kind: Kind = "loglik"
    metric = "loglik_per_byte"

    def score(self, items: Sequence[Item], outputs: Sequence[LoglikResult]) -> list[Record]:
        """Records with the log-prob, token and byte counts of each reference."""
        records = []
        for item, out in zip(items, outputs, strict=True):
            num_bytes = len(scored_text(item["context"], item["continuation"]).encode("utf-8"))
            records.append(
                {
                    "id": item["id"],
                    "logprob": out.logprob,
                    "num_tokens": out.num_tokens,
                    "num_bytes": num_bytes,
                    "is_greedy": out.is_greedy,
                    "value": out.logprob / num_bytes,
                    "weight": num_bytes,
                }
            )
        return records

    def aggregate(self, records: Sequence[Record]) -> dict[str, float]:
        """Log-likelihood per byte, bits per byte and the fraction of greedy references."""
        per_byte = weighted_mean(records)
        return {
            self.metric: per_byte,
            "bits_per_byte": -per_byte / math.log(2),
            "greedy_fraction": sum(r["is_greedy"] for r in records) / max(len(records), 1),
        }
