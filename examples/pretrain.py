"""Pretrain a causal LM from scratch in NVFP4 with Accelerate (any config, any text).

Single process:   python examples/pretrain.py --steps 200     (--nvfp4 false: the baseline)
With accelerate:  HF_NVFP4_RECIPE=integrations/accelerate/nvfp4_recipe.yaml \\
                  accelerate launch --config_file integrations/accelerate/ddp.yaml \\
                  examples/pretrain.py --steps 1000
CPU, 2 processes: torchrun --nproc_per_node 2 examples/pretrain.py --cpu --tiny
Fast on a GPU:    python examples/pretrain.py --compile reduce-overhead   (blocks in CUDA graphs)

Data: ``--dataset NAME`` (a Hub dataset with a ``text`` column, via ``datasets``),
``--text-files a.txt b.txt``, or by default the Python standard library's sources.
Model: ``--config PATH_OR_NAME`` (any causal-LM config) or a built-in small Llama.
Training is NVFP4 unless ``--nvfp4 false`` (or ``HF_NVFP4_RECIPE=false``); the trained model
is saved to ``<out>/model`` (FP32 masters with its NVFP4Config; ``--no-save`` skips it) and
the metrics to ``<out>/metrics.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from hf_nvfp4 import NVFP4Plugin
from hf_nvfp4.compile import compile_blocks, compiled_blocks_mode, step_begin, uses_cuda_graphs
from hf_nvfp4.config import RECIPE_ENV, resolve_nvfp4
from hf_nvfp4.data import byte_tokens, load_text, split_blocks

WARMUP_STEPS = 5  # excluded from tokens/s (kernel compilation, allocator warm-up)


def build_model(args: argparse.Namespace, vocab_size: int):
    """A causal LM from ``--config`` or a small Llama."""
    if args.config:
        cfg = AutoConfig.from_pretrained(args.config)
    else:
        h = 64 if args.tiny else args.hidden
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=h, intermediate_size=3 * h,
            num_hidden_layers=2 if args.tiny else args.layers, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=args.seq, tie_word_embeddings=False,
        )
    return AutoModelForCausalLM.from_config(cfg)


def gather_checksums(accelerator: Accelerator, checksum: float) -> tuple[list[float], object]:
    """Every rank's parameter checksum, and the handle of the collective that gathered them.

    The caller keeps the handle until the process group is destroyed. Otherwise gloo's worker
    thread may drop the last reference to the collective's Python tensors, which needs the GIL,
    just as the main thread, holding the GIL, joins that thread in the group's destructor: a
    deadlock at exit.
    """
    if accelerator.num_processes == 1:
        return [checksum], None
    local = torch.tensor([checksum], dtype=torch.float64, device=accelerator.device)
    parts = [torch.empty_like(local) for _ in range(accelerator.num_processes)]
    work = torch.distributed.all_gather(parts, local, async_op=True)
    work.wait()
    return [t.item() for t in parts], work


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, train, write ``<out>/metrics.json`` on the main process."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset")
    p.add_argument("--dataset-config")
    p.add_argument("--text-column", default="text")
    p.add_argument("--max-docs", type=int, default=100_000)
    p.add_argument("--text-files", nargs="*")
    p.add_argument("--corpus-bytes", type=int, default=2_000_000)
    p.add_argument("--config", help="a causal-LM config path or Hub name")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=None,
                   help="per-process batch size (default 8; 4 with --tiny)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--nvfp4", default=None,
                   help="true | false | preset | recipe file (default: $HF_NVFP4_RECIPE, "
                   "else true: the paper's NVFP4 recipe)")
    p.add_argument("--no-save", action="store_true", help="do not save the trained model")
    p.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model, 64 tokens")
    p.add_argument("--compile", default=None, metavar="MODE",
                   help="compile each decoder block with this torch.compile mode "
                        "(hf_nvfp4.compile_blocks); reduce-overhead (CUDA graphs) is the fast "
                        "one on a GPU")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/pretrain")
    p.add_argument("--save-state-at", type=int, default=None,
                   help="save the full training state (accelerator.save_state) at this step")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step (the schedule still spans --steps)")
    p.add_argument("--resume-from", default=None,
                   help="a directory written by --save-state-at: load it and continue")
    args = p.parse_args(argv)
    if args.tiny:
        args.seq, args.corpus_bytes = 64, 200_000
    if args.batch is None:
        args.batch = 4 if args.tiny else 8

    accelerator = Accelerator(cpu=args.cpu)
    config = resolve_nvfp4(args.nvfp4 or os.environ.get(RECIPE_ENV) or True)
    plugin = NVFP4Plugin(config) if config is not None else None
    if plugin is not None:
        plugin.apply(accelerator)
    set_seed(args.seed)

    ids = byte_tokens(load_text(args.dataset, args.dataset_config, args.text_column,
                                args.max_docs, args.text_files, args.corpus_bytes))
    train, _ = split_blocks(ids, args.seq)
    model = build_model(args, vocab_size=256)
    if args.compile:  # lazy: the blocks are traced at their first call, after conversion
        compile_blocks(model, args.compile, backend=args.compile_backend)
    graphs = uses_cuda_graphs(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    loader = torch.utils.data.DataLoader(
        train, batch_size=args.batch, shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    # The scheduler stays unprepared: Accelerate would step it once per process per step.
    model, opt, loader = accelerator.prepare(model, opt, loader)

    start = 0
    if args.resume_from:
        accelerator.register_for_checkpointing(sched)
        accelerator.load_state(args.resume_from)
        start = json.loads((Path(args.resume_from) / "step.json").read_text())["step"]
    losses: list[float] = []
    it = iter(loader)
    for _ in range(start % len(loader)):
        next(it)
    model.train()
    t0 = time.perf_counter()
    stop = args.steps if args.stop_at is None else args.stop_at
    for step in range(start, stop):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        if graphs:  # the previous step's graph outputs may now be overwritten
            step_begin()
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(accelerator.reduce(loss.detach().float(), reduction="mean").item())
        if step == start + WARMUP_STEPS - 1:
            t_warm = time.perf_counter()
        if args.save_state_at is not None and step + 1 == args.save_state_at:
            state_dir = Path(args.out) / f"state-{step + 1}"
            accelerator.register_for_checkpointing(sched)
            accelerator.save_state(str(state_dir))
            if accelerator.is_main_process:
                (state_dir / "step.json").write_text(json.dumps({"step": step + 1}))
    timed_steps = stop - start - WARMUP_STEPS
    if timed_steps > 0:
        seconds = time.perf_counter() - t_warm
    else:
        timed_steps, seconds = stop - start, time.perf_counter() - t0
    checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    checksums, last_work = gather_checksums(accelerator, checksum)
    # Every rank takes part (a collective under FSDP); the main process writes.
    state = None if args.no_save else accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        metrics = {
            "losses": losses, "first_step": start, "param_checksums": checksums,
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "tokens_per_s": timed_steps * args.batch * args.seq
            * accelerator.num_processes / seconds,
            "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20
            if torch.cuda.is_available() and not args.cpu else None,
            "nvfp4": plugin.config.to_dict() if plugin else None,
            "quantized_layers": len(plugin.summaries[0].quantized_layers) if plugin else 0,
            "compiled_blocks": compiled_blocks_mode(accelerator.unwrap_model(model)),
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"final loss {losses[-1]:.4f} over {accelerator.num_processes} process(es), "
              f"{'NVFP4' if plugin else 'high precision (--nvfp4 false)'}")
        if state is not None:
            accelerator.unwrap_model(model).save_pretrained(out / "model", state_dict=state)
            print(f"saved the trained model to {out / 'model'}")
    # Tear the process group down here, not at interpreter exit (where gloo's live worker
    # threads abort the process), and drop the DDP wrapper, whose reducer holds the group,
    # while `last_work` is still referenced (see gather_checksums).
    accelerator.end_training()
    accelerator.free_memory()
    del model, opt, loader, sched, state
    gc.collect()
    del last_work


if __name__ == "__main__":
    main()
