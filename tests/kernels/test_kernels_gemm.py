"""Emulated NVFP4 GEMMs vs the reference GEMM: compiled on a GPU, else in Triton's CPU
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no nvidia-smi)."""

import pytest
import torch

from hf_nvfp4.backends import get_backend
from hf_nvfp4.backends.reference import ReferenceBackend, reference_gemm
from hf_nvfp4.kernels import is_triton_available
from hf_nvfp4.recipe import Recipe

_OK, _REASON = is_triton_available()
pytestmark = [
    pytest.mark.skipif(not _OK, reason=_REASON),
    # div_rn(1, 0) of zero blocks: the interpreter's numpy warns, the GPU gives inf silently.
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
]
SPECS = Recipe().role_specs()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(m: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.fixture(scope="module")
def operands():
    """The three GEMMs of a linear layer with ragged M (40 tokens), quantized by reference."""
    ref = ReferenceBackend()
    m, k, n = 40, 64, 48
    x, w, dy = (_rand(*s, i).to(DEVICE) for i, s in enumerate(((m, k), (n, k), (m, n))))
    x_row, x_col = ref.quantize_rowcol(x, SPECS.x, SPECS.x_t, None)
    w_q, w_t = ref.quantize_weight(w, SPECS.w)
    dy_row, dy_col = ref.quantize_rowcol(dy, SPECS.dy, SPECS.dy_t, torch.Generator())
    return {"fprop": (x_row, w_q), "dgrad": (dy_row, w_t), "wgrad": (dy_col, x_col)}


@pytest.mark.parametrize("role", ["fprop", "dgrad", "wgrad"])
@pytest.mark.parametrize(
    "strategy",
    [pytest.param("dequant+triton", id="dequant"), pytest.param("fused", id="fused")],
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


def test_gemm_timed_choice_matches_reference(operands):
    from hf_nvfp4.kernels.gemm import gemm_nvfp4

    a, b = operands["fprop"]
    got = gemm_nvfp4((a.data, a.scale.view(torch.uint8), a.global_scale, a.shape[0]),
                     (b.data, b.scale.view(torch.uint8), b.global_scale, b.shape[0]),
                     torch.float32)
    torch.testing.assert_close(got, reference_gemm(a, b, torch.float32), rtol=1e-5, atol=1e-6)


def test_backend_gemm_and_registry(operands):
    backend = get_backend("triton")
    assert backend.name == "triton"
    a, b = operands["fprop"]
    got = backend.gemm(a, b, torch.float32)
    torch.testing.assert_close(got, reference_gemm(a, b, torch.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("role", ["fprop", "dgrad", "wgrad"])
def test_mxfp4_gemms_run_in_bf16_and_match_reference(role, monkeypatch):
    """MXFP4 block values are exact in BF16: the backend's GEMM (BF16 operands, FP32
    accumulation) equals the reference FP32 GEMM up to summation order, for all three GEMMs
    of the mxfp4 recipe (RHT + SR copies, 32x32 weight tiles), and never calls the
    reference GEMM."""
    import hf_nvfp4.backends.triton_backend as tb

    specs = Recipe("mxfp4", "mxfp4", "mxfp4").role_specs()
    ref = ReferenceBackend()
    m, k, n = 40, 64, 96
    x, w, dy = (_rand(*s, 10 + i).to(DEVICE) for i, s in enumerate(((m, k), (n, k), (m, n))))
    ops = {"fprop": (ref.quantize_rowcol(x, specs.x, None)[0], ref.quantize_weight(w, specs.w)[0]),
           "dgrad": (ref.quantize_rowcol(dy, specs.dy, None, torch.Generator())[0],
                     ref.quantize_weight(w, specs.w_dgrad)[1]),
           "wgrad": (ref.quantize_rowcol(dy, None, specs.dy_t, torch.Generator())[1],
                     ref.quantize_rowcol(x, None, specs.x_t)[1])}
    a, b = ops[role]
    want = reference_gemm(a, b, torch.float32)
    monkeypatch.setattr(tb, "reference_gemm", None)  # any fallback would raise
    got = get_backend("triton").gemm(a, b, torch.float32)
    assert got.shape == want.shape == (a.shape[0], b.shape[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _poison_allocator(m: int, n: int, dtype: torch.dtype) -> None:
    """Free a NaN block of the output's size: CUDA's caching allocator hands it out next."""
    torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("mkn", [(40, 64, 48), (130, 96, 72), (33, 48, 17)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "out_dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_gemm_scaled_matches_fp32_reference(mkn, out_dtype):
    from hf_nvfp4.kernels.gemm import gemm_scaled, gemm_scaled_configs

    m, k, n = mkn
    a, b = _rand(m, k, 3).to(DEVICE), _rand(n, k, 4).to(DEVICE)
    gsa = torch.tensor(0.37, device=DEVICE)
    gsb = torch.tensor([1.9], device=DEVICE)
    want = (a.float() @ b.float().T) * (gsa * gsb)
    # FP32 sums of K products in any order: |err| <= K * 2^-24 * sum |a b| (plus one BF16
    # rounding of a value that may sit on the other side of a rounding boundary).
    bound = k * 2.0**-24 * (a.float().abs() @ b.float().abs().T) * (gsa * gsb) + 1e-30
    if out_dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * want.abs()
    configs = list(gemm_scaled_configs(a, b))
    # Every config (and the timed choice) on one shape; the others take the first config,
    # which keeps the number of compiled variants small on a GPU.
    for config in [None, *configs] if mkn == (130, 96, 72) else configs[:1]:
        _poison_allocator(m, n, out_dtype)
        got = gemm_scaled(a, b, gsa, gsb, out_dtype, config=config)
        assert got.shape == (m, n) and got.dtype == out_dtype, config
        err = (got.float() - want).abs()
        assert bool(torch.isfinite(got).all()), config
        assert bool((err <= bound).all()), (config, float(err.max()))
