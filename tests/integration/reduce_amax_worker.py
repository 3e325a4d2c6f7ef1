"""Worker for test_ddp.py's reduce_amax test: two gloo ranks exercising NVFP4Linear's
cross-rank amax directly. Launched by ``torch.distributed.run``; writes one JSON per rank."""

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hf_nvfp4 import NVFP4Linear
from hf_nvfp4.numerics.testing import assert_qtensor_equal
from hf_nvfp4.quant.quantizer import Quantizer
from hf_nvfp4.recipe import Recipe
from hf_nvfp4.telemetry import _mean_over_ranks

RECIPE = {"preset": "nvfp4", "stochastic_rounding": False}


def _layer(reduce_amax: bool, recipe: dict = RECIPE) -> NVFP4Linear:
    torch.manual_seed(0)
    return NVFP4Linear(64, 32, recipe=recipe, backend="reference", sr_seed=3,
                       reduce_amax=reduce_amax)


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(1)
    shards = [torch.randn(16, 64, generator=gen), 100 * torch.randn(16, 64, generator=gen)]
    layer = _layer(True)
    result = {}

    # An evaluation forward on rank 0 only must not issue collectives (it would pair with
    # rank 1's next all-reduce below and then hang).
    if rank == 0:
        layer.eval()
        with torch.no_grad():
            layer(shards[0])
            layer(shards[0])
        layer.train()

    # Training: each rank's shard quantized with the amax of the whole batch, i.e. exactly
    # the rows a single process computes on the concatenated batch.
    x = shards[rank].clone().requires_grad_()
    y = layer(x)
    y.sum().backward()
    whole = _layer(False)(torch.cat(shards))
    local = _layer(False)(shards[rank])
    rows = slice(16 * rank, 16 * rank + 16)
    result["equals_single_process"] = torch.equal(y.detach(), whole.detach()[rows])
    result["differs_from_local_amax"] = not torch.equal(y.detach(), local.detach())

    # A NaN on one rank propagates instead of raising between collectives.
    bad = shards[rank].clone()
    if rank == 1:
        bad[0, 0] = float("nan")
    result["nan_forward_completed"] = bool(layer(bad).shape == (16, 32))

    # The Triton path's quantizer (amax kernel -> all-reduce -> encode kernel) quantizes
    # exactly as the reference reduced path: codes, scales and global scales, with and
    # without SR, and its reduced amaxes are the whole batch's.
    specs = Recipe().role_specs()
    keys = torch.tensor([11, -22], dtype=torch.int32)
    same = []
    for role, row, col in (("input", specs.x, specs.x_t), ("grad_output", specs.dy, specs.dy_t)):
        tri = Quantizer(role, row, col, "triton", reduce_amax=True)
        ref = Quantizer(role, row, col, "reference", reduce_amax=True)
        got, want = tri(shards[rank], keys), ref(shards[rank], keys)
        for g, w in ((got.row, want.row), (got.col, want.col)):
            try:
                assert_qtensor_equal(g, w)
                same.append(True)
            except AssertionError:
                same.append(False)
        whole = Quantizer(role, row, col, "reference").amax(torch.cat(shards))
        same.append(torch.equal(tri.reduce(tri.amax(shards[rank])), whole))
    result["triton_reduced_equals_reference"] = all(same) and len(same) == 6

    # Stochastic rounding: ranks draw from different streams.
    sr = _layer(False, {"preset": "nvfp4"})
    seeds = [torch.zeros(2, dtype=torch.int32) for _ in range(2)]
    dist.all_gather(seeds, sr._sr_keys())
    result["sr_seeds"] = [s.tolist() for s in seeds]
    # Telemetry statistics (and the auto-switch decision on them) are means over ranks.
    result["telemetry_mean"] = _mean_over_ranks([float(rank), 10.0 * rank], layer)
    dist.barrier()
    dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
