"""The replication scripts (bench/corpus.py, replicate.py, replicate_report.py) at tiny scale."""

import json
import sys
from pathlib import Path

import pytest
import torch

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

    replicate.main(_args(a, tmp_path / "seed1", "bf16,nvfp4", **{"--seed": 1}))
    notes = tmp_path / "notes.md"
    notes.write_text("## Findings\nhand-written\n")
    md = replicate_report.report(tmp_path / "full", tmp_path / "report", [tmp_path / "seed1"],
                                 notes)
    readme = (tmp_path / "report" / "README.md").read_text()
    assert readme.endswith("hand-written\n")
    assert ("**In progress**: not yet run: mxfp4, nvfp4_no_sr, nvfp4_no_rht, nvfp4_no_2d, "
            "nvfp4_all_blocks (see the notes at the end).") in readme
    assert "| nvfp4 |" in md and "late switch closes most of the gap" in md
    noise = json.loads((tmp_path / "report" / "results.json").read_text())["seed_noise"]
    gaps = list(noise["gaps"].values())
    assert len(gaps) == 2 and noise["sd"] == pytest.approx(abs(gaps[0] - gaps[1]) / 2**0.5)
    for name in ("loss_curves.png", "relative_gap.png", "README.md", "results.json"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    # every run the predictions name has run: no "in progress" line
    monkeypatch.setattr(replicate_report, "PREDICTIONS", (("x", "nvfp4", "bf16"),))
    replicate_report.report(tmp_path / "full", tmp_path / "done", [tmp_path / "seed1"])
    assert "In progress" not in (tmp_path / "done" / "README.md").read_text()


def test_fork_gives_the_late_switch_run_trained_alone(tiny_corpus, tmp_path):
    """--fork: the late switch starts from NVFP4's state at its switch step (step 10 of 12)
    and ends as the run trained alone, step for step; it also resumes across commands."""
    a = tiny_corpus[0]
    runs = "nvfp4,nvfp4_late_switch"
    replicate.main(_args(a, tmp_path / "alone", runs))
    alone = json.loads((tmp_path / "alone" / "nvfp4_late_switch.json").read_text())
    for out, kw in ((tmp_path / "fork", {}), (tmp_path / "cut", {"--stop-after-seconds": 1e-9})):
        path = out / "nvfp4_late_switch.json"
        for _ in range(30):
            replicate.main([*_args(a, out, runs, **kw), "--fork"])
            if path.exists() and json.loads(path.read_text())["done"]:
                break
        forked = json.loads(path.read_text())
        assert forked["done"] and forked["forked_from"] == {"run": "nvfp4", "step": 10}
        assert forked["train"] == alone["train"] and forked["val"] == alone["val"]
        own = [s for s in forked["segments"] if "run" not in s]
        assert {s["run"] for s in forked["segments"] if "run" in s} == {"nvfp4"}
        assert own[0]["from_step"] == 10 and own[-1]["to_step"] == 12
    with pytest.raises(SystemExit, match="must list nvfp4 before nvfp4_late_switch"):
        replicate.main([*_args(a, tmp_path / "x", "nvfp4_late_switch,nvfp4"), "--fork"])

    # The report judges the late switch in the seed that ran it (here "fork", against that
    # seed's NVFP4 and BF16), and has no same-data noise from a forked late switch.
    import shutil

    replicate.main(_args(a, tmp_path / "fork", "bf16"))
    (tmp_path / "main").mkdir()
    for run in ("bf16", "nvfp4"):
        shutil.copy(tmp_path / "fork" / f"{run}.json", tmp_path / "main")
    md = replicate_report.report(tmp_path / "main", tmp_path / "report", [tmp_path / "fork"])
    assert "| fork | nvfp4_late_switch (forked from nvfp4 at step 10) |" in md
    late = next(line for line in md.splitlines() if line.startswith("| late switch"))
    assert "fork: switch vs NVFP4" in late and "of the gap" in late
    assert "fork n/a (the late switch was forked" in md


def test_runs_record_their_corpus_and_never_mix_two(tiny_corpus, tmp_path):
    """A corpus is rebuilt on every fresh machine: a run resumed on a different one, or a
    report over runs of different ones, stops and names what differs."""
    import sysconfig

    a, _, manifest, _ = tiny_corpus
    other = corpus.build(tmp_path / "other", 150_000, 512,
                         roots=[Path(sysconfig.get_paths()["stdlib"]) / "json"])
    assert other["files_sha256"] != manifest["files_sha256"]
    part = tmp_path / "part"
    replicate.main(_args(a, part, "nvfp4", **{"--stop-after-seconds": 1e-9}))
    assert json.loads((part / "nvfp4.json").read_text())["corpus"] == manifest
    started = r"nvfp4\.pt: the run started on a corpus with files_sha256 "
    with pytest.raises(SystemExit, match=started + manifest["files_sha256"]):
        replicate.main(_args(tmp_path / "other", part, "nvfp4"))

    replicate.main(_args(a, tmp_path / "main", "bf16"))
    replicate.main(_args(tmp_path / "other", tmp_path / "seed1", "bf16"))
    with pytest.raises(SystemExit, match="different corpora.*" + other["files_sha256"]):
        replicate_report.report(tmp_path / "main", tmp_path / "report", [tmp_path / "seed1"])


def test_probe_plan_and_saved_models(tiny_corpus, tmp_path, capsys):
    from hf_nvfp4.eval.modeling import load_model

    a = tiny_corpus[0]
    out = tmp_path / "runs"
    replicate.main(_args(a, out, "bf16,nvfp4", **{"--probe-steps": 2}))
    probes = {r: json.loads((out / "probe" / f"{r}.json").read_text()) for r in ("bf16", "nvfp4")}
    assert all(p["steps"] == 2 and p["tokens_per_s"] > 0 for p in probes.values())
    assert not (out / "bf16.json").exists()  # probing trains nothing
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    replicate.main([*_args(a, tmp_path / "probe_compiled", "nvfp4", **{"--probe-steps": 1}),
                    "--compile", "--compile-backend", "aot_eager"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # --compile is honoured

    capsys.readouterr()
    replicate.main(_args(a, out, "bf16,nvfp4", **{"--plan-seconds": 10.0, "--gpus": 2}))
    plan = json.loads(capsys.readouterr().out)
    assert sorted(map(len, plan["gpus"])) == [1, 1] and plan["tokens"] % (4 * 64) == 0
    assert plan["tokens"] <= 12 * 4 * 64  # capped by --tokens
    slowest = max(1 / p["tokens_per_s"] for p in probes.values())
    assert plan["tokens"] <= 10.0 / slowest + 4 * 64

    replicate.main([*_args(a, out, "bf16,nvfp4"), "--save-models"])
    model, tok = load_model(out / "models" / "nvfp4", device="cpu", dtype="float32")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "NVFP4Linear"
    assert len(tok) == 512
    md = replicate_report.report(out, tmp_path / "report")
    assert "nvfp4" in md
    results = json.loads((tmp_path / "report" / "results.json").read_text())["runs"]
    assert results["nvfp4"]["throughput"] == "probe"
    assert results["nvfp4"]["tokens_per_s"] == probes["nvfp4"]["tokens_per_s"]


def test_telemetry_segments_and_compile(tiny_corpus, tmp_path):
    from hf_nvfp4.telemetry import SQRT3

    a = tiny_corpus[0]
    eager_dir = tmp_path / "eager"
    replicate.main([*_args(a, eager_dir, "bf16,nvfp4", **{"--telemetry-every": 4}),
                    "--session", "s1"])
    eager = json.loads((eager_dir / "nvfp4.json").read_text())
    assert [step for step, _ in eager["telemetry"]] == [0, 4, 8]
    stats = eager["telemetry"][0][1]
    assert stats["nvfp4/wgrad_noise_ratio"] > 0 and stats["nvfp4/x_snr_db"] > 0
    tripped = [s for s, st in eager["telemetry"] if st["nvfp4/wgrad_noise_ratio"] < SQRT3]
    assert eager.get("sqrt3_step") == (tripped[0] if tripped else None)
    assert "telemetry" not in json.loads((eager_dir / "bf16.json").read_text())
    # tokens/s over ordinary steps only: steps 3-11 (after the 3 warm-up steps) less the
    # telemetry steps 4 and 8
    assert eager["timed_steps"] == 7
    assert eager["tokens_per_s"] == pytest.approx(7 * 4 * 64 / eager["train_seconds"])
    assert eager["train_seconds"] < eager["seconds"]
    (segment,) = eager["segments"]
    assert (segment["from_step"], segment["to_step"], segment["session"]) == (0, 12, "s1")
    assert "--telemetry-every 4" in segment["command"] and segment["device"] == "cpu"

    # Interrupted twice, then finished: one segment per command, contiguous.
    part = tmp_path / "part"
    for budget in ("1e-9", "1e-9", "0"):
        replicate.main([*_args(a, part, "nvfp4", **{"--telemetry-every": 4}),
                        *(["--stop-after-seconds", budget] if budget != "0" else [])])
    resumed = json.loads((part / "nvfp4.json").read_text())
    spans = [(s["from_step"], s["to_step"]) for s in resumed["segments"]]
    assert spans == [(0, 1), (1, 2), (2, 12)]
    assert resumed["train"] == eager["train"] and resumed["telemetry"] == eager["telemetry"]

    # Compiled: the same curve up to the rounding of traced (decomposed) ops, which FP4
    # rounding amplifies a little (measured 1e-4 relative at step 12).
    compiled_dir = tmp_path / "compiled"
    replicate.main([*_args(a, compiled_dir, "nvfp4", **{"--telemetry-every": 4}),
                    "--compile", "--compile-backend", "aot_eager"])
    compiled = json.loads((compiled_dir / "nvfp4.json").read_text())
    assert compiled["train"][:4] == eager["train"][:4]
    assert max(abs(c - e) / e for (_, c), (_, e) in
               zip(compiled["train"], eager["train"], strict=True)) < 1e-3
    assert [s for s, _ in compiled["telemetry"]] == [0, 4, 8]


def test_gpu_replicate_script_resumes_until_all_done(tiny_corpus, tmp_path):
    """bench/gpu_replicate.sh (issue 19's per-session runner) on a CPU with tiny settings:
    a call cut short leaves 'call again', the next call resumes, each run's JSON comes back."""
    import os
    import subprocess

    env = {**os.environ, "OUT": str(tmp_path / "out"), "RUNS": "bf16,nvfp4,nvfp4_late_switch",
           "CORPUS": str(tiny_corpus[0]), "RUNS_DIR": str(tmp_path / "runs"), "TOKENS": "3072",
           "EVAL": "0", "FORK": "1", "MARGIN_S": "90",
           "TRAIN_ARGS": "--size tiny --seq 64 --batch 4 --val-every 4 --val-blocks 4 "
                         "--backend reference --device cpu",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def call(limit: int) -> str:
        proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_replicate.sh")], cwd=ROOT,
                              env={**env, "LIMIT_S": str(limit)}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    first = call(89)  # training gets a negative budget: bf16 stops after its first step
    assert "call again" in first and "bf16: step" in first and "nvfp4: not started" in first
    assert "all done" in call(300)
    for run in ("bf16", "nvfp4", "nvfp4_late_switch"):
        result = json.loads((tmp_path / "out" / "runs" / f"{run}.json").read_text())
        assert result["done"] and result["corpus"] == tiny_corpus[2]
    assert result["forked_from"] == {"run": "nvfp4", "step": 10}
    bf16 = json.loads((tmp_path / "out" / "runs" / "bf16.json").read_text())
    assert len(bf16["segments"]) == 2


def test_report_of_the_committed_250m_runs(tmp_path, monkeypatch):
    """bench/replicate_report.py over the committed 250M-token runs (issue 19): two seeds,
    each run against its own seed's baselines, one eval comparison per seed folder, and the
    8.6M-token study's numbers beside them."""
    runs = ROOT / "eval" / "reports" / "replicate" / "250m"
    monkeypatch.setattr(sys, "argv", [
        "replicate_report.py", "--runs", str(runs / "seed0"), "--seed-runs", str(runs / "seed1"),
        "--out", str(tmp_path), "--eval", str(runs / "seed0"), str(runs / "seed1"),
        "--previous", str(runs.parent / "8.6m")])
    replicate_report.main()
    md = (tmp_path / "README.md").read_text()
    assert "| seed0 | nvfp4 | 1.7820 | +1.43% |" in md
    assert "In progress" not in md  # all 13 runs are in
    assert ("| seed0 | nvfp4_all_blocks | 1.7927 | +2.04% | +7.5 | +1.88% | 301,606 | H100 | "
            "9,570 | never | 3 |") in md
    assert ("| all blocks in FP4 is worse than the recipe | held (nvfp4_all_blocks vs nvfp4: "
            "+0.60%) |") in md
    assert "| nvfp4_all_blocks | 4.1627 | +0.23% | 1.7927 | +2.04% (1 seed) |" in md
    assert "| seed0 | nvfp4_no_2d | 1.7839 | +1.54% | +5.6 | +1.38% | 318,195 | H100 |" in md
    assert ("| no 2D weights is worse | held, weak: within seed noise (nvfp4_no_2d vs nvfp4: "
            "+0.11%) |") in md
    assert "| seed0 | nvfp4_no_rht | 1.7864 | +1.68% | +6.1 | +1.53% | 412,516 | H200 |" in md
    assert ("| no RHT is worse | held, weak: within seed noise (nvfp4_no_rht vs nvfp4: "
            "+0.25%) |") in md
    assert "| seed0 | nvfp4_no_sr | 1.7768 | +1.14% | +4.2 | +0.98% | 326,114 | H100 |" in md
    assert ("| no stochastic rounding is worse | not held, weak: within seed noise (nvfp4_no_sr "
            "vs nvfp4: -0.29%) |") in md
    assert "| +1.28% | 378,818 | H200 | 9,699 | never | 2 |" in md
    assert "| seed1 | fp8_block | 1.7583 | +0.38% | +1.4 |" in md
    assert "| seed1 | nvfp4 | 1.7699 | +1.04% | +3.8 |" in md
    assert "| seed0 | mxfp4 | 1.8064 | +2.82% | +10.3 | +2.66% |" in md
    assert "| seed1 | mxfp4 | 1.8010 | +2.82% | +10.3 | +2.43% |" in md
    assert ("| MXFP4 worse than NVFP4 | held (mxfp4 vs nvfp4: seed0 +1.37%, seed1 +1.75%: "
            "mean +1.56%) |") in md
    assert "| mean (sd) | +1.24% (0.27%) |" in md
    assert "| NVFP4 within ~1.5% of BF16 | held (seed0 +1.43%, seed1 +1.04%: mean +1.24%) |" in md
    assert ("| late switch closes most of the gap | held (seed1: switch vs NVFP4 -0.80%, NVFP4 "
            "vs BF16 +1.04%: closes 78% of the gap) |") in md
    assert ("within noise (seed0: +1.31% -> +1.45% (+0.14 +- 0.07); seed1: +0.97% -> +1.20% "
            "(+0.24 +- 0.07))") in md
    assert "seed0: never below; smallest 6.12 at step 13250 of 15258 (3.5x sqrt(3))" in md
    assert "seed1: never below; smallest 6.10 at step 15250 of 15258" in md
    assert "## Against the earlier study (8.6M tokens per run" in md
    assert "| fp8_block | 4.1504 | -0.06% | 1.7595 | +0.27% (2 seeds) |" in md
    assert "| nvfp4 | 4.1323 | -0.50% | 1.7820 | +1.24% (2 seeds) |" in md
    assert "3 seeds, mean +0.20%, sd 0.77% at 8.6M tokens; 2 seeds, mean +1.24%" in md
    assert (tmp_path / "telemetry.png").stat().st_size > 0
    seed0 = (tmp_path / "eval" / "comparison.md").read_text()
    assert "| gsm8k_loglik | loglik_per_byte | -1.4727 |" in seed0 and "nvfp4" in seed0
    seed1 = json.loads((tmp_path / "eval_seed1" / "comparison.json").read_text())
    assert seed1["baseline"] == "bf16" and "fp8_block" in seed1["models"]
    assert seed1["paths"]["fp8_block"].endswith("seed1/eval_fp8_block.tgz")
    assert set(seed1["models"]) == {"bf16", "fp8_block", "nvfp4"}


def test_prediction_verdicts_over_seeds():
    """A prediction is judged on the mean difference over the seeds that ran both runs, each
    seed's number shown; against twice the seed noise: held, or weak when inside it."""
    def pool(**losses: float) -> dict:
        return {name: {"final_val_loss": v} for name, v in losses.items()}

    pools = [("s0", pool(bf16=2.0, nvfp4=2.02, mxfp4=2.04)),
             ("s1", pool(bf16=2.0, nvfp4=2.01, mxfp4=2.05)), ("s2", pool(bf16=2.0))]
    assert replicate_report.verdict(pools, "mxfp4", "nvfp4", 0.5) == (
        "held (mxfp4 vs nvfp4: s0 +0.99%, s1 +1.99%: mean +1.49%)")
    assert replicate_report.verdict(pools, "mxfp4", "nvfp4", 1.0).startswith(
        "held, weak: within seed noise")
    assert replicate_report.verdict(pools, "nvfp4", "bf16", None) == (
        "held (s0 +1.00%, s1 +0.50%: mean +0.75%)")
    assert replicate_report.verdict(pools[1:], "mxfp4", "nvfp4", None) == (
        "held (mxfp4 vs nvfp4: +1.99%)")
    assert replicate_report.verdict([pools[2], pools[1]], "mxfp4", "nvfp4", None) == (
        "held (mxfp4 vs nvfp4: s1: +1.99%)")
    assert replicate_report.verdict(pools, "nvfp4_no_sr", "nvfp4", None) == (
        "not run (nvfp4_no_sr)")


def test_devices_name_each_card_once_in_order():
    h200, h100 = {"device": "NVIDIA H200"}, {"device": "NVIDIA H100 80GB HBM3"}
    assert replicate_report.devices({"segments": [h200, h100, h200]}) == "H200, H100"
    assert replicate_report.devices({"segments": [{"device": "cpu"}]}) == "cpu"
    assert replicate_report.devices({}) == "-"


def test_gap_trend_verdicts():
    """The gap-growth prediction: held when every seed's gap grows by more than twice its
    standard error from the second to the last quarter, not held when it shrinks so."""
    def runs(late_gap: float) -> dict:
        """16 steps: NVFP4 1% above BF16 until step 12, then ``late_gap``, +-0.01% jitter."""
        def gap(s: int) -> float:
            return (0.01 if s < 12 else late_gap) + (-1) ** s * 1e-4

        return {"bf16": {"val": [(s, 2.0) for s in range(17)], "steps": 16},
                "nvfp4": {"val": [(s, 2.0 * (1 + gap(s))) for s in range(17)], "steps": 16}}

    t = replicate_report.gap_trend(runs(0.02))
    assert t["mid"] == pytest.approx(1.0, abs=0.02) and t["late"] == pytest.approx(2.0, abs=0.02)
    assert replicate_report.trend_verdict([("s0", runs(0.02)), ("s1", runs(0.03))]).startswith(
        "held (s0: +1.00% -> +2.00%")
    assert replicate_report.trend_verdict([("s0", runs(0.0))]).startswith("not held")
    assert replicate_report.trend_verdict([("s0", runs(0.02)), ("s1", runs(0.0))]).startswith(
        "within noise")
    assert replicate_report.trend_verdict([("s0", {})]) == "not run (nvfp4 and bf16 in one seed)"


def test_gpu_replicate_multi_runs_one_job_per_gpu_until_all_done(tiny_corpus, tmp_path):
    """bench/gpu_replicate_multi.sh (several GPUs: one SEED:RUN job each, at once) on a CPU
    with tiny settings and a stand-in nvidia-smi listing two GPUs (and a MIG slice): jobs of
    two seeds on GPUs 0 and 1 resume until 'all done' and each run's JSON comes back under
    its job; malformed, repeated or too many jobs are refused."""
    import os
    import stat
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: H200 (UUID: a)'\necho '  MIG 1g.18gb Device 0'\n"
                   "echo 'GPU 1: H200 (UUID: b)'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env = {**base, "OUT": str(tmp_path / "out"), "JOBS": "1:bf16 0:nvfp4",
           "CORPUS": str(tiny_corpus[0]), "RUNS_DIR": str(tmp_path / "runs"), "TOKENS": "3072",
           "EVAL": "0", "MARGIN_S": "90",
           "TRAIN_ARGS": "--size tiny --seq 64 --batch 4 --val-every 4 --val-blocks 4 "
                         "--backend reference --device cpu",
           "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                   f"{os.environ['PATH']}"}

    def call(limit: int, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "bench" / "gpu_replicate_multi.sh")],
                              cwd=ROOT, env={**env, "LIMIT_S": str(limit), **extra},
                              capture_output=True, text=True, timeout=600)

    first = call(89)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "job0: 1:bf16 on GPU 0" in first.stdout and "job1: 0:nvfp4 on GPU 1" in first.stdout
    assert "call again" in first.stdout and "== job1 (0:nvfp4): rc 0" in first.stdout
    assert "all done" in call(300).stdout
    for job, seed, run in ((0, 1, "bf16"), (1, 0, "nvfp4")):
        result = json.loads((tmp_path / "out" / f"job{job}" / "runs" / f"{run}.json")
                            .read_text())
        assert result["done"] and result["seed"] == seed and result["corpus"] == tiny_corpus[2]
        assert (tmp_path / f"runs_seed{seed}" / f"{run}.json").exists()
    for jobs, error in (("nvfp4", "'nvfp4' is not SEED:RUN"), (" ", "no SEED:RUN entry"),
                        ("0:bf16 0:bf16", "an entry twice"),
                        ("0:a 0:b 0:c", "3 jobs but 2 GPUs")):
        bad = call(60, JOBS=jobs)
        assert bad.returncode == 2 and error in bad.stderr, (jobs, bad.stderr)
    crash = call(120, JOBS="0:nvfp4 1:no_such_run")
    assert crash.returncode == 1 and "== job1 (1:no_such_run): rc " in crash.stdout
    assert "== job0 (0:nvfp4): rc 0" in crash.stdout
