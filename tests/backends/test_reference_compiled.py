"""The reference quantization under torch.compile (the Triton backend's fallback on CUDA for
formats without kernels) gives the eager reference's bits."""

import pytest
import torch

from hf_nvfp4.backends.reference import ReferenceBackend
from hf_nvfp4.recipe import PRESETS

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# Every role of the FP8 and MXFP4 recipes on the GPU; the MXFP4 gradient roles (RHT + SR,
# the longest chain) on the CPU, where each inductor compile takes ~25 s.
CASES = [(r, role) for r in ("mxfp4", "fp8_block") for role in ("x", "w", "dy", "dy_t", "x_t")]
if not CUDA:
    CASES = [("mxfp4", "dy_t")]


@pytest.mark.parametrize("recipe, role", CASES, ids=[f"{r}-{o}" for r, o in CASES])
def test_compiled_equals_eager_bitwise(recipe, role):
    spec = getattr(PRESETS[recipe].role_specs(), role)
    eager = ReferenceBackend(check_finite=False)
    compiled = ReferenceBackend(check_finite=False, compiled=True)
    g = torch.Generator().manual_seed(7)
    for rows, cols in ((96, 256), (160, 384)):  # a second shape: the recompiled function
        x = (torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 5)
        x = x.to(DEV, torch.bfloat16)
        keys = torch.tensor([11, -5], dtype=torch.int32, device=DEV)
        if role == "w":
            pairs = zip(eager.quantize_weight(x, spec), compiled.quantize_weight(x, spec))
        else:
            pairs = [(eager.quantize_rowcol(x, spec, None, keys)[0],
                      compiled.quantize_rowcol(x, spec, None, keys)[0])]
        for want, got in pairs:
            assert (got.fmt, got.shape, got.tile, got.rht) == (want.fmt, want.shape, want.tile,
                                                               want.rht)
            assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))
            assert torch.equal(got.scale.view(torch.uint8), want.scale.view(torch.uint8))
            assert (got.global_scale is None) == (want.global_scale is None)
