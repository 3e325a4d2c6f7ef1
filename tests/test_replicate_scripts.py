"""The replication scripts (bench/corpus.py, replicate.py, replicate_report.py) at tiny scale."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import corpus  # noqa: E402
import replicate  # noqa: E402
import replicate_report  # noqa: E402


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    import sysconfig

    roots = [Path(sysconfig.get_paths()["stdlib"]) / d for d in ("json", "email")]
    a = tmp_path_factory.mktemp("a")
    b = tmp_path_factory.mktemp("b")
    ma = corpus.build(a, 300_000, 512, roots=roots)
    mb = corpus.build(b, 300_000, 512, roots=roots)
    return a, b, ma, mb


def test_corpus_is_deterministic(tiny_corpus):
    a, b, ma, mb = tiny_corpus
    assert ma == mb and ma["val_blocks"] >= 1 and ma["vocab_size"] == 512
    for name in ("train.npy", "val.npy"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def _args(corpus_dir, out, runs, **kw):
    return ["--corpus", str(corpus_dir), "--runs", runs, "--size", "tiny", "--tokens",
            str(12 * 4 * 64), "--seq", "64", "--batch", "4", "--val-every", "4",
            "--val-blocks", "4", "--backend", "reference", "--device", "cpu", "--out", str(out),
            *[str(v) for kv in kw.items() for v in kv]]


def test_runs_resume_exactly_and_report(tiny_corpus, tmp_path, monkeypatch):
    a = tiny_corpus[0]
    replicate.main(_args(a, tmp_path / "full", "bf16,nvfp4,nvfp4_late_switch"))
    full = json.loads((tmp_path / "full" / "nvfp4.json").read_text())
    assert full["done"] and len(full["train"]) == 12 and full["val"][-1][0] == 12

    # Interrupt after every step (a tiny time budget) and resume until done.
    part = tmp_path / "part"
    for _ in range(20):
        replicate.main(_args(a, part, "nvfp4", **{"--stop-after-seconds": 1e-9}))
        if json.loads((part / "nvfp4.json").read_text())["done"]:
            break
    resumed = json.loads((part / "nvfp4.json").read_text())
    assert resumed["train"] == full["train"] and resumed["val"] == full["val"]

    switched = json.loads((tmp_path / "full" / "nvfp4_late_switch.json").read_text())
    assert switched["train"][:9] == full["train"][:9]  # identical until the switch at step 10
    assert switched["train"][10:] != full["train"][10:]

    md = replicate_report.report(tmp_path / "full", tmp_path / "report")
    assert "| nvfp4 |" in md and "late switch closes most of the gap" in md
    for name in ("loss_curves.png", "relative_gap.png", "README.md", "results.json"):
        assert (tmp_path / "report" / name).stat().st_size > 0
