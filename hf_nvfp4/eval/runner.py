"""``evaluate``: run tasks on one model and write per-item JSON results.

For each task the output directory receives ``{task}.json`` with the options, the task's
notes (e.g. where few-shot exemplars came from), the metrics and one record per item; a
``summary.json`` holds the metrics of all tasks.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hf_nvfp4.eval.data import DataSource
from hf_nvfp4.eval.generation import GenerationConfig, generate
from hf_nvfp4.eval.loglik import choice_logprobs, loglikelihood
from hf_nvfp4.eval.modeling import load_model
from hf_nvfp4.eval.sandbox import SandboxLimits
from hf_nvfp4.eval.tasks import Task, make_task, resolve_tasks
from hf_nvfp4.eval.tasks.humaneval import HumanEval

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TaskResult = dict[str, Any]


@dataclass
class EvalOptions:
    """Settings shared by all tasks of a run (None means the task's default).

    Args:
        limit: items scored per task (MMLU-Pro spreads them over categories).
        num_fewshot: exemplars in the prompt.
        max_new_tokens: generation budget (defaults: GSM8K 256, MMLU-Pro 2048, HumanEval 1024).
        batch_size: prompts per forward / generate call.
        num_samples: completions per HumanEval problem (pass@k); needs ``temperature > 0``.
        temperature: HumanEval sampling temperature; 0 is greedy.
        top_p: nucleus mass when sampling.
        seed: sampling seed.
        device: model placement; CUDA when available when None.
        dtype: "auto", "bfloat16", "float16" or "float32".
        data_dir: local benchmark data, tried before the Hub.
        use_hub: fall back to the Hugging Face Hub when local data is missing.
        sandbox_timeout_s: wall-clock limit per HumanEval program.
        sandbox_workers: HumanEval programs run in parallel (CPU count when None).
        progress: show progress bars.
    """

    limit: int | None = None
    num_fewshot: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = 8
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"
    data_dir: str | None = None
    use_hub: bool = True
    sandbox_timeout_s: float = 10.0
    sandbox_workers: int | None = None
    progress: bool = True

    def source(self) -> DataSource:
        """Where the data comes from."""
        data_dir = Path(self.data_dir) if self.data_dir else None
        return DataSource(data_dir=data_dir, use_hub=self.use_hub)


def _make(name: str, options: EvalOptions) -> Task:
    task = make_task(name)
    if isinstance(task, HumanEval):
        task.limits = SandboxLimits(timeout_s=options.sandbox_timeout_s)
        task.max_workers = options.sandbox_workers
    return task


def _outputs(model, tokenizer, task: Task, items: list, options: EvalOptions) -> list:
    contexts = [item["context"] for item in items]
    common = {"batch_size": options.batch_size, "desc": task.name, "progress": options.progress}
    if task.kind == "loglik":
        pairs = [(item["context"], item["continuation"]) for item in items]
        return loglikelihood(model, tokenizer, pairs, **common)
    if task.kind == "choice":
        choices = [item["choices"] for item in items]
        return choice_logprobs(model, tokenizer, contexts, choices, **common)
    config = GenerationConfig(
        max_new_tokens=options.max_new_tokens or task.default_max_new_tokens,
        num_samples=options.num_samples if task.sampled else 1,
        temperature=options.temperature if task.sampled else 0.0,
        top_p=options.top_p,
        seed=options.seed,
    )
    return generate(model, tokenizer, contexts, task.stop, config, **common)


def run_task(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, options: EvalOptions,
    model_name: str,
) -> TaskResult:
    """Build, run and score one task on a loaded model; returns the JSON-able result."""
    task = _make(name, options)
    start = time.perf_counter()
    data = task.build(options.source(), options.limit, options.num_fewshot)
    outputs = _outputs(model, tokenizer, task, data.items, options)
    records = task.score(data.items, outputs)
    return {
        "task": task.name,
        "model": model_name,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "metrics": task.aggregate(records),
        "num_items": len(records),
        "notes": data.notes,
        "options": asdict(options),
        "elapsed_s": round(time.perf_counter() - start, 2),
        "items": records,
    }


def _cached(path: Path, options: EvalOptions) -> TaskResult | None:
    """A result written earlier with the same options (progress bars aside), else None."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    same = {**result["options"], "progress": None} == {**asdict(options), "progress": None}
    return result if same else None


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, creating parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def evaluate(
    model_or_path: str | os.PathLike | Any,
    tasks: str | Sequence[str],
    options: EvalOptions | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    output_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    reuse: bool = False,
) -> dict[str, TaskResult]:
    """Evaluate one model on ``tasks`` and return ``{task: result}``.

    Args:
        model_or_path: a checkpoint path / Hub id (loaded with :func:`load_model`), or a
            loaded causal LM (then ``tokenizer`` is required).
        tasks: names or a comma-separated string, e.g. ``"mmlu_pro,gsm8k,humaneval"``.
        options: :class:`EvalOptions`; defaults when None.
        tokenizer: the tokenizer of an already loaded model.
        output_dir: where ``{task}.json`` and ``summary.json`` go; nothing written when None.
        model_name: name recorded in the results (defaults to the path or class name).
        reuse: with ``output_dir``, keep results already there (same options) instead of
            recomputing them.
    """
    options = options or EvalOptions()
    names = resolve_tasks(tasks if isinstance(tasks, str) else list(tasks))
    out = Path(output_dir) if output_dir is not None else None
    loaded_here = isinstance(model_or_path, (str, os.PathLike))
    if not loaded_here and tokenizer is None:
        raise ValueError("tokenizer is required when model_or_path is a loaded model")
    model_name = model_name or (str(model_or_path) if loaded_here else type(model_or_path).__name__)
    results: dict[str, TaskResult] = {}
    if reuse and out is not None:
        for name in names:
            cached = _cached(out / f"{name}.json", options)
            if cached is not None:
                results[name] = cached
    todo = [name for name in names if name not in results]
    model = model_or_path
    if todo and loaded_here:
        model, tokenizer = load_model(model_or_path, options.device, options.dtype)
    try:
        for name in todo:
            results[name] = run_task(model, tokenizer, name, options, model_name)
            if out is not None:
                write_json(out / f"{name}.json", results[name])
    finally:
        if loaded_here:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    results = {name: results[name] for name in names}
    if out is not None:
        write_json(out / "summary.json", {n: r["metrics"] for n, r in results.items()})
    return results
