"""The demo end to end on a tiny size: labels, per-run memory, outputs, no stray folders."""

from __future__ import annotations

import json

from hf_nvfp4.demo import DemoSize, main


def test_demo_on_a_tiny_size(tmp_path, capsys):
    tiny = DemoSize(hidden=32, layers=2, heads=2, seq=32, batch=2, steps=2,
                    corpus_bytes=40_000, vocab=300)
    out = tmp_path / "demo"
    results = main(["--out", str(out), "--device", "cpu"], size=tiny)
    printed = capsys.readouterr().out
    assert "run 1/2: FP32 baseline" in printed and "run 2/2: NVFP4" in printed
    assert "about 7-8x slower" in printed and "peak RSS of its process" in printed
    assert [r["name"] for r in results["runs"]] == ["fp32", "nvfp4"]
    assert all(r["peak_memory_mb"] > 0 for r in results["runs"])
    assert sorted(p.name for p in out.iterdir()) == [
        "fp32_model", "loss_curves.png", "nvfp4_packed", "results.json"]
    assert json.loads((out / "results.json").read_text())["runs"][1]["name"] == "nvfp4"
