"""Fixtures for the eval tests: shared benchmark data (if present) and tiny random models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED_DATA_ENV = "HF_NVFP4_SHARED_DATA"


def shared_data_dir() -> Path | None:
    """The project's shared benchmark data: ``$HF_NVFP4_SHARED_DATA`` or ``../shared/data``."""
    env = os.environ.get(SHARED_DATA_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    return path.resolve() if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Skip unless the shared data directory exists (a user's clone has none)."""
    path = shared_data_dir()
    if path is None:
        pytest.skip(f"shared benchmark data absent (set {SHARED_DATA_ENV} or add ../shared/data)")
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A synthetic data directory in the shared layout (no third-party data)."""
    root = tmp_path_factory.mktemp("data")
    gsm = [
        {
            "question": f"Tom has {i} apples and buys {i + 1} more. How many now?",
            "answer": f"{i} + {i + 1} = <<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1}\n#### {2 * i + 1}",
        }
        for i in range(1, 9)
    ]
    _write_jsonl(root / "gsm8k" / "train.jsonl", gsm[:5])
    _write_jsonl(root / "gsm8k" / "test.jsonl", gsm[5:])
    mmlu = []
    for qid, cat in enumerate(["math", "law"] * 8):
        options = [f"{qid + k}" for k in range(4)] + ["N/A"]
        mmlu.append(
            {
                "question_id": qid,
                "question": f"What is {qid} + 1?",
                "options": options,
                "answer": "B",
                "answer_index": 1,
                "category": cat,
                "src": "synthetic",
            }
        )
    _write_jsonl(root / "mmlu_pro" / "test.jsonl", mmlu)
    humaneval = [
        {
            "task_id": f"Toy/{i}",
            "prompt": f'def add{i}(x):\n    """Add {i}."""\n',
            "canonical_solution": f"    return x + {i}\n",
            "test": f"def check(f):\n    assert f(1) == {i + 1}\n",
            "entry_point": f"add{i}",
        }
        for i in range(4)
    ]
    _write_jsonl(root / "humaneval" / "test.jsonl", humaneval)
    return root


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny random Llama checkpoints (2 layers, hidden 64) with a byte-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_tokenizer()
    paths = {}
    for seed, name in enumerate(("base", "other")):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        path = tmp_path_factory.mktemp(name)
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths
