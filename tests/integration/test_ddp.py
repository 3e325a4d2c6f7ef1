"""Two-process DDP (gloo, CPU) NVFP4 training through Accelerate and examples/pretrain.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_two_process_ddp_nvfp4_training(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "HF_NVFP4_RECIPE": str(ROOT / "integrations" / "accelerate" / "nvfp4_recipe.yaml")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", str(ROOT / "examples" / "pretrain.py"),
           "--cpu", "--tiny", "--steps", "8", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["num_processes"] == 2 and m["distributed_type"] == "DistributedType.MULTI_CPU"
    assert m["quantized_layers"] == 14  # 2 blocks x 7 linears, the recipe file's split
    assert m["nvfp4"]["recipe"]["fprop_format"] == "nvfp4"
    # DDP keeps the replicas identical: both ranks end with the same parameters.
    a, b = m["param_checksums"]
    assert a == b
    losses = m["losses"]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
