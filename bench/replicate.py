"""The paper's comparison at small scale: BF16 vs FP8 block vs NVFP4, with ablations (issue 8).

Every run trains the same Llama from the same initialization on the same batches (batch
``i`` is a pure function of the seed and ``i``), with periodic validation on fixed blocks.
A run that must fit in a time-limited command stops at ``--stop-after-seconds``, saves
model, optimizer, scheduler and step, and continues with the same command (``--resume`` is
automatic when its checkpoint exists); the resumed curve equals the uninterrupted one.

    python bench/corpus.py --out /tmp/corpus
    python bench/replicate.py --corpus /tmp/corpus --runs bf16,nvfp4 --tokens 50_000_000 \\
        --out eval/reports/replicate/runs --stop-after-seconds 500

Quantized runs log :class:`hf_nvfp4.QuantProbe` statistics every ``--telemetry-every`` steps
(the wgrad noise ratio against "FP4 All the Way"'s sqrt(3) criterion; the first step where it
fell below is ``sqrt3_step``), and every command that advanced a run appends a segment (steps,
seconds, host, device, command, ``--session``) to its JSON. ``--compile`` trains through
``torch.compile`` (telemetry steps and validation run the same model eagerly), probes too.
``--fork`` trains the steps a run shares with its parent (:data:`FORKS`: the late switch and
NVFP4, identical until the switch step) once: the parent, listed first in ``--runs``, saves its
state at the child's switch step as the child's checkpoint, and the child resumes from there.
The child's JSON names its parent and step (``forked_from``) and carries the parent's curve up
to that step.
A run's ``tokens_per_s`` counts its ordinary training steps only (not validation, telemetry
steps or each command's first ``WARMUP_STEPS``); ``seconds`` is the wall time of everything.

``--probe-steps N`` instead times N steps of each run in isolation (after warm-up steps) and
writes ``probe/<run>.json`` (tokens/s, peak memory): runs trained concurrently on one GPU
report their throughput from there. ``--save-models`` writes each finished run as a
``from_pretrained`` checkpoint (its NVFP4Config in config.json, the corpus tokenizer) for the
eval suite.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_nvfp4 import NVFP4Config, PrecisionSchedule, QuantProbe, convert
from hf_nvfp4.telemetry import SQRT3, WGRAD_NOISE_RATIO

RUNS: dict[str, dict | None] = {
    "bf16": None,
    "fp8_block": {"recipe": "fp8_block", "first_bf16_blocks": 1, "last_bf16_blocks": 1},
    "nvfp4": {"recipe": "nvfp4"},
    "nvfp4_no_rht": {"recipe": {"preset": "nvfp4", "rht": False}},
    "nvfp4_no_sr": {"recipe": {"preset": "nvfp4", "stochastic_rounding": False}},
    "nvfp4_no_2d": {"recipe": {"preset": "nvfp4", "weight_2d": False}},
    "nvfp4_all_blocks": {"recipe": "nvfp4", "first_bf16_blocks": 0, "last_bf16_blocks": 0},
    "mxfp4": {"recipe": "mxfp4"},
    "nvfp4_late_switch": {"recipe": "nvfp4", "switch_to_bf16_at": 0.82},
}
# runs that are another run until their switch step (same recipe, seed and batches): with
# --fork they start from that run's state there instead of training the shared steps again
FORKS = {"nvfp4_late_switch": "nvfp4"}
SIZES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
             "num_attention_heads": 4},
    "small": {"hidden_size": 640, "intermediate_size": 1920, "num_hidden_layers": 10,
              "num_attention_heads": 10},
}


def batch_indices(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """The training blocks of ``step``: a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (batch,), generator=g)


def build_model(size: str, vocab: int, seq: int, run: str, backend: str):
    """The run's model (same initialization for every run) and its NVFP4Config."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=seq, tie_word_embeddings=False,
                      num_key_value_heads=SIZES[size]["num_attention_heads"], **SIZES[size])
    model = LlamaForCausalLM(cfg)
    spec = RUNS[run]
    config = None if spec is None else NVFP4Config(backend=backend, **spec)
    if config is not None:
        convert(model, config, verbose=False)
    return model, config


@torch.no_grad()
def val_loss(model, val: torch.Tensor, device: str, amp: bool) -> float:
    """Mean loss over the fixed validation blocks."""
    model.eval()
    losses = []
    for i in range(0, len(val), 8):
        x = val[i : i + 8].to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            losses.append(model(input_ids=x, labels=x).loss.float().item())
    model.train()
    return sum(losses) / len(losses)


def make_optimizer(model: torch.nn.Module, steps: int, lr: float):
    """AdamW and the warm-up + cosine (to 10%) schedule shared by all runs."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    )
    return opt, sched


