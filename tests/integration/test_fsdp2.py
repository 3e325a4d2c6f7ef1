"""Two-process FSDP2 (`fully_shard`, gloo, CPU) NVFP4 training: equal to one process with the
same global batch, a sharded checkpoint resumes bitwise, and all-gathering the weights as NVFP4
codes (`fsdp_quantized_all_gather`) changes no bit while moving 0.5625 bytes per weight.

Accelerate only enables FSDP on accelerators (on the CPU it falls back to DDP), so this drives
`fully_shard` and torch.distributed.checkpoint directly, through tests/integration/fsdp2_worker.py.
"""

import json
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fsdp2_worker.py")


def _run(launch, nproc: int, out: Path, *extra: str) -> dict:
    args = [WORKER, "--out", out, *extra]
    proc = launch(args, nproc=nproc)
    if proc.returncode != 0 and "terminate called" in proc.stderr:
        # A C++ abort in gloo's teardown (once in CI, before the worker freed FSDP's state
        # ahead of destroying the group; never reproduced here) is retried once from scratch;
        # any other failure, or a second abort, fails.
        warnings.warn(f"FSDP2 worker aborted, retrying once:\n{proc.stderr[-2000:]}",
                      stacklevel=2)
        proc = launch(args, nproc=nproc)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads((out / "metrics.json").read_text())


def test_fsdp2_matches_one_process_and_resumes_bitwise(tmp_path, launch):
    full = _run(launch, 2, tmp_path / "full", "--save-at", "3")
    resumed = _run(launch, 2, tmp_path / "resumed", "--resume-from",
                   str(tmp_path / "full" / "step-3"))
    single = _run(launch, 1, tmp_path / "single")
    assert full["world"] == 2 and single["world"] == 1
    assert len(full["losses"]) == 6 and full["losses"][-1] < full["losses"][0] - 0.3
    # Sharded checkpoint after step 3, then resume: steps 4-6 and the final weights are
    # bitwise those of the uninterrupted run.
    assert resumed["losses"] == full["losses"][3:]
    assert resumed["checksum"] == full["checksum"]
    # Two shards with the cross-rank amax and SR off follow one process with the same global
    # batch up to FP32 summation order (measured 3e-7 relative on the losses).
    rel = [abs(a - b) / b for a, b in zip(full["losses"], single["losses"], strict=True)]
    assert max(rel) < 2e-6, rel
    # The weights differ more: Adam divides by sqrt(v), so summation-order noise in gradients
    # near zero moves those weights by up to lr per step (measured 1.7e-4 relative on the sum
    # of all weights with torch 2.13+cpu; under 1e-5 with the build this test was written on).
    assert abs(full["checksum"] - single["checksum"]) / abs(single["checksum"]) < 1e-3


def test_fsdp2_quantized_all_gather_is_bitwise_and_moves_codes(tmp_path, launch):
    plain = _run(launch, 2, tmp_path / "plain")
    quantized = _run(launch, 2, tmp_path / "quantized", "--save-at", "3", "--quantized-gather")
    # Each rank quantizes its shard with the all-reduced amax: the gathered codes are those of
    # the whole weight, so training is bitwise that of the FP32 all-gather.
    assert quantized["losses"] == plain["losses"]
    assert quantized["checksum"] == plain["checksum"]
    # The 14 NVFP4 weights (81,920 values) gather as 4-bit codes + one E4M3 scale per 16
    # values instead of FP32, twice a step (forward, and again for backward).
    saved = [p - q for p, q in zip(plain["gathered_bytes_per_step"],
                                   quantized["gathered_bytes_per_step"], strict=True)]
    assert saved == [2 * 81_920 * (4 - 0.5625)] * 6
    # Its checkpoint holds plain master tensors: the FP32-gather run resumes from it bitwise.
    resumed = _run(launch, 2, tmp_path / "resumed",
                   "--resume-from", str(tmp_path / "quantized" / "step-3"))
    assert resumed["losses"] == plain["losses"][3:]
    assert resumed["checksum"] == plain["checksum"]
