"""bench/replicate_report.py's eval comparison from the result tarballs of gpu_replicate.sh."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import pytest

from hf_nvfp4.eval import EvalOptions, evaluate
from hf_nvfp4.eval.compare import compare_results

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import replicate_report  # noqa: E402


def _tarball(folder: Path, run: str, source: Path) -> None:
    with tarfile.open(folder / f"eval_{run}.tgz", "w:gz") as tar:
        tar.add(source, arcname=run)


def test_eval_comparison_from_tarballs(tiny_models, tiny_data, tmp_path):
    options = EvalOptions(limit=3, num_fewshot=0, data_dir=str(tiny_data), use_hub=False,
                          device="cpu", dtype="float32", progress=False)
    results = {name: evaluate(tiny_models[model], "loglik,mmlu_pro_mc", options,
                              output_dir=tmp_path / "res" / name)
               for name, model in (("bf16", "base"), ("nvfp4", "other"))}
    folder = tmp_path / "back"
    folder.mkdir()
    for name in results:
        _tarball(folder, name, tmp_path / "res" / name)
    assert replicate_report.eval_comparison(tmp_path / "empty", tmp_path / "none") is None

    summary = replicate_report.eval_comparison(folder, tmp_path / "out")
    want = compare_results(results, "bf16")
    assert summary["baseline"] == "bf16" and summary["tasks"].keys() == want["tasks"].keys()
    for task, entry in want["tasks"].items():
        assert summary["tasks"][task]["scores"] == entry["scores"]
        assert summary["tasks"][task]["vs_baseline"] == entry["vs_baseline"]
    assert "| task | metric | bf16 | nvfp4 |" in (tmp_path / "out" / "comparison.md").read_text()
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:4] == b"\x89PNG"

    (tmp_path / "res" / "nvfp4" / "mmlu_pro_mc.json").unlink()  # one task fewer
    _tarball(folder, "nvfp4", tmp_path / "res" / "nvfp4")
    with pytest.raises(SystemExit, match="scored different tasks"):
        replicate_report.eval_comparison(folder, tmp_path / "out2")
