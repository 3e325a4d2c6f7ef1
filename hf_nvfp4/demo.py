"""The main job on a built-in default: pretrain a small Llama in BF16 and in NVFP4, compare.

``python -m hf_nvfp4.demo`` (``make demo``) trains the same model from scratch, same data
order and seed, on the Python standard library's own sources (text every machine has), once
in high precision (BF16 on a GPU, FP32 on a CPU, and labelled so) and once with
``hf_nvfp4.Trainer(nvfp4=True)``; prints a side-by-side table, saves loss curves as PNG and
the NVFP4 model as a checkpoint, reloads it and generates a sample. Sizes adapt to the
device: CPU (about 4 minutes on 2 cores; NVFP4 is emulated there, about 7-8x slower than the
baseline) or GPU. Each run trains in its own process, so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .checkpoint import save_packed
from .config import NVFP4Config
from .data import BlockDataset, split_blocks, stdlib_corpus, train_tokenizer
from .trainer import NVFP4Trainer, NVFP4TrainingArguments


@dataclass
class DemoSize:
    """Model and run sizes for one device class."""

    hidden: int
    layers: int
    heads: int
    seq: int
    batch: int
    steps: int
    corpus_bytes: int
    vocab: int


CPU = DemoSize(hidden=128, layers=4, heads=4, seq=128, batch=8, steps=200,
               corpus_bytes=1_500_000, vocab=2048)
GPU = DemoSize(hidden=512, layers=8, heads=8, seq=256, batch=16, steps=300,
               corpus_bytes=4_000_000, vocab=8192)


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Progress(TrainerCallback):
    """One tqdm bar per run that redraws to the terminal's width (Trainer's bar does not)."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, dynamic_ncols=True, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def _train(name, nvfp4, size, tokenizer_dir, train, val, save_dir, device) -> dict:
    """Train one run in this process, save its model to ``save_dir``; plain results."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PrinterCallback

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.hidden * 3,
        num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.heads, max_position_embeddings=size.seq,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    scratch = tempfile.TemporaryDirectory(prefix="hf_nvfp4_demo_")  # nothing is saved there
    args = NVFP4TrainingArguments(
        output_dir=scratch.name, max_steps=size.steps,
        per_device_train_batch_size=size.batch, per_device_eval_batch_size=size.batch,
        learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=max(1, size.steps // 20),
        weight_decay=0.1, logging_steps=max(1, size.steps // 40), eval_strategy="no",
        save_strategy="no", report_to=[], seed=0, data_seed=0, bf16=device == "cuda",
        use_cpu=device == "cpu", dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = NVFP4Trainer(
        model=model, args=args, nvfp4=nvfp4, train_dataset=BlockDataset(train),
        eval_dataset=BlockDataset(val), callbacks=[_Progress(name)],
    )
    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    val_loss = trainer.evaluate()["eval_loss"]
    curve = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    if nvfp4:
        save_packed(trainer.model, save_dir, tokenizer=tokenizer)
    else:
        trainer.save_model(str(save_dir))
        tokenizer.save_pretrained(str(save_dir))
    scratch.cleanup()
    return {
        "name": name, "train_loss": curve[-1][1] if curve else None,
        "val_loss": val_loss, "avg_train_loss": result.training_loss,
        "tokens_per_s": size.steps * size.batch * size.seq / seconds, "seconds": seconds,
        "peak_memory_mb": _peak_memory_mb(device), "curve": curve,
    }


def _train_in_own_process(*args) -> dict:
    """:func:`_train` in a fresh process: peak memory (a process maximum) is this run's own."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_train, *args).result()


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        steps, losses = zip(*r["curve"], strict=True)
        ax.plot(steps, losses, label=f"{r['name']} (val {r['val_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    names = " vs ".join(r["name"].upper() for r in runs)
    ax.set_title(f"Llama pretraining on Python stdlib sources: {names}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(runs: list[dict], device: str) -> str:
    base = runs[0]
    memory = "peak CUDA mem (MB)" if device == "cuda" else "peak RSS of its process (MB)"
    lines = [
        f"| run | final train loss | val loss | rel. val gap | tokens/s | {memory} |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        gap = (r["val_loss"] - base["val_loss"]) / base["val_loss"] * 100
        lines.append(
            f"| {r['name']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {gap:+.2f}% | "
            f"{r['tokens_per_s']:,.0f} | {r['peak_memory_mb']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None, size: DemoSize | None = None) -> dict:
    """Run the demo; returns the results dict also written to ``<out>/results.json``.

    ``size`` overrides the device's default sizes (tests use a tiny one).
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/demo", help="output directory")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps")
    args = p.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    size = size or (GPU if device == "cuda" else CPU)
    if args.steps is not None:
        size.steps = args.steps
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print(f"[demo] device={device}; building the corpus from the Python standard library")
    text = stdlib_corpus(size.corpus_bytes)
    tokenizer = train_tokenizer(text, size.vocab)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    train, val = split_blocks(ids, size.seq, val_fraction=0.05)
    val = val[torch.linspace(0, len(val) - 1, min(len(val), 8 * size.batch)).long()]
    print(f"[demo] {len(text):,} characters -> {ids.numel():,} tokens; "
          f"{train.shape[0]} train / {val.shape[0]} val blocks of {size.seq}")

    # What the baseline really computes in: BF16 autocast on a GPU, plain FP32 on a CPU.
    base = "bf16" if device == "cuda" else "fp32"
    base_dir, packed_dir = out / f"{base}_model", out / "nvfp4_packed"
    with tempfile.TemporaryDirectory(prefix="hf_nvfp4_demo_tok_") as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        emulated = "" if device == "cuda" else (
            "; NVFP4 is emulated on the CPU, expect it about 7-8x slower than the baseline")
        print(f"[demo] run 1/2: {base.upper()} baseline (high precision), {size.steps} steps")
        first = _train_in_own_process(base, False, size, tok_dir, train, val, base_dir, device)
        print(f"[demo] run 2/2: NVFP4 (paper recipe), {size.steps} steps{emulated}")
        second = _train_in_own_process("nvfp4", NVFP4Config(), size, tok_dir, train, val,
                                       packed_dir, device)
    runs = [first, second]
    table = _table(runs, device)
    print("\n" + table + "\n")
    _plot(runs, out / "loss_curves.png")

    sizes = {d.name: _dir_bytes(d) for d in (base_dir, packed_dir)}
    print(f"[demo] checkpoints: {base.upper()} {sizes[base_dir.name]:,} bytes (FP32 masters), "
          f"NVFP4 packed {sizes[packed_dir.name]:,} bytes")
    sample = _reload_and_generate(packed_dir, device)
    print(f"[demo] reloaded the packed NVFP4 checkpoint {packed_dir}; sample:\n{sample}\n")

    results = {
        "device": device,
        "size": size.__dict__,
        "runs": runs,
        "table": table,
        "checkpoint_bytes": sizes,
        "sample": sample,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"[demo] wrote {out / 'results.json'} and {out / 'loss_curves.png'}")
    return results


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _reload_and_generate(path: Path, device: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()
    prompt = "def "
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48, do_sample=True, temperature=0.8,
                             top_k=40, repetition_penalty=1.3, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0])


if __name__ == "__main__":
    main()
