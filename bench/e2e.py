"""End-to-end training throughput of a Llama, NVFP4 vs BF16: the project's headline figure.

For each precision mode (``bf16_params``: BF16 parameters, no autocast; ``fp32_masters``: FP32
parameters with a BF16 autocast forward, as ``Trainer(bf16=True)`` runs) and each column
(BF16 eager, BF16 with every decoder layer ``torch.compile``d, NVFP4 eager with every block
converted, NVFP4 compiled per layer; ``--columns`` adds the same two for the FP8-block and
MXFP4 recipes, e.g. ``fp8_block_compiled``; on CUDA the compiled columns use CUDA graphs,
``mode="reduce-overhead"``, unless ``--compile-mode`` says otherwise), a fresh
``transformers.LlamaForCausalLM`` built from the same seed trains on random token batches
with AdamW (fused on CUDA, lr 1e-4): ``--warmup`` untimed steps (compilation happens
there), then ``--steps`` steps timed by wall clock between device synchronizations. Reports
tokens/s, ms/step, peak allocated memory (CUDA only), the losses, and each column's
throughput relative to BF16 eager and BF16 compiled of the same mode.

The columns run one after another, each alone on the device. With ``--rounds R`` (R > 1) a
mode's columns are all built and warmed up first, then their timed steps run in R rounds, one
column after another in a rotating order: the ratios are then side by side within minutes of
each other, and each is reported as the median with the range over the rounds (a machine's
throughput drifts by a few percent over minutes, as much as some differences measured).

    python bench/e2e.py --size 953m --out bench/results/e2e_953m_h200.json     # the headline
    python bench/e2e.py --size 953m --columns bf16_compiled,nvfp4_compiled --rounds 5
    python bench/e2e.py --size tiny --device cpu --steps 2 --warmup 1 --compile-backend aot_eager

With ``--out``, entries already in the file are skipped (one whose run raised is retried) and
the file is rewritten after every entry, so a run cut off by a time limit resumes where it
stopped when the same command is run again. The markdown table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hf_nvfp4  # noqa: E402
from hf_nvfp4.backends import BACKENDS, get_backend  # noqa: E402
from hf_nvfp4.compile import step_begin, uses_cuda_graphs  # noqa: E402
from hf_nvfp4.kernels._tuning import choices  # noqa: E402

SIZES: dict[str, dict[str, int]] = {
    "953m": dict(hidden=2048, inter=5632, layers=16, heads=16, vocab=32000, batch=8, seq=2048),
    "124m": dict(hidden=768, inter=2048, layers=12, heads=12, vocab=32000, batch=32, seq=1024),
    "tiny": dict(hidden=64, inter=128, layers=2, heads=4, vocab=256, batch=2, seq=32),
}
MODES = ("bf16_params", "fp32_masters")
# The other recipes' columns (the paper's FP8 and MXFP4 baselines) run on request.
RECIPES = ("nvfp4", "fp8_block", "mxfp4")
COLUMNS = ("bf16_eager", "bf16_compiled",
           *(f"{r}_{how}" for r in RECIPES for how in ("eager", "compiled")))
DEFAULT_COLUMNS = COLUMNS[:4]
SEED = 0
LR = 1e-4
GIB = 2**30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``argv`` None: ``sys.argv``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=tuple(SIZES), required=True)
    p.add_argument("--out", type=Path, help="JSON report; entries already in it are skipped")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles)")
    p.add_argument("--rounds", type=int, default=1,
                   help="with R > 1, every column of a mode is built at once and the timed "
                        "steps run in R interleaved rounds (median and range of the ratios)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--columns", default=",".join(DEFAULT_COLUMNS),
                   help=f"comma list of {COLUMNS} (default: the first four)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="NVFP4 backend")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true",
                   help="also profile two steps per run and store the kernel table")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compiled columns (aot_eager: no toolchain)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the compiled columns (default: reduce-overhead "
                        "on CUDA, i.e. CUDA graphs, which hide the host time of small layers, "
                        "for BF16 and NVFP4 alike; 'default' for torch's default mode)")
    args = p.parse_args(argv)
    if args.compile_mode is None and args.device.startswith("cuda"):
        args.compile_mode = "reduce-overhead"
    elif args.compile_mode == "default":
        args.compile_mode = None
    args.modes = _comma_list(p, args.modes, MODES, "--modes")
    args.columns = _comma_list(p, args.columns, COLUMNS, "--columns")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    if args.rounds > 1 and args.profile:
        p.error("--profile runs with --rounds 1 (it profiles one run alone)")
    return args


def _comma_list(
    parser: argparse.ArgumentParser, value: str, allowed: tuple[str, ...], flag: str
) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        parser.error(f"{flag}: expected a comma list of {allowed}; got {value!r}")
    return items


def llama_config(size: str) -> LlamaConfig:
    """The ``transformers.LlamaConfig`` of ``size`` (SDPA attention, no KV cache)."""
    s = SIZES[size]
    return LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        max_position_embeddings=s["seq"],
        use_cache=False,
        attn_implementation="sdpa",
    )


def count_params(size: str) -> int:
    """Parameters of the Llama of ``size`` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(llama_config(size)).parameters())


