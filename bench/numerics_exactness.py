"""Package vs independent oracle, bit for bit, on many millions of values.

Compares hf_nvfp4.numerics.quantize with tests/numerics/oracle.py (numpy, different code
paths) on every input distribution of tests/numerics/cases.py: NVFP4 1x16, 1x16 + RHT and
16x16, FP32/BF16/FP16 inputs, nearest rounding. Counts mismatched element bytes, block-scale
bytes and global-scale words (all must be 0), prints a table, writes
bench/results/numerics_exactness.json.

    python bench/numerics_exactness.py [--rows 256 --cols 1024 --chunks 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_nvfp4.numerics import quantize  # noqa: E402
from tests.numerics import oracle  # noqa: E402
from tests.numerics.cases import DISTRIBUTIONS, DTYPES, make_input  # noqa: E402

CONFIGS = [  # (name, fmt, tile, rht)
    ("nvfp4 1x16", "nvfp4", (1, 16), False),
    ("nvfp4 1x16 rht", "nvfp4", (1, 16), True),
    ("nvfp4 16x16", "nvfp4", (16, 16), False),
]
EXTRA = [  # smaller cross-checks of the other formats
    ("mxfp4 1x32", "mxfp4", (1, 32), False),
    ("mxfp8 1x32", "mxfp8", (1, 32), False),
    ("fp8_block 1x128", "fp8_block", (1, 128), False),
    ("fp8_block 128x128", "fp8_block", (128, 128), False),
]


def compare(x: torch.Tensor, fmt: str, tile, rht: bool) -> dict:
    q = quantize(x, fmt, tile=tile, rht=rht)
    dtype = str(x.dtype).removeprefix("torch.")
    o = oracle.quantize(x.float().numpy(), fmt, tile, rht, dtype)
    data = q.data.view(torch.uint8).numpy()
    scale = q.scale.view(torch.uint8).numpy()
    out = {
        "values": x.numel(),
        "data_bytes": int(data.size),
        "data_mismatch": int((data != o.data).sum()),
        "scale_bytes": int(scale.size),
        "scale_mismatch": int((scale != o.scale).sum()),
        "global_mismatch": 0,
    }
    if o.global_scale_bits is not None:
        bits = int(q.global_scale.reshape(1).view(torch.int32)) & 0xFFFFFFFF
        out["global_mismatch"] = int(bits != o.global_scale_bits)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--chunks", type=int, default=1, help="tensors per (config, dtype, dist)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/numerics_exactness.json"))
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    total = {"values": 0, "data_mismatch": 0, "scale_mismatch": 0, "global_mismatch": 0}
    header = f"{'config':<18} {'dtype':<9} {'dist':<15} {'values':>9} {'data≠':>6} {'scale≠':>6}"
    print(header + f" {'global≠':>7}")
    print("-" * (len(header) + 8))
    for configs, rows_, cols_ in ((CONFIGS, args.rows, args.cols), (EXTRA, 128, 512)):
        for name, fmt, tile, rht in configs:
            for dtype in DTYPES:
                for di, dist in enumerate(DISTRIBUTIONS):
                    acc = None
                    for c in range(args.chunks):
                        x = make_input(dist, (rows_, cols_), dtype, seed=1000 * di + c)
                        r = compare(x, fmt, tile, rht)
                        acc = r if acc is None else {k: acc[k] + r[k] for k in acc}
                    row = {
                        "config": name,
                        "dtype": str(dtype).removeprefix("torch."),
                        "dist": dist,
                        **acc,
                    }
                    rows.append(row)
                    for k in total:
                        total[k] += acc[k]
                    print(
                        f"{name:<18} {row['dtype']:<9} {dist:<15} {acc['values']:>9} "
                        f"{acc['data_mismatch']:>6} {acc['scale_mismatch']:>6} "
                        f"{acc['global_mismatch']:>7}"
                    )
    elapsed = time.time() - t0
    nv = sum(r["values"] for r in rows if r["config"].startswith("nvfp4"))
    print("-" * (len(header) + 8))
    print(
        f"total values {total['values']:,} (NVFP4 {nv:,}); mismatched element bytes "
        f"{total['data_mismatch']}, scale bytes {total['scale_mismatch']}, global scales "
        f"{total['global_mismatch']}; {elapsed:.1f} s"
    )
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seconds": round(elapsed, 1),
        "values": total["values"],
        "nvfp4_values": nv,
        "data_mismatch": total["data_mismatch"],
        "scale_mismatch": total["scale_mismatch"],
        "global_mismatch": total["global_mismatch"],
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    bad = total["data_mismatch"] + total["scale_mismatch"] + total["global_mismatch"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
