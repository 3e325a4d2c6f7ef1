"""Quantized layers whose weight the model uses outside their forward (hf_nvfp4.bypass)."""

import logging

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

import hf_nvfp4
from hf_nvfp4.bypass import bypassed_layers, forward_counts

ALL_NVFP4 = {"first_bf16_blocks": 0, "last_bf16_blocks": 0, "backend": "reference"}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(32, 32)
        self.read = nn.Linear(32, 32)  # its weight is multiplied directly
        self.idle = nn.Linear(32, 32)  # never used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x) + x @ self.read.weight.T


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_weight_used_outside_its_forward_is_named():
    """After a training backward, exactly the layers whose weight got a gradient without a
    forward of theirs are named; an unused layer and evaluation forwards are not."""
    torch.manual_seed(0)
    model = Stack()
    hf_nvfp4.convert(model, ALL_NVFP4, verbose=False)
    before = forward_counts(model)
    assert sorted(before) == sorted(f"layers.{i}.{n}" for i in (0, 1)
                                    for n in ("used", "read", "idle"))
    model(torch.randn(4, 32)).sum().backward()
    assert bypassed_layers(model, before) == ["layers.0.read", "layers.1.read"]
    again = forward_counts(model)
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 32))
    assert forward_counts(model) == again  # an evaluation forward counts for nothing
    model.zero_grad(set_to_none=True)
    model.train()
    model(torch.randn(4, 32)).sum().backward()  # the next training step: named as before
    assert bypassed_layers(model, again) == ["layers.0.read", "layers.1.read"]


def test_trainer_warns_about_mambas_dt_proj(tmp_path, caplog):
    """Mamba's mixer computes ``dt_proj.weight @ x``: NVFP4Trainer's first optimizer step
    warns naming those layers, and only those."""
    cfg = AutoConfig.for_model("mamba", vocab_size=128, hidden_size=64, state_size=16,
                               num_hidden_layers=2, time_step_rank=16, intermediate_size=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    rows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = hf_nvfp4.Trainer(model=model, args=args, nvfp4=ALL_NVFP4,
                               train_dataset=[{"input_ids": r, "labels": r} for r in rows])
    with caplog.at_level(logging.WARNING, logger="hf_nvfp4.bypass"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.name == "hf_nvfp4.bypass"]
    assert len(warnings) == 1
    assert "2 quantized layer(s) of MambaForCausalLM" in warnings[0]
    assert "backbone.layers.0.mixer.dt_proj, backbone.layers.1.mixer.dt_proj." in warnings[0]
