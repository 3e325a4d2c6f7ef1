"""Task registry: names accepted by ``--tasks`` and :func:`hf_nvfp4.eval.evaluate`."""

from __future__ import annotations

from hf_nvfp4.eval.tasks.base import LoglikResult, Task, TaskData
from hf_nvfp4.eval.tasks.gsm8k import GSM8K, GSM8KLoglik
from hf_nvfp4.eval.tasks.humaneval import HumanEval, HumanEvalLoglik
from hf_nvfp4.eval.tasks.mmlu_pro import MMLUPro, MMLUProChoice, MMLUProLoglik

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        GSM8K,
        GSM8KLoglik,
        MMLUPro,
        MMLUProChoice,
        MMLUProLoglik,
        HumanEval,
        HumanEvalLoglik,
    )
}
GROUPS: dict[str, tuple[str, ...]] = {
    "loglik": ("mmlu_pro_loglik", "gsm8k_loglik", "humaneval_loglik"),
    "small": ("mmlu_pro_mc", "mmlu_pro_loglik", "gsm8k_loglik", "humaneval_loglik"),
}


def resolve_tasks(spec: str | list[str]) -> list[str]:
    """Task names from ``"mmlu_pro,gsm8k"`` or a list, groups expanded, duplicates dropped."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names if n.strip()):
        for task in GROUPS.get(name, (name,)):
            if task not in TASKS:
                known = sorted(TASKS) + sorted(GROUPS)
                raise ValueError(f"unknown task {task!r}; choose from {known}")
            if task not in out:
                out.append(task)
    if not out:
        raise ValueError(f"no task given in {spec!r}")
    return out


def make_task(name: str) -> Task:
    """A fresh instance of the task called ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]()


__all__ = ["GROUPS", "TASKS", "LoglikResult", "Task", "TaskData", "make_task", "resolve_tasks"]
