"""MMLU-Pro (TIGER-Lab): 14 categories, up to ten options A-J.

``mmlu_pro``: 5-shot chain-of-thought generation as lm-evaluation-harness and the benchmark's
repository define it: the prompt ``Question:\\n...\\nOptions:\\nA. ...\\nAnswer: Let's think
step by step.``, greedy until ``Question:``, the answer extracted with
``answer is \\(?([A-J])\\)?``, then ``.*[aA]nswer:\\s*([A-J])``, then the last standalone
letter. Exemplars are the first ``num_fewshot`` validation questions of the same category.
When the validation split is unavailable (the shared data has only the test split), exemplars
are the first five test questions of each category, in file order, and those questions are
excluded from scoring; they have no written-out reasoning, only "The answer is (X).". The
task's notes, copied into every report, say which source was used.

``mmlu_pro_mc``: the same questions scored by log-likelihood of the answer letter after
``Answer:`` (no generation), for small models. ``mmlu_pro_loglik``: log-likelihood per byte
of the gold option's text after ``Question: {q}\\nAnswer:``.

Overall accuracy is over all scored questions, i.e. per-category accuracy weighted by size.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

from hf_nvfp4.eval.data import DataSource, DataUnavailableError, Record, load_split
from hf_nvfp4.eval.tasks.base import Item, LoglikTask, Task, TaskData, weighted_mean

CHOICES = "ABCDEFGHIJ"
FEWSHOT_POOL = 5  # questions per category held out as exemplars when validation is absent
_ANSWER_IS = re.compile(r"answer is \(?([A-J])\)?")
_ANSWER_COLON = re.compile(r".*[aA]nswer:\s*([A-J])")
_LAST_LETTER = re.compile(r"\b[A-J]\b(?!.*\b[A-J]\b)", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """The chosen letter A-J, or None: "answer is (X)", then "Answer: X", then last letter."""
    for pattern in (_ANSWER_IS, _ANSWER_COLON):
        match = pattern.search(text)
        if match:
            return match.group(1)
    match = _LAST_LETTER.search(text)
    return match.group(0) if match else None


def clean(doc: Record) -> Record:
    """Drop the "N/A" padding options, as the benchmark's own evaluation does."""
    options = [opt for opt in doc["options"] if opt != "N/A"]
    if doc["answer_index"] >= len(options):
        raise ValueError(f"MMLU-Pro question {doc['question_id']}: answer beyond options")
    return {**doc, "options": options}


def format_question(doc: Record) -> str:
    """``Question:\\n{q}\\nOptions:\\nA. ...\\n`` with one line per option."""
    lines = [f"{CHOICES[i]}. {opt}" for i, opt in enumerate(doc["options"])]
    return "Question:\n" + doc["question"] + "\nOptions:\n" + "\n".join(lines) + "\n"


def cot_exemplar(doc: Record) -> str:
    """A solved exemplar: its reasoning when the record has one, else the bare answer."""
    cot = doc.get("cot_content")
    if cot:
        cot = cot.replace("A: Let's think step by step.", "Answer: Let's think step by step.")
    else:
        cot = f"Answer: Let's think step by step. The answer is ({doc['answer']})."
    return format_question(doc) + cot + "\n\n"


def cot_context(exemplars: Sequence[Record], doc: Record) -> str:
    """The benchmark's chain-of-thought prompt for ``doc``."""
    head = (
        f"The following are multiple choice questions (with answers) about {doc['category']}. "
        'Think step by step and then finish your answer with "the answer is (X)" where X is '
        "the correct letter choice.\n\n"
    )
    shots = "".join(cot_exemplar(e) for e in exemplars)
    return head + shots + format_question(doc) + "Answer: Let's think step by step."


def choice_context(exemplars: Sequence[Record], doc: Record) -> str:
    """Multiple-choice prompt ending in ``Answer:``; exemplars end in ``Answer: X``."""
    head = f"The following are multiple choice questions (with answers) about {doc['category']}."
    head += "\n\n"
    shots = "".join(f"{format_question(e)}Answer: {e['answer']}\n\n" for e in exemplars)
    return head + shots + format_question(doc) + "Answer:"


def cloze_context(exemplars: Sequence[Record], doc: Record) -> str:
    """``Question: {q}\\nAnswer:`` with exemplars answered by their gold option's text."""
    shots = "".join(
        f"Question: {e['question']}\nAnswer: {e['options'][e['answer_index']]}\n\n"
        for e in exemplars
    )
    return shots + f"Question: {doc['question']}\nAnswer:"


def split_fewshot(
    source: DataSource, num_fewshot: int
) -> tuple[dict[str, list[Record]], list[Record], str]:
    """Exemplars per category, the questions to score, and a note on where exemplars came from."""
    test = [clean(d) for d in load_split("mmlu_pro", "test", source)]
    by_category: dict[str, list[Record]] = defaultdict(list)
    try:
        for doc in load_split("mmlu_pro", "validation", source):
            by_category[doc["category"]].append(clean(doc))
    except DataUnavailableError:
        if num_fewshot > FEWSHOT_POOL:
            raise ValueError(
                f"num_fewshot must be <= {FEWSHOT_POOL} without the validation split; "
                f"got {num_fewshot}"
            ) from None
        held_out = set()
        for doc in test:
            if len(by_category[doc["category"]]) < FEWSHOT_POOL:
                by_category[doc["category"]].append(doc)
                held_out.add(doc["question_id"])
        test = [d for d in test if d["question_id"] not in held_out]
        note = (
            f"MMLU-Pro validation split unavailable: {num_fewshot}-shot exemplars are the "
            f"first {num_fewshot} test questions of each category (without written-out "
            f"reasoning); the first {FEWSHOT_POOL} of each category are excluded from scoring"
        )
    else:
        note = f"{num_fewshot}-shot exemplars: the first of each category in the validation split"
    exemplars = {cat: docs[:num_fewshot] for cat, docs in by_category.items()}
    return exemplars, test, note


