"""End to end: a tiny Llama trained in NVFP4 on real text matches the same run in BF16.

Every block is quantized (no BF16 blocks), 200 AdamW steps on byte tokens of the standard
library's sources, reference backend on CPU. The two runs see identical batches and start
from identical weights; only the linear layers' numerics differ.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_nvfp4 import NVFP4Config, NVFP4Linear, convert
from hf_nvfp4.data import byte_tokens, split_blocks, stdlib_corpus

STEPS, BATCH, SEQ, LR = 200, 8, 64, 3e-3
VAL_BLOCKS = 128


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    train, val = split_blocks(byte_tokens(stdlib_corpus(max_bytes=400_000)), SEQ)
    return train, val[:VAL_BLOCKS]


def _train(data, quantized: bool) -> tuple[float, float]:
    """Train from a fixed init on fixed batches; (first training loss, validation loss)."""
    train, val = data
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
    ))
    if quantized:
        config = NVFP4Config(first_bf16_blocks=0, last_bf16_blocks=0, backend="reference")
        summary = convert(model, config, verbose=False)
        assert len(summary.quantized_layers) == 14
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    batches = torch.Generator().manual_seed(1)
    model.train()
    first_loss = None
    for _ in range(STEPS):
        ids = train[torch.randint(0, len(train), (BATCH,), generator=batches)]
        loss = model(input_ids=ids, labels=ids).loss
        first_loss = loss.item() if first_loss is None else first_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if quantized:
        assert all(m.sr_step == STEPS for m in model.modules() if isinstance(m, NVFP4Linear))
    model.eval()
    with torch.no_grad():
        val_loss = torch.stack([model(input_ids=v, labels=v).loss for v in val.split(32)]).mean()
    return first_loss, val_loss.item()


@pytest.mark.slow
def test_nvfp4_training_matches_bf16(data):
    # One thread: at these sizes a second one gains ~15%, and on a shared machine OpenMP
    # threads spinning on a busy core made the test several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first_bf16, val_bf16 = _train(data, quantized=False)
        first_nvfp4, val_nvfp4 = _train(data, quantized=True)
    finally:
        torch.set_num_threads(threads)

    # Same init and data: the first losses are ~ln(256) = 5.55 in both runs.
    assert first_bf16 == pytest.approx(5.55, abs=0.2)
    assert first_nvfp4 == pytest.approx(first_bf16, abs=0.02)
    # Both learned a lot (measured: 2.063 in BF16, 2.062 in NVFP4, from 5.60) ...
    assert val_bf16 < 0.6 * first_bf16
    assert val_nvfp4 < 0.6 * first_nvfp4
    # ... and NVFP4 ends within 3% of BF16.
    assert abs(val_nvfp4 - val_bf16) / val_bf16 < 0.03, (val_bf16, val_nvfp4)
