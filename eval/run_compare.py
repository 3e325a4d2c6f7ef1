#!/usr/bin/env python
"""Compare checkpoints on MMLU-Pro, GSM8K and HumanEval; same options as ``hf-nvfp4 compare``.

    python eval/run_compare.py --models bf16=PATH fp8=PATH nvfp4=PATH \
        --tasks mmlu_pro,gsm8k,humaneval --output-dir eval/reports/my-run
"""

from __future__ import annotations

import argparse
import sys

from hf_nvfp4.cli_eval import add_eval_commands


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` as the ``compare`` sub-command and run it."""
    parser = argparse.ArgumentParser(prog="run_compare.py")
    add_eval_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