def build_model(size: str, mode: str, device: torch.device) -> torch.nn.Module:
    """A freshly initialized Llama of ``size`` (seed ``SEED``), in ``mode``'s parameter dtype."""
    torch.manual_seed(SEED)
    with device:
        model = LlamaForCausalLM(llama_config(size))
    if mode == "bf16_params":
        model.to(torch.bfloat16)
    return model.train()


def make_batches(size: str, n: int, device: torch.device) -> torch.Tensor:
    """``n`` random token batches (fixed seed), shape ``(n, batch, seq)``, on ``device``."""
    s = SIZES[size]
    gen = torch.Generator().manual_seed(SEED)
    return torch.randint(0, s["vocab"], (n, s["batch"], s["seq"]), generator=gen).to(device)


def prepare(model: torch.nn.Module, column: str, args: argparse.Namespace) -> dict[str, Any]:
    """Convert (every column but BF16's, with the column's recipe) and compile each decoder
    layer (compiled columns), in place."""
    info: dict[str, Any] = {}
    recipe = column.rsplit("_", 1)[0]
    if recipe != "bf16":
        summary = hf_nvfp4.convert(
            model, {"recipe": recipe, "first_bf16_blocks": 0, "last_bf16_blocks": 0,
                    "backend": args.backend},
            verbose=False,
        )
        info["quantized_layers"] = len(summary.quantized_layers)
        info["quantized_params"] = summary.quantized_params
    if column.endswith("compiled"):
        hf_nvfp4.compile_blocks(model, args.compile_mode or "default",
                                backend=args.compile_backend)
    return info


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """One column's fresh model (seed ``SEED``), AdamW and token batches, ready to step."""

    def __init__(self, mode: str, column: str, args: argparse.Namespace, batches: int) -> None:
        self.device = torch.device(args.device)
        self.tokens_per_step = SIZES[args.size]["batch"] * SIZES[args.size]["seq"]
        self.model = build_model(args.size, mode, self.device)
        self.entry = prepare(self.model, column, args)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR,
                                     fused=self.device.type == "cuda")
        self.batches = make_batches(args.size, batches, self.device)
        self.autocast = mode == "fp32_masters"
        self.graphs = uses_cuda_graphs(self.model)
        self.next = 0
        self.losses: list[torch.Tensor] = []

    def step(self, batch: torch.Tensor) -> torch.Tensor:
        """One training step on ``batch``; the loss (not synchronized)."""
        if self.graphs:  # a new iteration: earlier graph outputs may be overwritten
            step_begin()
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast
                    else contextlib.nullcontext())
        with autocast:
            loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def steps(self, n: int, keep: bool = True) -> float:
        """``n`` steps on the next batches, timed by wall clock between synchronizations;
        their losses are kept when ``keep``."""
        synchronize(self.device)
        start = time.perf_counter()
        losses = [self.step(self.batches[self.next + i]) for i in range(n)]
        synchronize(self.device)
        elapsed = time.perf_counter() - start
        self.next += n
        if keep:
            self.losses += losses
        return elapsed

    def finish(self, timed: list[float], n: int, warmup_s: float, peak: float | None) -> dict:
        """The entry: median throughput over the timed rounds of ``n`` steps each."""
        rates = [self.tokens_per_step * n / t for t in timed]
        median = statistics.median(rates)
        losses_f = torch.stack(self.losses).float().tolist()
        self.entry.update(
            tokens_per_s=median,
            ms_per_step=1000 * self.tokens_per_step / median,
            warmup_s=warmup_s,
            peak_gib=peak,
            final_loss=losses_f[-1],
            losses=losses_f,
        )
        if len(rates) > 1:
            self.entry["round_tokens_per_s"] = rates
        return self.entry