def train_step(model, opt, sched, x: torch.Tensor, device: str,
               cudagraphs: bool = False) -> torch.Tensor:
    """One optimizer step on the token blocks ``x``; returns the loss. ``cudagraphs``: the
    model was compiled with CUDA graphs (a new step begins)."""
    x = x.to(device)
    if cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss


def probe(run: str, args: argparse.Namespace, train: torch.Tensor, vocab: int,
          warmup: int = 4) -> dict:
    """Tokens/s and peak memory of ``run`` alone on the device: ``warmup`` untimed steps, then
    ``args.probe_steps`` timed ones; writes ``probe/<run>.json`` under ``args.out``."""
    device = args.device
    model, _ = build_model(args.size, vocab, train.shape[1], run, args.backend)
    model.to(device)
    step_model, graphs = compiled(model, args)
    opt, sched = make_optimizer(model, 1000, args.lr)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for i in range(warmup + args.probe_steps):
        if i == warmup:
            sync()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        train_step(step_model, opt, sched,
                   train[batch_indices(i, args.batch, len(train), args.seed)], device, graphs)
    sync()
    seconds = time.perf_counter() - t0
    result = {"run": run, "steps": args.probe_steps, "seconds": seconds,
              "tokens_per_s": args.probe_steps * args.batch * train.shape[1] / seconds}
    if device == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    folder = Path(args.out) / "probe"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{run}.json").write_text(json.dumps(result))
    print(f"{run}: {result['tokens_per_s']:,.0f} tokens/s", flush=True)
    return result


def plan(probe_dir: Path, runs: list[str], seconds: float, gpus: int, tokens_per_step: int,
         max_tokens: int) -> dict:
    """Tokens per run and the runs of each GPU so that all runs, trained concurrently, fit
    in ``seconds``: runs are spread over the GPUs by their probed time per token (longest
    first, onto the least loaded GPU) and each GPU is assumed to run its runs one after the
    other at their isolated speed (concurrent runs of a launch-bound model finish sooner)."""
    cost = {r: 1.0 / json.loads((probe_dir / f"{r}.json").read_text())["tokens_per_s"]
            for r in runs}
    lanes: list[list[str]] = [[] for _ in range(gpus)]
    load = [0.0] * gpus
    for r in sorted(runs, key=cost.get, reverse=True):
        g = load.index(min(load))
        lanes[g].append(r)
        load[g] += cost[r]
    tokens = min(max_tokens, int(seconds / max(load)))
    tokens = max(tokens_per_step, tokens // tokens_per_step * tokens_per_step)
    return {"tokens": tokens, "gpus": lanes, "seconds_per_token": cost}


def save_model(model, config, corpus: Path, folder: Path) -> None:
    """A ``from_pretrained`` checkpoint of ``model`` with its NVFP4Config and the tokenizer."""
    if config is not None:
        model.config.quantization_config = config
    model.save_pretrained(folder)
    for f in (corpus / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)


def compiled(model, args: argparse.Namespace) -> tuple[torch.nn.Module, bool]:
    """The module the training steps call (``torch.compile`` of ``model`` with ``--compile``)
    and whether it runs CUDA graphs."""
    if not args.compile:
        return model, False
    step_model = torch.compile(model, mode=args.compile_mode, backend=args.compile_backend)
    return step_model, args.compile_mode == "reduce-overhead"


def fork_steps(run: str, args: argparse.Namespace, steps: int) -> dict[int, str]:
    """``{step: child}`` for each child of ``run`` in ``--runs`` that ``--fork`` starts from
    ``run``'s state at its switch step, when the child has neither started nor finished."""
    out = {}
    for child in args.runs.split(",") if args.fork else []:
        started = any((Path(args.out) / f"{child}{ext}").exists() for ext in (".pt", ".json"))
        if FORKS.get(child) == run and not started:
            out[PrecisionSchedule(RUNS[child]["switch_to_bf16_at"], steps).switch_step] = child
    return out


def save_fork(child: str, run: str, step: int, result: dict, segment: dict, model, opt,
              sched, args: argparse.Namespace) -> None:
    """Write ``child``'s checkpoint from ``run``'s state at ``step`` (before that step): its
    result is ``run``'s so far, renamed, with this command's steps as a segment (each of those
    segments names ``run``)."""
    forked = json.loads(json.dumps(result))
    forked.update(run=child, nvfp4=NVFP4Config(backend=args.backend, **RUNS[child]).to_dict(),
                  forked_from={"run": run, "step": step},
                  seconds=result["seconds"] + segment["seconds"])
    forked["segments"] = [dict(seg, run=run) for seg in forked.get("segments", []) + [segment]]
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "step": step, "result": forked},
               Path(args.out) / f"{child}.pt")
    print(f"{child}: forked from {run} at step {step}", flush=True)


