"""bench/moe.py (MoE experts fwd+bwd, NVFP4 vs BF16 grouped_mm) at tiny size on the CPU."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import moe  # noqa: E402


def test_moe_bench_tiny_cpu(tmp_path):
    out = tmp_path / "moe.json"
    report = moe.main(["--device", "cpu", "--tokens", "48", "--experts", "4", "--top-k", "2",
                       "--hidden", "64", "--ffn", "32", "--reps", "1", "--warmup", "1",
                       "--backend", "reference", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    runs = report["runs"]
    assert sorted(runs) == ["grouped_mm", "nvfp4"]
    assert all(r["fwd_bwd_ms"] > 0 for r in runs.values())
    assert report["nvfp4_vs_bf16"] == runs["grouped_mm"]["fwd_bwd_ms"] / runs["nvfp4"]["fwd_bwd_ms"]


def test_nvfp4_experts_module_is_converted():
    args = moe.parse_args(["--device", "cpu", "--experts", "4", "--top-k", "2", "--hidden", "64",
                           "--ffn", "32", "--backend", "reference"])
    module = moe.build(args, "nvfp4")
    assert module.config._experts_implementation == "hf_nvfp4"
    assert moe.build(args, "grouped_mm").config._experts_implementation == "grouped_mm"
