"""QuantizedAdamW with DTensor (FSDP2-style sharded) parameters and the HF Trainer."""

import pytest
import torch
from torch import nn

from hf_nvfp4.optim import QuantizedAdamW, param_groups


@pytest.fixture(scope="module")
def gloo_world():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    # An in-memory store: no TCP port that the multi-process tests' launchers could collide with.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_dtensor_params_update_their_local_shard_like_plain_tensors(gloo_world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 128, generator=gen)
    plain = nn.Parameter(w0.clone())
    sharded = nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(0)]))
    opts = [QuantizedAdamW([plain], lr=1e-2), QuantizedAdamW([sharded], lr=1e-2)]
    for _ in range(3):
        g = torch.randn(64, 128, generator=gen)
        plain.grad = g.clone()
        sharded.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        for opt in opts:
            opt.step()
    assert isinstance(sharded, DTensor)
    assert torch.equal(sharded.to_local(), plain.detach())
    state = opts[1].state[sharded]
    assert not isinstance(state["exp_avg_data"], DTensor)
    assert state["exp_avg_data"].dtype == torch.uint8


def test_trainer_runs_with_quantized_adamw(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (8, 16))
    data = [{"input_ids": r, "labels": r} for r in ids]
    opt = QuantizedAdamW(param_groups(model, weight_decay=0.01), lr=1e-3)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        max_grad_norm=1.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    after = model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(before, after)
    assert opt.state[after]["exp_avg_sq_data"].dtype == torch.uint8
