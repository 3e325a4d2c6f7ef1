"""Worker for test_fsdp2.py: NVFP4 training of a tiny Llama under FSDP2 (`fully_shard`), gloo.

Launched by ``torch.distributed.run``. Trains ``--steps`` steps on a fixed global batch
schedule split across ranks, optionally saves a sharded checkpoint (torch.distributed.checkpoint)
after ``--save-at`` steps or resumes from one, and writes the losses, a weight checksum and the
bytes FSDP2 all-gathered per step. ``--quantized-gather`` all-gathers the NVFP4 weights as codes
(``NVFP4Config(fsdp_quantized_all_gather=True)``).
"""

import argparse
import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from hf_nvfp4 import NVFP4Config, convert
from hf_nvfp4.quant.fsdp import master_tensor

GLOBAL_BATCH, SEQ, VOCAB = 4, 32, 256


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-at", type=int, default=None)
    p.add_argument("--resume-from", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--quantized-gather", action="store_true")
    args = p.parse_args()
    gathered = [0]
    all_gather_single = dist.all_gather_single

    def counting_all_gather(output, *a, **kw):
        gathered[0] += output.numel() * output.element_size()
        return all_gather_single(output, *a, **kw)

    dist.all_gather_single = counting_all_gather
    dist.init_process_group("gloo")
    metrics = train(args, gathered)
    if dist.get_rank() == 0:
        out = Path(args.out) / "metrics.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics))
    # FSDP's state (the model, optimizer and state dicts of train(), gone now) holds the group
    # and its collectives' tensors: collected before the group is destroyed, since a gloo
    # group torn down at interpreter exit can abort (torch 2.13; see examples/pretrain.py).
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def train(args: argparse.Namespace, gathered: list[int]) -> dict:
    """Train per ``args``; the metrics (rank 0 writes them). ``gathered[0]`` counts the bytes
    FSDP2 all-gathers."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ))
    convert(model, NVFP4Config(
        backend="reference", first_bf16_blocks=0, last_bf16_blocks=0, reduce_amax=True,
        recipe={"preset": "nvfp4", "stochastic_rounding": False},
        fsdp_quantized_all_gather=args.quantized_gather))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    start = 0
    if args.resume_from:
        model_sd, opt_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": opt_sd}
        dcp.load(state, checkpoint_id=args.resume_from)
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        start = json.loads((Path(args.resume_from) / "step.json").read_text())["step"]
    # Two batches in turn, so the loss falls.
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, VOCAB, (2, GLOBAL_BATCH, SEQ), generator=gen)
    per_rank = GLOBAL_BATCH // world
    losses, gathered_per_step = [], []
    for step in range(start, args.steps):
        gathered[0] = 0
        batch = data[step % 2, rank * per_rank:(rank + 1) * per_rank]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        gathered_per_step.append(gathered[0])
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if args.save_at is not None and step + 1 == args.save_at:
            model_sd, opt_sd = get_state_dict(model, opt)
            ckpt = Path(args.out) / f"step-{step + 1}"
            dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=str(ckpt))
            if rank == 0:
                (ckpt / "step.json").write_text(json.dumps({"step": step + 1}))
            dist.barrier()
    local = torch.stack([master_tensor(p.to_local()).double().sum() for p in model.parameters()])
    dist.all_reduce(local)
    checksum = local.sum().item()
    return {"losses": losses, "checksum": checksum, "world": world,
            "gathered_bytes_per_step": gathered_per_step}

if __name__ == "__main__":
    main()
