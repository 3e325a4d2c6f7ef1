"""Evaluation suite: MMLU-Pro, GSM8K and HumanEval, and paired model comparisons.

Typical use::

    from hf_nvfp4.eval import EvalOptions, compare, evaluate

    evaluate("path/to/ckpt", "gsm8k,humaneval", EvalOptions(limit=100), output_dir="out")
    compare({"bf16": p1, "nvfp4": p2}, "mmlu_pro,gsm8k,humaneval", output_dir="out")
"""

from hf_nvfp4.eval.compare import compare, compare_results, to_markdown
from hf_nvfp4.eval.data import DataSource, DataUnavailableError, load_split
from hf_nvfp4.eval.modeling import load_model
from hf_nvfp4.eval.runner import EvalOptions, evaluate
from hf_nvfp4.eval.tasks import GROUPS, TASKS, resolve_tasks

__all__ = [
    "GROUPS",
    "TASKS",
    "DataSource",
    "DataUnavailableError",
    "EvalOptions",
    "compare",
    "compare_results",
    "evaluate",
    "load_model",
    "load_split",
    "resolve_tasks",
    "to_markdown",
]
