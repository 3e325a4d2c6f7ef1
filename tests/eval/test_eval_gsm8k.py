"""GSM8K: extraction and normalisation as lm-evaluation-harness, gold solutions score 100%."""

from __future__ import annotations

import pytest

from hf_nvfp4.eval.data import DataSource, load_split
from hf_nvfp4.eval.tasks.gsm8k import (
    GSM8K,
    INVALID,
    build_context,
    extract_flexible,
    extract_strict,
    normalize,
)


@pytest.mark.parametrize("split", ["test", "train"])
def test_gold_solutions_score_100_percent(shared_data, split):
    docs = load_split("gsm8k", split, DataSource(shared_data, use_hub=False))
    assert len(docs) == {"test": 1319, "train": 7473}[split]
    items = [
        {"id": str(i), "question": d["question"], "answer": d["answer"]} for i, d in enumerate(docs)
    ]
    records = GSM8K().score(items, [[d["answer"]] for d in docs])
    metrics = GSM8K().aggregate(records)
    assert metrics == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}


@pytest.mark.parametrize(
    ("completion", "strict", "flexible"),
    [
        (
            " Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72"
            " clips altogether in April and May.\n#### 72",
            "72",
            "72",
        ),
        (
            " She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18\n\n",
            "18",
            "18",
        ),
        (" So she makes 9 * 2 = $18 every day.", INVALID, "$18"),
        (" The total is 1,200 + 300 = 1,500.\n#### 1,500", "1,500", "1,500"),
        (" The temperature dropped to -5 degrees.\n#### -5", "-5", "-5"),
        (" I am not sure.", INVALID, INVALID),
        (" #### 3.50.", "3.50.", "3.50."),
    ],
)
def test_extraction_on_realistic_outputs(completion, strict, flexible):
    assert extract_strict(completion) == strict
    assert extract_flexible(completion) == flexible


def test_normalisation_matches_harness():
    gold = normalize("She has 1,000 + 500 = <<1000+500=1500>>1,500 dollars.\n#### 1,500")
    assert gold == "1500"
    assert normalize("$1,500.") == gold
    assert normalize(extract_flexible(" so she pays $1,500.")) == gold
    assert normalize("1500.0") != gold  # exact match, not numeric equality (as the harness)


def test_scoring_strict_vs_flexible():
    item = {"id": "x", "question": "q", "answer": "2 + 2 = 4\n#### 4"}
    outputs = [[" 2 + 2 is 4."], [" 2 + 2 = 4\n#### 4"], [" 5\n#### 5"]]
    records = GSM8K().score([item] * 3, outputs)
    assert [(r["correct_strict"], r["correct_flexible"]) for r in records] == [
        (False, True),
        (True, True),
        (False, False),
    ]
    assert records[0]["value"] == 0.0 and records[1]["value"] == 1.0


def test_prompt_format():
    shots = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}]
    assert build_context(shots, "2+2?") == (
        "Question: 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: 2+2?\nAnswer:"
    )


def test_build_uses_first_train_problems(tiny_data):
    data = GSM8K().build(DataSource(tiny_data, use_hub=False), limit=2, num_fewshot=2)
    assert len(data.items) == 2
    context = data.items[0]["context"]
    assert context.count("Question:") == 3 and context.endswith("Answer:")
    assert "Tom has 1 apples" in context and "Tom has 6 apples" in context
    assert data.notes == ["2-shot: the first 2 train problems"]
