"""The ``hf-nvfp4`` command line: export, inspect and quantize checkpoints (and eval/compare).

Examples::

    hf-nvfp4 quantize meta-llama/Llama-3.2-1B out/llama-nvfp4 --format native
    hf-nvfp4 export out/run/checkpoint-1000 out/ct --format compressed-tensors
    hf-nvfp4 export out/run/checkpoint-1000 out/mo --format modelopt --weight-only
    hf-nvfp4 inspect out/ct

Building the parser imports neither torch nor transformers (``hf-nvfp4 --help`` stays fast);
each sub-command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FORMATS = ("native", "compressed-tensors", "modelopt")
DTYPES = ("bfloat16", "float16", "float32")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=FORMATS, default="native",
                   help="native packed hf_nvfp4, compressed-tensors nvfp4-pack-quantized, or "
                   "NVIDIA ModelOpt NVFP4 (default: native)")
    p.add_argument("--weight-only", action="store_true",
                   help="NVFP4A16: no activation scales, no calibration (exports only)")
    p.add_argument("--masters", action="store_true",
                   help="native only: also save the FP32 master weights for exact resume")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="dtype of the high-precision tensors (default: bfloat16)")
    p.add_argument("--max-shard-size", default="5GB", help="shard limit (default: 5GB)")
    p.add_argument("--calib-file", type=Path, default=None,
                   help="text file for activation calibration (paragraphs separated by blank "
                   "lines; default: built-in sample texts)")
    p.add_argument("--calib-max-length", type=int, default=256,
                   help="tokens per calibration sample (default: 256)")
    p.add_argument("--no-fuse-global-scales", action="store_true",
                   help="exports: keep each layer's own global scale (engines expect q/k/v "
                   "and gate/up to share one)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hf-nvfp4``."""
    parser = argparse.ArgumentParser(prog="hf-nvfp4", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("export", help="write an hf_nvfp4 checkpoint in a serving format",
                        description="Load an hf_nvfp4 checkpoint (master or packed) and write "
                        "it as native packed, compressed-tensors or ModelOpt NVFP4.")
    ex.add_argument("src", help="hf_nvfp4 checkpoint directory")
    ex.add_argument("dst", help="output directory (replaced atomically)")
    _add_output_options(ex)
    ex.set_defaults(func=run_export)

    ins = sub.add_parser("inspect", help="per-layer table of a checkpoint",
                         description="Shape, format, bytes, scale statistics and quantization "
                         "SNR of every 2D weight; totals against BF16.")
    ins.add_argument("path", help="checkpoint directory")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.add_argument("--no-snr", action="store_true",
                     help="skip quantizing high-precision weights for their SNR")
    ins.set_defaults(func=run_inspect)

    qu = sub.add_parser("quantize", help="post-training quantization of a causal LM",
                        description="Load any transformers causal LM, convert it with "
                        "NVFP4Config and write it in the chosen format.")
    qu.add_argument("src", help="model directory or Hub id")
    qu.add_argument("dst", help="output directory (replaced atomically)")
    qu.add_argument("--recipe", default="nvfp4", help="recipe preset (default: nvfp4)")
    qu.add_argument("--first-bf16-blocks", type=_count, default=None,
                    help="blocks kept BF16 at the start (int count or float fraction)")
    qu.add_argument("--last-bf16-blocks", type=_count, default=None,
                    help="blocks kept BF16 at the end (int count or float fraction)")
    qu.add_argument("--exclude", nargs="*", default=[], help="regexes of layers to keep BF16")
    _add_output_options(qu)
    qu.set_defaults(func=run_quantize)

    from .cli_eval import add_eval_commands

    add_eval_commands(sub)
    return parser


def _count(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def _tokenizer(src: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, TypeError):
        return None


def _calibration(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, float]:
    from .checkpoint.calibrate import calibrate_input_amax, calibration_batches

    texts = None
    if args.calib_file is not None:
        texts = [t.strip() for t in args.calib_file.read_text().split("\n\n") if t.strip()]
    if tokenizer is None:
        print("hf-nvfp4: no tokenizer found; calibrating on UTF-8 bytes as token ids",
              file=sys.stderr)
    batches = calibration_batches(tokenizer, texts, vocab_size=model.config.vocab_size,
                                  max_length=args.calib_max_length)
    return calibrate_input_amax(model, batches, progress=True)


def write(model: Any, dst: str, tokenizer: Any, args: argparse.Namespace) -> Path:
    """Write ``model`` to ``dst`` in ``args.format`` (calibrating first for W4A4 exports)."""
    import torch

    from .checkpoint import export_compressed_tensors, export_modelopt, save_packed

    dtype = getattr(torch, args.dtype)
    common = {"dtype": dtype, "max_shard_size": args.max_shard_size, "tokenizer": tokenizer,
              "progress": True}
    if args.format == "native":
        return save_packed(model, dst, masters=args.masters, **common)
    amax = None if args.weight_only else _calibration(model, tokenizer, args)
    export = export_compressed_tensors if args.format == "compressed-tensors" else export_modelopt
    # Print the per-layer report of the fused global scales (how much each weight changed).
    report = logging.getLogger("hf_nvfp4.checkpoint.fusion")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("hf-nvfp4: %(message)s"))
    level = report.level
    report.addHandler(handler)
    report.setLevel(logging.INFO)
    try:
        return export(model, dst, input_amax=amax, weight_only=args.weight_only,
                      fuse_global_scales=not args.no_fuse_global_scales, **common)
    finally:
        report.removeHandler(handler)
        report.setLevel(level)


def run_export(args: argparse.Namespace) -> int:
    """``hf-nvfp4 export``."""
    from transformers import AutoModelForCausalLM

    from .checkpoint.integrity import require_hf_nvfp4

    qc = require_hf_nvfp4(args.src)
    if args.masters and qc.get("checkpoint_format") == "packed":
        from .checkpoint import load_packed

        # The masters saved beside the packed weights (CheckpointError when there are none).
        model = load_packed(args.src, mode="train", masters=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.src)
    out = write(model, args.dst, _tokenizer(args.src), args)
    print(f"hf-nvfp4: wrote {args.format} checkpoint to {out}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """``hf-nvfp4 inspect``."""
    from .checkpoint.inspect import inspect_checkpoint, report_json

    report = inspect_checkpoint(args.path, snr=not args.no_snr)
    print(report_json(report) if args.json else report.table())
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    """``hf-nvfp4 quantize``."""
    import torch
    from transformers import AutoModelForCausalLM

    from .config import NVFP4Config
    from .hf_quantizer import prepare_model

    fields: dict[str, Any] = {"recipe": args.recipe, "exclude": args.exclude}
    if args.first_bf16_blocks is not None:
        fields["first_bf16_blocks"] = args.first_bf16_blocks
    if args.last_bf16_blocks is not None:
        fields["last_bf16_blocks"] = args.last_bf16_blocks
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32)
    prepare_model(model, NVFP4Config(**fields))
    model.eval()
    out = write(model, args.dst, _tokenizer(args.src), args)
    print(f"hf-nvfp4: wrote {args.format} checkpoint to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-nvfp4``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "masters", False) and args.format != "native":
        parser.error("--masters applies to --format native only")
    from .checkpoint.errors import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, OSError, ValueError) as e:
        # One line, no traceback: the message names the flag, file or tensor to fix.
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"hf-nvfp4: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
