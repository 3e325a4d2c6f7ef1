"""Data loading: local directory first, bundled HumanEval, clear error when nothing is there."""

from __future__ import annotations

import gzip
import json

import pytest

from hf_nvfp4.eval.data import DataSource, DataUnavailableError, load_split, read_jsonl


def test_local_directory_is_used(tiny_data):
    docs = load_split("gsm8k", "test", DataSource(tiny_data, use_hub=False))
    assert len(docs) == 3 and docs[0]["answer"].endswith("#### 13")


def test_gzip_jsonl(tmp_path):
    path = tmp_path / "gsm8k" / "test.jsonl.gz"
    path.parent.mkdir()
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    assert read_jsonl(path) == [{"question": "q", "answer": "#### 1"}]
    assert load_split("gsm8k", "test", DataSource(tmp_path, use_hub=False))[0]["question"] == "q"


def test_missing_data_offline_names_what_was_tried(tmp_path):
    with pytest.raises(DataUnavailableError) as err:
        load_split("mmlu_pro", "validation", DataSource(tmp_path, use_hub=False))
    message = str(err.value)
    assert "mmlu_pro split 'validation'" in message
    assert str(tmp_path / "mmlu_pro" / "validation") in message
    assert "hub: disabled (offline)" in message


def test_unknown_benchmark():
    with pytest.raises(ValueError, match="benchmark must be one of"):
        load_split("arc", "test", DataSource())


def test_shared_layout(shared_data):
    source = DataSource(shared_data, use_hub=False)
    test = load_split("mmlu_pro", "test", source)
    assert len(test) == 12032
    assert {"question_id", "question", "options", "answer", "answer_index", "category"} <= set(
        test[0]
    )
    assert len({d["category"] for d in test}) == 14
