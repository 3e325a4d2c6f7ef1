"""Emulated NVFP4 GEMMs vs the reference GEMM, in Triton's CPU interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_nvfp4.backends import get_backend  # noqa: E402
from hf_nvfp4.backends.reference import ReferenceBackend, reference_gemm  # noqa: E402
from hf_nvfp4.kernels import is_triton_available  # noqa: E402
from hf_nvfp4.recipe import Recipe  # noqa: E402

_OK, _REASON = is_triton_available()
pytestmark = [
    pytest.mark.skipif(not _OK, reason=_REASON),
    # div_rn(1, 0) of zero blocks: the interpreter's numpy warns, the GPU gives inf silently.
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
]
SPECS = Recipe().role_specs()


def _rand(m: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.fixture(scope="module")
def operands():
    """The three GEMMs of a linear layer with ragged M (40 tokens), quantized by reference."""
    ref = ReferenceBackend()
    m, k, n = 40, 64, 48
    x, w, dy = _rand(m, k, 0), _rand(n, k, 1), _rand(m, n, 2)
    x_row, x_col = ref.quantize_rowcol(x, SPECS.x, SPECS.x_t, None)
    w_q, w_t = ref.quantize_weight(w, SPECS.w)
    dy_row, dy_col = ref.quantize_rowcol(dy, SPECS.dy, SPECS.dy_t, torch.Generator())
    return {"fprop": (x_row, w_q), "dgrad": (dy_row, w_t), "wgrad": (dy_col, x_col)}


@pytest.mark.parametrize("role", ["fprop", "dgrad", "wgrad"])
@pytest.mark.parametrize(
    "strategy", [pytest.param("dequant+triton", id="dequant"), pytest.param("fused", id="fused")]
)
@pytest.mark.parametrize(
    "out_dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_gemm_matches_reference(operands, role, strategy, out_dtype):
    from hf_nvfp4.kernels.gemm import gemm_nvfp4

    a, b = operands[role]
    got = gemm_nvfp4(
        (a.data, a.scale.view(torch.uint8), a.global_scale, a.shape[0]),
        (b.data, b.scale.view(torch.uint8), b.global_scale, b.shape[0]),
        out_dtype,
        strategy=strategy,
    )
    want = reference_gemm(a, b, out_dtype)
    assert got.shape == want.shape and got.dtype == want.dtype
    # Only the FP32 summation order differs: ~1e-7 relative in FP32, one BF16 ulp at most.
    tol = 1e-5 if out_dtype == torch.float32 else 2**-7
    rel = (got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-3)
    assert float(rel.max()) <= tol, float(rel.max())


def test_backend_gemm_and_registry(operands):
    backend = get_backend("triton")
    assert backend.name == "triton"
    a, b = operands["fprop"]
    got = backend.gemm(a, b, torch.float32)
    torch.testing.assert_close(got, reference_gemm(a, b, torch.float32), rtol=1e-5, atol=1e-6)
