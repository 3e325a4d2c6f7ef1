"""examples/finetune.py end to end on a tiny saved Llama (CPU, in process)."""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_nvfp4 import NVFP4Linear
from hf_nvfp4.data import stdlib_corpus, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import finetune  # noqa: E402


def test_finetune_example(tmp_path):
    tok = train_tokenizer(stdlib_corpus(100_000), 300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64,
                                         intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    finetune.main(["--model", str(tmp_path / "base"), "--steps", "3", "--seq", "32",
                   "--batch", "2", "--corpus-bytes", "40000", "--cpu",
                   "--nvfp4", "true", "--out", str(tmp_path / "out")])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "hf_nvfp4"
    tuned = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert any(isinstance(m, NVFP4Linear) for m in tuned.modules())
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight,
                           base.model.layers[0].mlp.up_proj.weight)
