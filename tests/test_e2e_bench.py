"""bench/e2e.py (end-to-end tokens/s, NVFP4 vs BF16) at tiny size on the CPU, and its resume."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import e2e  # noqa: E402

COMMON = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
          "--compile-backend", "aot_eager"]


def _check_finite(runs: dict, keys: list[str]) -> None:
    for key in keys:
        entry = runs[key]
        assert "error" not in entry, (key, entry.get("error"))
        assert math.isfinite(entry["tokens_per_s"]) and entry["tokens_per_s"] > 0, key
        assert all(math.isfinite(v) for v in entry["losses"]), key
        assert len(entry["losses"]) == 2 and entry["final_loss"] == entry["losses"][-1]
        assert entry["peak_gib"] is None  # no CUDA memory figure on the CPU


def test_e2e_tiny_cpu_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    e2e.main([*COMMON, "--columns", "bf16_eager,nvfp4_eager", "--out", str(out)])
    first = json.loads(out.read_text())
    eager = [f"{m}/{c}" for m in e2e.MODES for c in ("bf16_eager", "nvfp4_eager")]
    assert sorted(first["runs"]) == sorted(eager)
    _check_finite(first["runs"], eager)
    for mode in e2e.MODES:
        run = first["runs"][f"{mode}/nvfp4_eager"]
        assert run["quantized_layers"] == 14  # 7 linears x 2 blocks, none kept BF16
        assert run["vs_bf16_eager"] > 0 and run["vs_bf16_compiled"] is None
        # Same seed and data: NVFP4 starts from the BF16 run's weights and stays close.
        bf16 = first["runs"][f"{mode}/bf16_eager"]["final_loss"]
        assert abs(run["final_loss"] - bf16) < 0.1 * bf16
    assert first["model"]["params"] > 0 and len(first["invocations"]) == 1

    # Resume: the same --out skips the four entries done and runs only the new columns.
    capsys.readouterr()
    torch._dynamo.utils.counters.clear()
    e2e.main([*COMMON, "--modes", "fp32_masters", "--out", str(out),
              "--columns", "bf16_eager,bf16_compiled,nvfp4_eager,nvfp4_compiled"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled for real
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 2
    second = json.loads(out.read_text())
    assert len(second["invocations"]) == 2
    for key in eager:
        assert second["runs"][key]["tokens_per_s"] == first["runs"][key]["tokens_per_s"]
        assert second["runs"][key]["invocation"] == 0
    compiled = ["fp32_masters/bf16_compiled", "fp32_masters/nvfp4_compiled"]
    _check_finite(second["runs"], compiled)
    assert all(second["runs"][k]["invocation"] == 1 for k in compiled)
    # torch.compile does not change the numerics of these CPU runs.
    for column in ("bf16", "nvfp4"):
        eager_loss = second["runs"][f"fp32_masters/{column}_eager"]["losses"]
        compiled_loss = second["runs"][f"fp32_masters/{column}_compiled"]["losses"]
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-3)
    assert second["runs"]["fp32_masters/nvfp4_eager"]["vs_bf16_compiled"] > 0
    assert printed.rstrip().splitlines()[-1].startswith("| fp32_masters | nvfp4_compiled |")


def test_e2e_interleaved_rounds(tmp_path, capsys):
    """--rounds: a mode's columns built at once, their timed steps in rotating rounds; the
    median and every round's throughput and ratio are reported, and the losses are those of
    the same steps run one column at a time."""
    out = tmp_path / "rounds.json"
    args = [*COMMON, "--modes", "bf16_params", "--columns", "bf16_eager,nvfp4_eager"]
    report = e2e.main([*args, "--rounds", "3", "--out", str(out)])
    runs = report["runs"]
    for key in ("bf16_params/bf16_eager", "bf16_params/nvfp4_eager"):
        entry = runs[key]
        assert len(entry["round_tokens_per_s"]) == 3
        assert entry["tokens_per_s"] == sorted(entry["round_tokens_per_s"])[1]
        assert len(entry["losses"]) == 6 and all(math.isfinite(v) for v in entry["losses"])
    nv = runs["bf16_params/nvfp4_eager"]
    assert len(nv["vs_bf16_eager_rounds"]) == 3 and min(nv["vs_bf16_eager_rounds"]) > 0
    assert "vs_bf16_eager_rounds" in runs["bf16_params/bf16_eager"]
    assert nv["vs_bf16_eager_rounds"] != runs["bf16_params/bf16_eager"]["vs_bf16_eager_rounds"]
    printed = capsys.readouterr().out
    row = printed.rstrip().splitlines()[-1]
    lo, hi = min(nv["vs_bf16_eager_rounds"]), max(nv["vs_bf16_eager_rounds"])
    assert f"{nv['vs_bf16_eager']:.2f} ({lo:.2f}-{hi:.2f})" in row
    alone = e2e.main([*args, "--steps", "6"])["runs"]
    for key in runs:
        assert runs[key]["losses"] == alone[key]["losses"], key
    # resumed: the whole mode is done, nothing runs again
    e2e.main([*args, "--rounds", "3", "--out", str(out)])
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        e2e.main([*args, "--rounds", "2", "--profile"])


def test_trainer_speed_tiny_cpu_eager_and_compiled_train_alike(tmp_path):
    """bench/trainer_speed.py: the Trainer with compiled blocks (aot_eager, CUDA-graph steps
    marked) trains as the eager Trainer, loss for loss, and the ratios are side by side (BF16
    columns here: the NVFP4 ones run the same code path, tested in test_compile_blocks.py)."""
    import trainer_speed

    out = tmp_path / "trainer.json"
    torch._dynamo.utils.counters.clear()
    report = trainer_speed.main(["--size", "tiny", "--device", "cpu", "--steps", "2",
                                 "--warmup", "1", "--compile-backend", "aot_eager",
                                 "--compile-mode", "reduce-overhead",
                                 "--columns", "bf16_eager,bf16_compiled", "--out", str(out)])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled for real
    assert json.loads(out.read_text())["runs"] == report["runs"]
    eager, compiled = report["runs"]["bf16_eager"], report["runs"]["bf16_compiled"]
    assert len(eager["losses"]) == 3 and eager["losses"] == compiled["losses"]
    assert eager["vs_bf16_eager"] == 1.0 and compiled["vs_bf16_compiled"] == 1.0
    assert compiled["vs_bf16_eager"] == compiled["tokens_per_s"] / eager["tokens_per_s"]
