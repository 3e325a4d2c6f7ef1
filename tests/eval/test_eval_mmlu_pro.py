"""MMLU-Pro: answer extraction with the benchmark's fallbacks, few-shot split, prompts."""

from __future__ import annotations

from collections import Counter

import pytest

from hf_nvfp4.eval.data import DataSource
from hf_nvfp4.eval.tasks.mmlu_pro import (
    FEWSHOT_POOL,
    MMLUPro,
    MMLUProChoice,
    clean,
    cot_context,
    extract_answer,
    split_fewshot,
    stratified,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" The demand curve shifts right, so price rises. The answer is (C).", "C"),
        (" Net force is 12 N over 4 kg, 3 m/s^2. the answer is J", "J"),
        (" First the answer is (A)... on reflection the answer is (B).", "A"),
        (" Momentum is conserved.\nAnswer: D\n", "D"),
        (" Let me work it out.\nFinal answer: (E)", "E"),
        (" Options B and G are wrong; we are left with\nH", "H"),
        (" It could be A, although I lean to F in the end", "F"),
        (" We cannot determine it from the information given.", None),
        (" I cannot tell.", "I"),  # the benchmark's last-letter fallback takes the pronoun
        (" The answer is (K).", None),
    ],
)
def test_extraction_with_fallbacks(text, expected):
    assert extract_answer(text) == expected


def test_clean_drops_na_options():
    doc = {"question_id": 1, "options": ["x", "y", "N/A", "N/A"], "answer_index": 1}
    assert clean(doc)["options"] == ["x", "y"]
    with pytest.raises(ValueError, match="answer beyond options"):
        clean({"question_id": 2, "options": ["x", "N/A"], "answer_index": 1})


def test_cot_prompt_format():
    shot = {"question": "1+1?", "options": ["1", "2"], "answer": "B", "category": "math"}
    doc = {"question": "2+2?", "options": ["4", "5"], "answer": "A", "category": "math"}
    context = cot_context([shot], doc)
    assert context.startswith(
        "The following are multiple choice questions (with answers) about math. Think step by step"
    )
    shot_text = (
        "Question:\n1+1?\nOptions:\nA. 1\nB. 2\nAnswer: Let's think step by step. "
        "The answer is (B).\n\n"
    )
    assert shot_text in context
    assert context.endswith(
        "Question:\n2+2?\nOptions:\nA. 4\nB. 5\nAnswer: Let's think step by step."
    )


def test_fewshot_slice_is_excluded_from_scoring(shared_data):
    exemplars, scored, note = split_fewshot(DataSource(shared_data, use_hub=False), 5)
    assert len(exemplars) == 14
    assert all(len(docs) == FEWSHOT_POOL for docs in exemplars.values())
    held_out = {d["question_id"] for docs in exemplars.values() for d in docs}
    assert not held_out & {d["question_id"] for d in scored}
    assert len(scored) == 12032 - 14 * FEWSHOT_POOL
    assert "validation split unavailable" in note and "excluded from scoring" in note
    assert all(1 <= len(d["options"]) <= 10 and "N/A" not in d["options"] for d in scored)


def test_limit_is_spread_over_categories(shared_data):
    data = MMLUPro().build(DataSource(shared_data, use_hub=False), limit=28, num_fewshot=0)
    assert Counter(item["category"] for item in data.items) == Counter(
        {cat: 2 for cat in {item["category"] for item in data.items}}
    )
    assert len(data.items) == 28


def test_stratified_round_robin():
    docs = [{"category": c, "i": i} for i, c in enumerate("aaab")]
    assert [d["i"] for d in stratified(docs, 3)] == [0, 3, 1]
    assert len(stratified(docs, None)) == 4
    with pytest.raises(ValueError, match="limit must be"):
        stratified(docs, 0)


def test_score_and_per_category_accuracy(tiny_data):
    task = MMLUPro()
    data = task.build(DataSource(tiny_data, use_hub=False), limit=4, num_fewshot=1)
    outputs = [[" The answer is (B)."], [" The answer is (C)."], [" Answer: B"], [" ... B"]]
    records = task.score(data.items, outputs)
    metrics = task.aggregate(records)
    assert metrics["accuracy"] == 0.75
    assert metrics["accuracy/law"] + metrics["accuracy/math"] == 1.5


def test_choice_variant_scores_argmax(tiny_data):
    task = MMLUProChoice()
    data = task.build(DataSource(tiny_data, use_hub=False), limit=2, num_fewshot=0)
    assert data.items[0]["choices"] == [" A", " B", " C", " D"]  # "N/A" option dropped
    assert data.items[0]["context"].endswith("Answer:")
    records = task.score(data.items, [[-3.0, -1.0, -2.0, -4.0], [-1.0, -2.0, -3.0, -4.0]])
    assert [r["pred"] for r in records] == ["B", "A"]
    assert task.aggregate(records)["accuracy"] == 0.5