def run_one(run: str, args: argparse.Namespace, train: torch.Tensor, val: torch.Tensor,
            vocab: int) -> dict:
    """Train (or continue) one run; returns and writes its JSON."""
    device = args.device
    amp = device == "cuda"
    model, config = build_model(args.size, vocab, train.shape[1], run, args.backend)
    model.to(device)
    step_model, graphs = compiled(model, args)
    probe = QuantProbe() if config is not None and args.telemetry_every else None
    steps = max(1, args.tokens // (args.batch * train.shape[1]))
    opt, sched = make_optimizer(model, steps, args.lr)
    schedule = None
    if config is not None and config.switch_to_bf16_at is not None:
        schedule = PrecisionSchedule(config.switch_to_bf16_at, steps, config.switch_mode)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, result_path = out / f"{run}.pt", out / f"{run}.json"
    result = {"run": run, "seed": args.seed,
              "nvfp4": None if config is None else config.to_dict(), "steps": steps,
              "tokens_per_step": args.batch * train.shape[1], "train": [], "val": [],
              "params": sum(p.numel() for p in model.parameters()), "seconds": 0.0,
              "corpus": args.corpus_manifest}
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        check_corpus(state["result"], args.corpus_manifest, ckpt, Path(args.corpus))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, result = state["step"], state["result"]
    first_step = step
    forks = fork_steps(run, args, steps)
    if schedule is not None:
        schedule.update(model, step)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    while step < steps:
        if not result["val"] or (step % args.val_every == 0 and result["val"][-1][0] != step):
            result["val"].append((step, val_loss(model, val, device, amp)))
        if step in forks:
            save_fork(forks.pop(step), run, step, result,
                      segment(first_step, step, time.perf_counter() - t0, args, device), model,
                      opt, sched, args)
        x = train[batch_indices(step, args.batch, len(train), args.seed)]
        if probe is not None and step % args.telemetry_every == 0:
            probe.start(model)  # hooks need the eager model
            loss = train_step(model, opt, sched, x, device)
            log_telemetry(result, step, probe.finish(model))
            result["train"].append((step + 1, loss.float().item()))
        else:
            s0 = time.perf_counter()
            loss = train_step(step_model, opt, sched, x, device, graphs)
            result["train"].append((step + 1, loss.float().item()))  # waits for the step
            if step - first_step >= WARMUP_STEPS:
                result["train_seconds"] = result.get("train_seconds", 0.0) + (
                    time.perf_counter() - s0)
                result["timed_steps"] = result.get("timed_steps", 0) + 1
        step += 1
        if schedule is not None:
            schedule.update(model, step)
        if args.stop_after_seconds and time.perf_counter() - t0 > args.stop_after_seconds:
            break
    seconds = time.perf_counter() - t0
    result["seconds"] += seconds
    result.setdefault("segments", []).append(segment(first_step, step, seconds, args, device))
    if step >= steps:
        result["val"].append((step, val_loss(model, val, device, amp)))
        result["final_val_loss"] = result["val"][-1][1]
        result["tokens_per_s"] = tokens_per_s(result)
        if device == "cuda":
            result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if args.save_models:
            save_model(model, config, Path(args.corpus), out / "models" / run)
        ckpt.unlink(missing_ok=True)
    else:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "step": step, "result": result}, ckpt)
    result["done"] = step >= steps
    result_path.write_text(json.dumps(result))
    print(f"{run}: step {step}/{steps}" + (
        f" val {result['final_val_loss']:.4f}" if result["done"] else " (saved, resume later)"),
        flush=True)
    return result


def segment(first_step: int, step: int, seconds: float, args: argparse.Namespace,
            device: str) -> dict:
    """The record of one command's part of a run: its steps, time, machine and command."""
    return {
        "from_step": first_step, "to_step": step, "seconds": seconds,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "command": args.command, "session": args.session,
    }