def stratified(docs: Sequence[Record], limit: int | None) -> list[Record]:
    """All docs, or ``limit`` of them taken round-robin over categories (sorted by name)."""
    if limit is None:
        return list(docs)
    if limit <= 0:
        raise ValueError(f"limit must be a positive number of items; got {limit}")
    queues: dict[str, list[Record]] = defaultdict(list)
    for doc in docs:
        queues[doc["category"]].append(doc)
    order = sorted(queues)
    picked: list[Record] = []
    depth = 0
    while len(picked) < limit and any(depth < len(queues[c]) for c in order):
        picked += [queues[c][depth] for c in order if depth < len(queues[c])]
        depth += 1
    return picked[:limit]


def _build(source, limit, num_fewshot, default, make_context) -> tuple[list[Item], list[str]]:
    shots = default if num_fewshot is None else num_fewshot
    exemplars, test, note = split_fewshot(source, shots)
    items = []
    for doc in stratified(test, limit):
        items.append(
            {
                "id": f"mmlu_pro/{doc['question_id']}",
                "category": doc["category"],
                "question": doc["question"],
                "options": doc["options"],
                "answer": doc["answer"],
                "answer_index": doc["answer_index"],
                "context": make_context(exemplars.get(doc["category"], []), doc),
            }
        )
    return items, [note]


def _category_metrics(records: Sequence[Record], metric: str) -> dict[str, float]:
    by_category: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_category[r["category"]].append(r)
    out = {metric: weighted_mean(records)}
    for cat in sorted(by_category):
        out[f"{metric}/{cat}"] = weighted_mean(by_category[cat])
    return out


class MMLUPro(Task):
    """Chain-of-thought generation; accuracy overall and per category."""

    name = "mmlu_pro"
    kind = "generate"
    metric = "accuracy"
    stop = ("Question:",)
    default_max_new_tokens = 2048
    default_num_fewshot = 5

    def build(self, source: DataSource, limit: int | None, num_fewshot: int | None) -> TaskData:
        """Scored questions with chain-of-thought prompts; ``limit`` spread over categories."""
        return TaskData(*_build(source, limit, num_fewshot, self.default_num_fewshot, cot_context))

    def score(self, items: Sequence[Item], outputs: Sequence[list[str]]) -> list[Record]:
        """Extract the letter from the first completion and compare it with the gold."""
        records = []
        for item, completions in zip(items, outputs, strict=True):
            pred = extract_answer(completions[0])
            records.append(
                {
                    "id": item["id"],
                    "category": item["category"],
                    "gold": item["answer"],
                    "completion": completions[0],
                    "pred": pred,
                    "value": float(pred == item["answer"]),
                }
            )
        return records

    def aggregate(self, records: Sequence[Record]) -> dict[str, float]:
        """Overall accuracy (weighted by category size) and accuracy per category."""
        return _category_metrics(records, self.metric)


class MMLUProChoice(Task):
    """Multiple choice by log-likelihood of the letters; no generation, fast, for small models."""

    name = "mmlu_pro_mc"
    kind = "choice"
    metric = "accuracy"
    default_num_fewshot = 5

    def build(self, source: DataSource, limit: int | None, num_fewshot: int | None) -> TaskData:
        """Questions with prompts ending in ``Answer:``; choices `` A`` ... `` J``."""
        items, notes = _build(source, limit, num_fewshot, self.default_num_fewshot, choice_context)
        for item in items:
            item["choices"] = [f" {CHOICES[i]}" for i in range(len(item["options"]))]
        return TaskData(items, notes)

    def score(self, items: Sequence[Item], outputs: Sequence[list[float]]) -> list[Record]:
        """The most likely letter is the prediction."""
        records = []
        for item, logprobs in zip(items, outputs, strict=True):
            best = max(range(len(logprobs)), key=logprobs.__getitem__)
            records.append(
                {
                    "id": item["id"],
                    "category": item["category"],
                    "gold": item["answer"],
                    "pred": CHOICES[best],
                    "logprobs": [round(lp, 4) for lp in logprobs],
                    "value": float(best == item["answer_index"]),
                }
            )
        return records

    def aggregate(self, records: Sequence[Record]) -> dict[str, float]:
        """Overall accuracy (weighted by category size) and accuracy per category."""
        return _category_metrics(records, self.metric)


class MMLUProLoglik(LoglikTask):
    """Log-likelihood per byte of the gold option's text (cloze style)."""

    name = "mmlu_pro_loglik"
    default_num_fewshot = 5

    def build(self, source: DataSource, limit: int | None, num_fewshot: int | None) -> TaskData:
        """Questions whose continuation is ``" " + gold option``."""
        items, notes = _build(source, limit, num_fewshot, self.default_num_fewshot, cloze_context)
        for item in items:
            item["continuation"] = " " + item["options"][item["answer_index"]]
        return TaskData(items, notes)
