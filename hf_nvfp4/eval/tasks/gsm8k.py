"""GSM8K as lm-evaluation-harness's ``gsm8k`` task: few-shot generation, exact match.

Prompt: ``num_fewshot`` solved train problems then the test problem, each as
``"Question: {q}\\nAnswer: {solution}"`` joined by blank lines; greedy until ``Question:``.
Two extractions, as the harness: *strict-match* ``#### (\\-?[0-9\\.\\,]+)`` (first match) and
*flexible-extract* ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` (last match). Both sides are normalised by
lower-casing and deleting ``,``, ``$``, everything up to ``#### `` and a trailing ``.``.
Exemplars are the first ``num_fewshot`` train problems (the harness samples them with a
seed; a fixed set keeps prompts identical across models).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hf_nvfp4.eval.data import DataSource, load_split
from hf_nvfp4.eval.tasks.base import Item, LoglikTask, Record, Task, TaskData, first_n

INVALID = "[invalid]"
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def extract_strict(text: str) -> str:
    """The number after the first ``#### `` marker, or ``"[invalid]"``."""
    match = STRICT.search(text)
    return match.group(1) if match else INVALID


def extract_flexible(text: str) -> str:
    """The last number-like span in ``text``, or ``"[invalid]"``."""
    matches = FLEXIBLE.findall(text)
    if not matches:
        return INVALID
    return next(group for group in matches[-1] if group)


def normalize(answer: str) -> str:
    """The harness's exact-match normalisation, applied to predictions and gold alike."""
    for pattern in _IGNORE:
        answer = pattern.sub("", answer)
    return answer.lower()


def format_example(question: str, answer: str | None = None) -> str:
    """``"Question: {q}\\nAnswer:"``, followed by `` {answer}`` for exemplars."""
    text = f"Question: {question}\nAnswer:"
    return text if answer is None else f"{text} {answer}"


def build_context(exemplars: Sequence[Record], question: str) -> str:
    """Exemplars and the question, separated by blank lines."""
    shots = [format_example(e["question"], e["answer"]) for e in exemplars]
    return "\n\n".join([*shots, format_example(question)])


def _items(source: DataSource, limit: int | None, num_fewshot: int) -> tuple[list[Item], str]:
    exemplars = load_split("gsm8k", "train", source)[:num_fewshot] if num_fewshot else []
    test = first_n(load_split("gsm8k", "test", source), limit)
    items = [
        {
            "id": f"gsm8k/test/{i}",
            "question": doc["question"],
            "answer": doc["answer"],
            "context": build_context(exemplars, doc["question"]),
        }
        for i, doc in enumerate(test)
    ]
    return items, f"{num_fewshot}-shot: the first {num_fewshot} train problems"


class GSM8K(Task):
    """Few-shot chain-of-thought generation; primary metric strict-match exact match."""

    name = "gsm8k"
    kind = "generate"
    metric = "exact_match_strict"
    stop = ("Question:", "</s>", "<|im_end|>")
    default_max_new_tokens = 256
    default_num_fewshot = 5

    def build(self, source: DataSource, limit: int | None, num_fewshot: int | None) -> TaskData:
        """Test problems (the first ``limit``) with few-shot prompts from train."""
        shots = self.default_num_fewshot if num_fewshot is None else num_fewshot
        items, note = _items(source, limit, shots)
        return TaskData(items, [note])

    def score(self, items: Sequence[Item], outputs: Sequence[list[str]]) -> list[Record]:
        """Strict and flexible extraction of the first completion, compared to the gold."""
        records = []
        for item, completions in zip(items, outputs, strict=True):
            completion = completions[0]
            gold = normalize(item["answer"])
            strict, flexible = extract_strict(completion), extract_flexible(completion)
            ok_strict = normalize(strict) == gold
            records.append(
                {
                    "id": item["id"],
                    "question": item["question"],
                    "gold": gold,
                    "completion": completion,
                    "strict": strict,
                    "flexible": flexible,
                    "correct_strict": ok_strict,
                    "correct_flexible": normalize(flexible) == gold,
                    "value": float(ok_strict),
                }
            )
        return records

    def aggregate(self, records: Sequence[Record]) -> dict[str, float]:
        """Strict-match and flexible-extract exact match."""
        n = max(len(records), 1)
        return {
            "exact_match_strict": sum(r["correct_strict"] for r in records) / n,
            "exact_match_flexible": sum(r["correct_flexible"] for r in records) / n,
        }


class GSM8KLoglik(LoglikTask):
    """Log-likelihood per byte of the gold solutions, in the same few-shot prompt."""

    name = "gsm8k_loglik"
    default_num_fewshot = 5

    def build(self, source: DataSource, limit: int | None, num_fewshot: int | None) -> TaskData:
        """Test problems whose continuation is ``" " + gold solution``."""
        shots = self.default_num_fewshot if num_fewshot is None else num_fewshot
        items, note = _items(source, limit, shots)
        for item in items:
            item["continuation"] = " " + item["answer"]
        return TaskData(items, [note])
