"""Worker for test_fsdp2.py: NVFP4 training of a tiny Llama under FSDP2 (`fully_shard`), gloo.

Launched by ``torch.distributed.run``. Trains ``--steps`` steps on a fixed global batch
schedule split across ranks, optionally saves a sharded checkpoint (torch.distributed.checkpoint)
after ``--save-at`` steps or resumes from one, and writes the losses and a weight checksum.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from hf_nvfp4 import NVFP4Config, convert

GLOBAL_BATCH, SEQ, VOCAB = 4, 32, 256


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-at", type=int, default=None)
    p.add_argument("--resume-from", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ))
    convert(model, NVFP4Config(
        backend="reference", first_bf16_blocks=0, last_bf16_blocks=0, reduce_amax=True,
        recipe={"preset": "nvfp4", "stochastic_rounding": False}))
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
    losses = []
    for step in range(start, args.steps):
        batch = data[step % 2, rank * per_rank:(rank + 1) * per_rank]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
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
    checksum = sum(p.full_tensor().double().sum().item() for p in model.parameters())
    if rank == 0:
        out = Path(args.out) / "metrics.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"losses": losses, "checksum": checksum, "world": world}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
