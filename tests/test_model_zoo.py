"""Model zoo (eval/model_zoo.py): representative architectures convert, train and reload.

The full zoo (every causal LM of transformers) takes too long for CI; this runs a fixed
representative list in-process and checks that the committed report lists exactly the
installed transformers' architectures. Update EXPECTED when coverage changes, then re-run
``python eval/model_zoo.py`` to refresh the report.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))

import model_zoo  # noqa: E402

# model type -> (status, % of the blocks' matrix parameters in NVFP4; None when not converted)
EXPECTED: dict[str, tuple[str, float | None]] = {
    "bart": ("skipped", None),  # encoder-decoder
    "blt": ("ok", 100.0),  # four transformers (sub-configs), no KV cache possible
    "deepseek_v3": ("ok", 99.47),
    # the grouped o_a_proj converts; hyper-connection matrices and routers are bare parameters
    "deepseek_v4": ("partial", 95.81),
    "exaone": ("ok", 100.0),  # saved under its original (renamed) checkpoint names
    "falcon": ("ok", 100.0),
    "gemma2": ("ok", 100.0),
    "gemma3_text": ("ok", 100.0),
    "gpt2": ("ok", 100.0),
    "gpt_neox": ("ok", 100.0),
    "gpt_oss": ("ok", 99.77),
    "granitemoe": ("ok", 99.77),
    "hrm_text": ("ok", 100.0),  # two stacks of blocks run in turn
    "jetmoe": ("ok", 99.57),  # parallel experts (MoE and mixture of attention); routers [4, 64]
    "llama": ("ok", 100.0),
    "llama4_text": ("ok", 99.81),  # batched experts, [E, in, out]
    # dt rank 16; A_log is used elementwise, not a matmul weight; the mixer computes
    # dt_proj.weight @ x itself, so dt_proj's matmul is high precision
    "mamba": ("partial", 93.77),
    "mistral": ("ok", 100.0),
    "mixtral": ("ok", 99.77),
    "olmo": ("ok", 100.0),
    "phi3": ("ok", 100.0),
    "qwen2": ("ok", 100.0),
    "qwen3": ("ok", 100.0),
    "qwen3_moe": ("ok", 99.31),
    "recurrent_gemma": ("partial", 96.05),  # block-diagonal gate weights (3D, not experts)
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_architecture_converts_trains_and_reloads(model_type: str) -> None:
    status, share = EXPECTED[model_type]
    result = model_zoo.run_architecture(model_type)
    assert (result["status"], result["model_type"]) == (status, model_type), result["reason"]
    if share is None:
        assert result["share"] is None
    else:
        assert 100 * result["share"] == pytest.approx(share, abs=0.05), result["reason"]
    if status in ("ok", "partial"):
        assert len(result["losses"]) == model_zoo.STEPS


def test_committed_report_matches_the_installed_transformers() -> None:
    report = json.loads((model_zoo.REPORT_DIR / "model_zoo.json").read_text())
    installed = model_zoo.versions()["transformers"]
    if report["transformers"] != installed:
        pytest.skip(f"report made with transformers {report['transformers']}, not {installed}")
    names = sorted(model_zoo.architectures())
    assert report["architectures"] == names
    assert sorted(r["model_type"] for r in report["results"]) == names
    for name, (status, share) in EXPECTED.items():
        row = next(r for r in report["results"] if r["model_type"] == name)
        assert row["status"] == status, (name, row["reason"])
        if share is not None:
            assert 100 * row["share"] == pytest.approx(share, abs=0.05), name
    assert (model_zoo.REPORT_DIR / "model_zoo.md").read_text().count(
        model_zoo.headline(report["results"])) == 1
