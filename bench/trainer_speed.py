"""hf_nvfp4.Trainer's tokens/s on one device: eager against compiled decoder blocks, BF16
against NVFP4, the way a Trainer user runs it.

    python bench/trainer_speed.py --size 124m --out bench/results/trainer_124m_h200.json
    python bench/trainer_speed.py --size tiny --device cpu --steps 2 --warmup 1 \
        --compile-backend aot_eager --backend triton      # the CPU check (TRITON_INTERPRET=1)

Each column trains a fresh model (bench/e2e.py's Llama of ``--size``, FP32 master weights,
``bf16=True`` on CUDA) through ``NVFP4Trainer`` for ``--warmup`` + ``--steps`` optimizer
steps on random tokens; a callback times the steps after the warm-up between device
synchronizations. Columns: ``bf16_eager``, ``nvfp4_eager``, ``bf16_compiled``,
``nvfp4_compiled``; compiled = :func:`hf_nvfp4.compile_blocks` with ``--compile-mode``
(``reduce-overhead``, CUDA graphs, by default on CUDA), the Trainer marking each step.
Ratios are against BF16 eager and BF16 compiled of the same invocation.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import e2e  # noqa: E402

import hf_nvfp4  # noqa: E402
from hf_nvfp4 import NVFP4Trainer, NVFP4TrainingArguments  # noqa: E402

COLUMNS = ("bf16_eager", "nvfp4_eager", "bf16_compiled", "nvfp4_compiled")


class _Timer(TrainerCallback):
    """Wall-clock time of the optimizer steps after the first ``warmup``."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.start: float | None = None
        self.end = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: D102
        if state.global_step == self.warmup and self.start is None:
            self._sync()
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        self._sync()
        self.end = time.perf_counter()


class _Tokens(torch.utils.data.Dataset):
    """bench/e2e.py's random token batches, row by row, as causal-LM examples."""

    def __init__(self, size: str, steps: int) -> None:
        self.ids = e2e.make_batches(size, steps, torch.device("cpu")).flatten(0, 1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run(column: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Train one column; its timed figures."""
    device = torch.device(args.device)
    s = e2e.SIZES[args.size]
    steps = args.warmup + args.steps
    model = e2e.build_model(args.size, "fp32_masters", device)
    if column.endswith("compiled"):
        torch._dynamo.reset()
        hf_nvfp4.compile_blocks(model, args.compile_mode, backend=args.compile_backend)
    nvfp4 = ({"first_bf16_blocks": 0, "last_bf16_blocks": 0, "backend": args.backend}
             if column.startswith("nvfp4") else False)
    timer = _Timer(args.warmup, device)
    targs = NVFP4TrainingArguments(
        output_dir=str(out_dir / column), per_device_train_batch_size=s["batch"],
        max_steps=steps, learning_rate=1e-4, logging_steps=1, report_to=[], save_strategy="no",
        disable_tqdm=True, bf16=device.type == "cuda", use_cpu=device.type == "cpu", seed=0,
        dataloader_num_workers=0)
    trainer = NVFP4Trainer(model=model, args=targs, nvfp4=nvfp4, callbacks=[timer],
                           train_dataset=_Tokens(args.size, steps))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    elapsed = timer.end - timer.start
    tps = s["batch"] * s["seq"] * args.steps / elapsed
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak = torch.cuda.max_memory_allocated(device) / e2e.GIB if device.type == "cuda" else None
    del trainer, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_s": tps, "ms_per_step": 1000 * elapsed / args.steps, "peak_gib": peak,
            "losses": losses}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the columns, print a table, write ``--out``; the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="124m", choices=sorted(e2e.SIZES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (compiles)")
    p.add_argument("--columns", default=",".join(COLUMNS))
    p.add_argument("--compile-mode", default=None,
                   help="default: reduce-overhead on CUDA, default elsewhere")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--backend", default="auto", help="the NVFP4 layers' backend")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    columns = [c for c in args.columns.split(",") if c]
    if not columns or any(c not in COLUMNS for c in columns):
        p.error(f"--columns: a comma list of {COLUMNS}; got {args.columns!r}")
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    if args.compile_mode is None:
        args.compile_mode = "reduce-overhead" if args.device.startswith("cuda") else "default"
    out_dir = (args.out.parent if args.out else Path("outputs")) / "trainer_speed_runs"
    runs = {c: run(c, args, out_dir) for c in columns}
    for entry in runs.values():
        for base in ("bf16_eager", "bf16_compiled"):
            ref = runs.get(base)
            entry[f"vs_{base}"] = entry["tokens_per_s"] / ref["tokens_per_s"] if ref else None
    import transformers

    report = {
        "size": args.size,
        "device": (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                   else "cpu"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "runs": runs,
    }
    print("| column | tokens/s | ms/step | vs BF16 eager | vs BF16 compiled | peak GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for c, e in runs.items():
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"| {c} | {e['tokens_per_s']:,.0f} | {e['ms_per_step']:.1f} | "
              f"{fmt(e['vs_bf16_eager'], '.2f')} | {fmt(e['vs_bf16_compiled'], '.2f')} | "
              f"{fmt(e['peak_gib'], '.2f')} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
