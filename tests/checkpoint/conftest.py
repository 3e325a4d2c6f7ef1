"""Fixtures for the checkpoint tests: a tiny real Llama converted to NVFP4."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_nvfp4
from hf_nvfp4 import NVFP4Config

VOCAB = 256


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint folder ``path`` (all its shards), by name."""
    from safetensors import safe_open

    from hf_nvfp4.checkpoint.shards import checkpoint_files

    out = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def tiny_llama(layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    """A random LlamaForCausalLM: hidden 64, intermediate 128, 4 heads (2 KV heads)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def nvfp4_llama(layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    """``tiny_llama`` converted: every block quantized except the last."""
    model = tiny_llama(layers, seed)
    config = NVFP4Config(backend="reference", first_bf16_blocks=0, last_bf16_blocks=1)
    hf_nvfp4.prepare_model(model, config)
    return model.eval()


@pytest.fixture
def model() -> LlamaForCausalLM:
    return nvfp4_llama()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