def check_corpus(result: dict, manifest: dict, source: Path, corpus: Path) -> None:
    """Refuse to continue a run on another corpus than it started on (a corpus is rebuilt on
    every fresh machine: its manifest's file hash says whether it is the same text)."""
    had = result.get("corpus")
    if had is not None and had != manifest:
        raise SystemExit(
            f"{source}: the run started on a corpus with files_sha256 "
            f"{had.get('files_sha256')} ({had.get('tokens')} tokens), but {corpus} has "
            f"{manifest.get('files_sha256')} ({manifest.get('tokens')} tokens): rebuild the "
            "same corpus (bench/corpus.py, same --max-bytes, same machine image) or start over")


def tokens_per_s(result: dict) -> float:
    """Training throughput of a run: over its timed steps (not validation, telemetry steps or
    each command's first WARMUP_STEPS, which compile), else over its wall time ("seconds")."""
    if result.get("train_seconds"):
        return result["timed_steps"] * result["tokens_per_step"] / result["train_seconds"]
    return result["steps"] * result["tokens_per_step"] / result["seconds"]


WARMUP_STEPS = 3
"""Steps at the start of each command left out of tokens/s (compilation, allocator warm-up)."""


def log_telemetry(result: dict, step: int, stats: dict[str, float]) -> None:
    """Append one telemetry record; note the first step whose wgrad noise ratio fell below
    sqrt(3) ("FP4 All the Way"'s criterion for the end of useful FP4 training)."""
    result.setdefault("telemetry", []).append([step, stats])
    ratio = stats.get(WGRAD_NOISE_RATIO)
    if ratio is not None and ratio < SQRT3 and result.get("sqrt3_step") is None:
        result["sqrt3_step"] = step


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, help="a directory written by bench/corpus.py")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated of {list(RUNS)}")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--tokens", type=int, default=50_000_000, help="training tokens per run")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-blocks", type=int, default=64)
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-after-seconds", type=float, default=None)
    p.add_argument("--probe-steps", type=int, default=0,
                   help="only time this many steps of each run alone (see the module doc)")
    p.add_argument("--plan-seconds", type=float, default=0,
                   help="print the plan() of --runs from OUT/probe for this many seconds")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for --plan-seconds")
    p.add_argument("--save-models", action="store_true",
                   help="save each finished run under OUT/models/<run> for the eval suite")
    p.add_argument("--telemetry-every", type=int, default=100,
                   help="QuantProbe statistics of quantized runs every this many steps (0: off)")
    p.add_argument("--compile", action="store_true", help="train through torch.compile")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. "
                   "reduce-overhead (CUDA graphs)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--session", default="", help="a label stored with each segment of a run")
    p.add_argument("--fork", action="store_true",
                   help="start each run of FORKS from its parent's state at its switch step "
                        "(both in --runs, the parent first)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.command = " ".join(["bench/replicate.py", *(sys.argv[1:] if argv is None else argv)])
    unknown = sorted(set(args.runs.split(",")) - set(RUNS))
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; expected names from {list(RUNS)}")
    names = args.runs.split(",")
    for child, parent in FORKS.items() if args.fork else ():
        if child in names and (parent not in names or names.index(parent) > names.index(child)):
            raise SystemExit(f"--fork: {child} starts from {parent}'s state, so --runs must "
                             f"list {parent} before {child}; got --runs {args.runs}")
    corpus = Path(args.corpus)
    args.corpus_manifest = json.loads((corpus / "manifest.json").read_text())
    vocab = args.corpus_manifest["vocab_size"]
    train = torch.from_numpy(np.load(corpus / "train.npy").astype(np.int64))[:, : args.seq]
    val = torch.from_numpy(np.load(corpus / "val.npy").astype(np.int64))[: args.val_blocks,
                                                                           : args.seq]
    if args.plan_seconds:
        print(json.dumps(plan(Path(args.out) / "probe", args.runs.split(","), args.plan_seconds,
                              args.gpus, args.batch * args.seq, args.tokens)))
        return
    if args.probe_steps:
        for run in args.runs.split(","):
            probe(run, args, train, vocab)
        return
    deadline = time.perf_counter() + (args.stop_after_seconds or float("inf"))
    for run in args.runs.split(","):
        done = Path(args.out) / f"{run}.json"
        if done.exists() and json.loads(done.read_text()).get("done"):
            continue
        remaining = deadline - time.perf_counter()
        budget = max(remaining, 1e-9) if args.stop_after_seconds else None
        result = run_one(run, argparse.Namespace(**{**vars(args), "stop_after_seconds": budget}),
                         train, val, vocab)
        if not result["done"] or time.perf_counter() >= deadline:
            break

if __name__ == "__main__":
    main()
