"""Fine-tune a pretrained causal LM in NVFP4 with ``hf_nvfp4.Trainer``.

    python examples/finetune.py --model PATH_OR_HUB_ID --text-files notes.txt --nvfp4 true
    HF_NVFP4_RECIPE=integrations/accelerate/nvfp4_recipe.yaml \\
        accelerate launch --config_file integrations/accelerate/ddp.yaml \\
        examples/finetune.py --model PATH --dataset NAME

The model loads with ``quantization_config=NVFP4Config(...)`` (weights into NVFP4Linear
layers, full training, no adapters); the result is saved with ``save_pretrained`` and
reloads as an NVFP4 model after ``import hf_nvfp4``. Without --text-files/--dataset the
Python standard library's sources are the training text.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_nvfp4 import NVFP4Trainer, NVFP4TrainingArguments
from hf_nvfp4.config import RECIPE_ENV, resolve_nvfp4
from hf_nvfp4.data import BlockDataset, load_text, split_blocks


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, fine-tune, save."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a causal-LM checkpoint path or Hub id")
    p.add_argument("--dataset")
    p.add_argument("--dataset-config")
    p.add_argument("--text-column", default="text")
    p.add_argument("--max-docs", type=int, default=100_000)
    p.add_argument("--text-files", nargs="*")
    p.add_argument("--corpus-bytes", type=int, default=1_000_000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--nvfp4", default=None,
                   help="true | preset | recipe file (default: $HF_NVFP4_RECIPE, else true)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--out", default="outputs/finetune")
    args = p.parse_args(argv)

    config = resolve_nvfp4(args.nvfp4 or os.environ.get(RECIPE_ENV) or "true")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=config)
    text = load_text(args.dataset, args.dataset_config, args.text_column, args.max_docs,
                     args.text_files, args.corpus_bytes)
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    train, val = split_blocks(ids, args.seq)
    targs = NVFP4TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch, learning_rate=args.lr, warmup_steps=10,
        lr_scheduler_type="cosine", logging_steps=10, eval_strategy="no", save_strategy="no",
        report_to=[], bf16=args.bf16, use_cpu=args.cpu,
    )
    trainer = NVFP4Trainer(model=model, args=targs, train_dataset=BlockDataset(train),
                           eval_dataset=BlockDataset(val[:64]))
    trainer.train()
    print(f"validation loss: {trainer.evaluate()['eval_loss']:.4f}")
    trainer.save_model(args.out)
    tok.save_pretrained(args.out)
    # Under `accelerate launch`, tear the process group down before interpreter exit.
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