def _peak_gib(device: torch.device, base: int) -> float | None:
    """Peak memory since the last reset, less ``base`` bytes held before (other runs')."""
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - base) / GIB


def run_one(mode: str, column: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one fresh model for ``--warmup`` + ``--steps`` steps; the timed figures."""
    device = torch.device(args.device)
    run = Run(mode, column, args, args.warmup + args.steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = run.steps(args.warmup, keep=False)
    seconds = run.steps(args.steps)
    profile = profile_steps(run.step, run.batches[-1], device) if args.profile else None
    entry = run.finish([seconds], args.steps, warmup_s, _peak_gib(device, 0))
    if profile is not None:
        entry["profile"] = profile
        print(profile)
    return entry


def run_interleaved(mode: str, columns: list[str], args: argparse.Namespace
                    ) -> dict[str, dict[str, Any]]:
    """Every column's model at once: each built and warmed up in turn, then ``--rounds``
    rounds that time ``--steps`` steps of each column, the order rotated each round, so that
    the machine's drift over minutes (clocks, temperature) falls on all columns alike. Each
    entry holds the median tokens/s and every round's. Its peak memory is its own, over its
    build and warm-up steps (the runs built before it left out; the timed steps repeat the
    warm-up's, so ``--warmup`` >= 1 is needed for an activation peak)."""
    device = torch.device(args.device)
    runs: dict[str, Run] = {}
    warm: dict[str, tuple[float, float | None]] = {}
    for column in columns:
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs[column] = Run(mode, column, args, args.warmup + args.steps * args.rounds)
        warmup_s = runs[column].steps(args.warmup, keep=False)
        warm[column] = (warmup_s, _peak_gib(device, base))
    timed: dict[str, list[float]] = {c: [] for c in columns}
    for r in range(args.rounds):
        shift = r % len(columns)
        for column in columns[shift:] + columns[:shift]:
            timed[column].append(runs[column].steps(args.steps))
    return {c: runs[c].finish(timed[c], args.steps, *warm[c]) for c in columns}


def profile_steps(step: Any, batch: torch.Tensor, device: torch.device, n: int = 2) -> str:
    """torch.profiler's table of the ``n`` steps after the timed ones, by device time."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            step(batch)
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60)


def free_memory(device: torch.device) -> None:
    """Drop compiled graphs and cached device memory between runs."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """Device, library versions, date and command line of this invocation."""
    import transformers

    device = torch.device(args.device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "command": " ".join(["python", "bench/e2e.py", *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "nvfp4_backend": get_backend(args.backend, device).name,
        "compile_backend": args.compile_backend,
        "compile_mode": args.compile_mode,
        "steps": args.steps,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_version,
            "transformers": transformers.__version__,
        },
    }


def add_ratios(runs: dict[str, dict[str, Any]]) -> None:
    """Each entry's tokens/s over BF16 eager's and BF16 compiled's of the same mode; with
    interleaved rounds, also the ratio of each round (``vs_<base>_rounds``)."""
    for key, entry in runs.items():
        mode = key.split("/")[0]
        for base in ("bf16_eager", "bf16_compiled"):
            ref = runs.get(f"{mode}/{base}", {})
            tps = entry.get("tokens_per_s")
            entry[f"vs_{base}"] = (tps / ref["tokens_per_s"]
                                   if tps is not None and ref.get("tokens_per_s") else None)
            mine, theirs = entry.get("round_tokens_per_s"), ref.get("round_tokens_per_s")
            entry.pop(f"vs_{base}_rounds", None)  # from an earlier pairing, maybe stale
            if (mine and theirs and len(mine) == len(theirs)
                    and entry.get("invocation") == ref.get("invocation")):
                entry[f"vs_{base}_rounds"] = [a / b for a, b in zip(mine, theirs, strict=True)]


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table, rows mode x column in the canonical order."""

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def ratio(e: dict[str, Any], base: str) -> str:
        rounds = e.get(f"vs_{base}_rounds")
        spread = f" ({min(rounds):.2f}-{max(rounds):.2f})" if rounds else ""
        return num(e[f"vs_{base}"], ".2f") + spread

    lines = [
        f"size {report['size']} ({report['model']['params']:,} parameters), batch "
        f"{report['model']['batch']} x seq {report['model']['seq']}",
        "",
        "| mode | column | tok/s | ms/step | vs BF16 eager | vs BF16 compiled | peak GiB | loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        for column in COLUMNS:
            e = report["runs"].get(f"{mode}/{column}")
            if e is None:
                continue
            if "error" in e:
                lines.append(f"| {mode} | {column} | error: {e['error'][:120]} | | | | | |")
                continue
            lines.append(
                f"| {mode} | {column} | {e['tokens_per_s']:,.0f} | {e['ms_per_step']:.1f} | "
                f"{ratio(e, 'bf16_eager')} | {ratio(e, 'bf16_compiled')} | "
                f"{num(e['peak_gib'], '.2f')} | {e['final_loss']:.4f} |"
            )
    return "\n".join(lines)


def save(report: dict[str, Any], path: Path | None) -> None:
    """Write the report atomically (a run cut off mid-write keeps the previous file)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; return (and with ``--out`` write) the report."""
    args = parse_args(argv)
    device = torch.device(args.device)
    report: dict[str, Any] = {"size": args.size,
                              "model": {**SIZES[args.size], "params": count_params(args.size)},
                              "runs": {},
                              "invocations": [], "kernel_choices": {}}
    if args.out is not None and args.out.exists():
        report = json.loads(args.out.read_text())
        if report["size"] != args.size:
            raise SystemExit(f"{args.out} holds size {report['size']}, not {args.size}")
    report["invocations"].append(environment(args, argv))
    todo = [(m, [c]) for m in args.modes for c in args.columns]
    if args.rounds > 1:  # a mode's columns run together, or their ratios are not side by side
        todo = [(m, args.columns) for m in args.modes]
    for i, (mode, columns) in enumerate(todo, 1):
        keys = [f"{mode}/{c}" for c in columns]
        if all("error" not in report["runs"].get(k, {"error": ""}) for k in keys):
            print(f"[{i}/{len(todo)}] {', '.join(keys)}: already in {args.out}, skipped",
                  flush=True)
            continue
        try:
            if args.rounds > 1:
                entries = run_interleaved(mode, columns, args)
            else:
                entries = {columns[0]: run_one(mode, columns[0], args)}
        except Exception as exc:  # noqa: BLE001 - one failing run must not stop the others
            entries = {c: {"error": f"{type(exc).__name__}: {exc}"[:2000]} for c in columns}
        free_memory(device)
        for column, entry in entries.items():
            entry["invocation"] = len(report["invocations"]) - 1
            report["runs"][f"{mode}/{column}"] = entry
        add_ratios(report["runs"])
        report["kernel_choices"].update(choices())
        save(report, args.out)
        for key, entry in zip(keys, entries.values(), strict=True):
            if "error" in entry:
                print(f"[{i}/{len(todo)}] {key}: {entry['error'][:300]}", flush=True)
                continue
            peak = "-" if entry["peak_gib"] is None else f"{entry['peak_gib']:.2f}"
            print(
                f"[{i}/{len(todo)}] {key}: {entry['tokens_per_s']:,.0f} tok/s, "
                f"{entry['ms_per_step']:.1f} ms/step, peak {peak} GiB, "
                f"loss {entry['final_loss']:.4f} (warmup {entry['warmup_s']:.1f} s)",
                flush=True,
            )
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
