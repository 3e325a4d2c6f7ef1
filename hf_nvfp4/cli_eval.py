"""``hf-nvfp4 eval`` and ``hf-nvfp4 compare``: argparse sub-commands for the eval suite.

The main CLI calls :func:`add_eval_commands` with its sub-parsers; each sub-command stores
its handler in ``func`` (``args.func(args)`` runs it and returns an exit status).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path


def _options(args: argparse.Namespace):
    from hf_nvfp4.eval.runner import EvalOptions

    return EvalOptions(
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        num_samples=args.num_samples,
        temperature=args.temperature,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        data_dir=args.data_dir,
        use_hub=not args.offline,
        sandbox_timeout_s=args.sandbox_timeout,
        progress=not args.no_progress,
    )


def parse_models(specs: list[str]) -> dict[str, str]:
    """``["bf16=PATH", "nvfp4=PATH"]`` -> ``{"bf16": "PATH", "nvfp4": "PATH"}``, in order."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(f"--models entries must be NAME=PATH; got {spec!r}")
        if name in models:
            raise argparse.ArgumentTypeError(f"--models names must be unique; {name!r} repeats")
        models[name] = path
    return models


@contextlib.contextmanager
def _data_errors_name_the_flags() -> Iterator[None]:
    """Missing benchmark data becomes a ValueError naming the flags that provide it."""
    from hf_nvfp4.eval.data import DataUnavailableError

    try:
        yield
    except DataUnavailableError as e:
        raise ValueError(
            f"{e}; give --data-dir DIR (DIR/gsm8k/test.jsonl, DIR/mmlu_pro/test.jsonl, "
            "DIR/humaneval/test.jsonl) or allow downloads from the Hub (no --offline)"
        ) from e


def run_eval(args: argparse.Namespace) -> int:
    """Handler of ``hf-nvfp4 eval``: evaluate one model, print its metrics."""
    from hf_nvfp4.eval.runner import evaluate

    with _data_errors_name_the_flags():
        results = evaluate(
            args.model,
            args.tasks,
            _options(args),
            output_dir=args.output_dir,
            reuse=args.reuse,
        )
    print(json.dumps({task: r["metrics"] for task, r in results.items()}, indent=1))
    print(f"per-item results in {Path(args.output_dir).resolve()}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """Handler of ``hf-nvfp4 compare``: evaluate several models, write the report."""
    from hf_nvfp4.eval.compare import compare

    with _data_errors_name_the_flags():
        summary = compare(
            parse_models(args.models),
            args.tasks,
            baseline=args.baseline,
            options=_options(args),
            output_dir=args.output_dir,
            reuse=args.reuse,
        )
    print(Path(summary["files"]["markdown"]).read_text(encoding="utf-8"))
    print("\n".join(f"{kind}: {path}" for kind, path in summary["files"].items()))
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--tasks",
        default="mmlu_pro,gsm8k,humaneval",
        help="comma-separated tasks: mmlu_pro, mmlu_pro_mc, gsm8k, humaneval, "
        "*_loglik, or the groups 'loglik' and 'small' (default: %(default)s)",
    )
    add("--limit", type=int, default=None, help="items per task (default: all)")
    add("--num-fewshot", type=int, default=None, help="exemplars (default: per task)")
    add(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generation budget (default: gsm8k 256, mmlu_pro 2048, humaneval 1024)",
    )
    add("--batch-size", type=int, default=8)
    add("--num-samples", type=int, default=1, help="HumanEval samples per problem (pass@k)")
    add("--temperature", type=float, default=0.0, help="HumanEval sampling temperature")
    add("--seed", type=int, default=0)
    add("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    add("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    add("--data-dir", default=None, help="local benchmark data, tried before the Hub")
    add("--offline", action="store_true", help="never download from the Hub")
    add("--output-dir", default="eval_results")
    add("--reuse", action="store_true", help="keep per-task results already in --output-dir")
    add("--sandbox-timeout", type=float, default=10.0, help="seconds per HumanEval program")
    add("--no-progress", action="store_true", help="hide progress bars")


def add_eval_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``eval`` and ``compare`` on an ``argparse`` sub-parsers object."""
    ev = subparsers.add_parser(
        "eval",
        help="evaluate one model on MMLU-Pro, GSM8K, HumanEval",
        description="Evaluate one causal LM (any HF checkpoint or NVFP4 checkpoint).",
    )
    ev.add_argument("--model", required=True, help="checkpoint directory or Hub id")
    _common(ev)
    ev.set_defaults(func=run_eval)

    cmp = subparsers.add_parser(
        "compare",
        help="compare models with deltas, significance and a plot",
        description="Evaluate several models on the same items and compare them with a "
        "baseline: markdown table, paired bootstrap CI, McNemar p, bar chart.",
    )
    cmp.add_argument(
        "--models",
        nargs="+",
        required=True,
        metavar="NAME=PATH",
        help="e.g. bf16=PATH fp8=PATH nvfp4=PATH",
    )
    cmp.add_argument("--baseline", default=None, help="model name (default: the first)")
    _common(cmp)
    cmp.set_defaults(func=run_compare)
