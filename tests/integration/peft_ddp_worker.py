"""LoRA on a packed NVFP4 model under two-process DDP (gloo, CPU); run by test_peft.py.

Usage: torchrun --nproc_per_node 2 peft_ddp_worker.py PACKED_CHECKPOINT OUT_DIR
"""

import faulthandler
import json
import os
import sys

import peft
import torch

from hf_nvfp4 import NVFP4Trainer, NVFP4TrainingArguments
from hf_nvfp4.checkpoint import load_packed
from hf_nvfp4.data import BlockDataset, byte_tokens, split_blocks, stdlib_corpus
from hf_nvfp4.lora import lora_config


def main(packed: str, out: str) -> None:
    # A hang (seen twice under CI's xdist, never by hand) prints every thread's stack and
    # exits, so the test fails with where it stuck instead of at its timeout.
    faulthandler.dump_traceback_later(240, exit=True)
    torch.manual_seed(1)
    model = peft.get_peft_model(load_packed(packed), lora_config(peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj"],
        lora_dropout=0.0)))
    train, _ = split_blocks(byte_tokens(stdlib_corpus(60_000)), 32)
    args = NVFP4TrainingArguments(
        output_dir=out, per_device_train_batch_size=2, max_steps=3, learning_rate=3e-3,
        report_to=[], use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True,
        logging_steps=1)
    trainer = NVFP4Trainer(model=model, args=args, train_dataset=BlockDataset(train[:64]))
    trainer.train()
    rank = int(os.environ["RANK"])
    adapters = {n: p.detach().double().sum().item() for n, p in model.named_parameters()
                if p.requires_grad}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"adapters": adapters, "losses": losses,
                   "world_size": trainer.accelerator.num_processes}, f)
    # Leave without tearing gloo down: destroying the group after hf_nvfp4.Trainer's
    # collectives deadlocked about once in seven runs under CI's xdist (rank 0 stuck in
    # accelerator.end_training(); faulthandler's stacks), the exit-time deadlock of gloo's
    # worker thread and the GIL that examples/pretrain.py avoids by holding its last
    # collective's handle, which the Trainer does not expose. The barrier makes both ranks'
    # collectives complete first; what is tested is written above.
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
