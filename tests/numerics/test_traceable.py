"""The reference numerics trace under torch.compile on a device other than the CPU (meta
stands in for CUDA here): no constant tensor made on the CPU inside the traced code."""

import torch

from hf_nvfp4.numerics import e2m1
from hf_nvfp4.numerics.quantize import quantize


def test_decode_equals_the_table_signed_zero_included():
    vals = torch.tensor(e2m1.E2M1_VALUES)
    want = torch.cat([vals, -vals])
    got = e2m1.decode(torch.arange(16, dtype=torch.uint8))
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))


def test_mxfp4_block_values_trace_on_another_device():
    def values(x):
        return quantize(x, "mxfp4", tile=(1, 32), allow_nonfinite=True).block_values()

    x = torch.empty(64, 128, dtype=torch.bfloat16, device="meta")
    out = torch.compile(values, backend="aot_eager", fullgraph=True)(x)
    assert out.shape == (64, 128) and out.device.type == "meta"
