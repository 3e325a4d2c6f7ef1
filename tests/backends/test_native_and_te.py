"""The native (Blackwell FP4 GEMM) and te backends: the parts that run without a Blackwell GPU."""

import pytest
import torch

from hf_nvfp4.backends import get_backend
from hf_nvfp4.backends.native import from_blocked, is_native_fp4_available, to_blocked
from hf_nvfp4.backends.te import INSTALL, is_te_available, te_recipe_kwargs
from hf_nvfp4.recipe import PRESETS, Recipe


def test_to_blocked_places_each_scale_where_cublas_reads_it():
    rows, cols = 130, 6  # padded to 256 x 8: 2 x 2 tiles of 128 x 4
    vals = torch.arange(rows * cols, dtype=torch.int32) % 251 + 1
    scales = vals.to(torch.uint8).view(rows, cols)
    flat = to_blocked(scales)
    assert flat.shape == (256 * 8,) and flat.dtype == torch.uint8
    for r, c in [(0, 0), (1, 0), (31, 3), (32, 0), (97, 2), (127, 3), (128, 4), (129, 5)]:
        tile = (r // 128) * 2 + c // 4
        i, j = divmod(r % 128, 32)
        assert flat[tile * 512 + j * 16 + i * 4 + c % 4] == scales[r, c], (r, c)
    assert int(flat.sum()) == int(scales.int().sum())  # padding is zero


@pytest.mark.parametrize("shape", [(1, 1), (128, 4), (300, 17)])
def test_blocked_layout_round_trips(shape):
    s = torch.randint(0, 255, shape, dtype=torch.uint8).view(torch.float8_e4m3fn)
    back = from_blocked(to_blocked(s), *shape)
    assert torch.equal(back.view(torch.uint8), s.view(torch.uint8))


def test_availability_reports_reasons_on_cpu():
    ok, why = is_native_fp4_available("cpu")
    assert not ok and why
    ok, why = is_te_available()
    assert not ok and ("transformer_engine" in why or "CUDA" in why or "capability" in why)


def test_backends_refuse_clearly_without_blackwell():
    with pytest.raises(RuntimeError, match="native backend cannot run here"):
        get_backend("native", "cpu")
    with pytest.raises(RuntimeError, match="te backend cannot run here"):
        get_backend("te", "cpu")
    assert get_backend("auto", "cpu").name == "reference"


def test_te_recipe_mapping():
    assert te_recipe_kwargs(PRESETS["nvfp4"]) == {
        "disable_rht": False, "disable_stochastic_rounding": False,
        "disable_2d_quantization": False,
    }
    kw = te_recipe_kwargs(Recipe(rht=False, stochastic_rounding=False, weight_2d=False))
    assert kw == {"disable_rht": True, "disable_stochastic_rounding": True,
                  "disable_2d_quantization": True}
    with pytest.raises(ValueError, match="every GEMM in NVFP4"):
        te_recipe_kwargs(PRESETS["mxfp4"])
    with pytest.raises(ValueError, match="rht_sign"):
        te_recipe_kwargs(Recipe(rht_sign=(1,) * 16))
    assert "transformer_engine[pytorch]" in INSTALL


def _emulated_fp4_scaled_mm(a, b_t, scale_a, scale_b, out_dtype):
    """What cuBLAS computes, from the operands as the native backend hands them over:
    refuses unaligned shapes as cuBLAS does, reads the scales in the blocked layout."""
    from hf_nvfp4.numerics import e2m1

    b = b_t.t()
    (m, k2), n = a.shape, b.shape[0]
    if (2 * k2) % 32 or m % 16 or n % 16:
        raise RuntimeError(f"unaligned FP4 GEMM {m}x{2 * k2}x{n}")

    def values(data, blocked, rows):
        codes = e2m1.decode(e2m1.unpack(data.view(torch.uint8)))
        scales = from_blocked(blocked, rows, 2 * k2 // 16).to(torch.float32)
        return codes * scales.repeat_interleave(16, dim=1)

    return (values(a, scale_a, m) @ values(b, scale_b, n).t()).to(out_dtype)


@pytest.mark.parametrize("m, k, n", [(1000, 64, 48), (40, 1008, 24), (64, 32, 16)])
def test_native_gemm_pads_ragged_shapes(monkeypatch, m, k, n):
    """A 1,000-token micro-batch: K = 1008 in wgrad is not a multiple of 32 (it used to raise)."""
    from hf_nvfp4.backends.native import NativeFP4Backend, pad_operand
    from hf_nvfp4.backends.reference import ReferenceBackend, reference_gemm
    from hf_nvfp4.recipe import QuantSpec

    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip(f"torch {torch.__version__} has no float4_e2m1fn_x2")
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_fp4_scaled_mm)
    g = torch.Generator().manual_seed(m + k)
    spec = QuantSpec("nvfp4", (1, 16))
    ref = ReferenceBackend()
    qa, _ = ref.quantize_rowcol(torch.randn(m, k, generator=g), spec, None)
    qb, _ = ref.quantize_rowcol(torch.randn(n, k, generator=g), spec, None)
    backend = NativeFP4Backend.__new__(NativeFP4Backend)  # no Triton quantizer needed here
    got = backend.gemm(qa, qb, torch.float32)
    want = reference_gemm(qa, qb, torch.float32)
    assert got.shape == (m, n)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    data, scale = pad_operand(qa.data, qa.scale)
    assert data.shape[0] % 16 == 0 and (2 * data.shape[1]) % 32 == 0
    assert scale.dtype == qa.scale.dtype and scale.shape == (data.shape[0], 2 * data.shape[1] // 16)
    assert torch.equal(data[:m, : qa.data.shape[1]], qa.data)
    assert int(data.sum()) == int(qa.data.sum())  # the padding is zero codes


def test_native_prepares_its_triton_quantizer_eagerly(monkeypatch):
    """build_plan prepares a backend that has ``prepare``: the native backend passes it to its
    Triton quantizer, so RHT matrices and FP8 checks are not first built inside a graph."""
    from hf_nvfp4.backends.native import NativeFP4Backend
    from hf_nvfp4.backends.triton_backend import TritonBackend

    seen = []
    monkeypatch.setattr(TritonBackend, "prepare",
                        lambda self, specs, device: seen.append((specs, device)))
    specs = PRESETS["nvfp4"].role_specs()
    NativeFP4Backend().prepare(specs, torch.device("cpu"))
    assert seen == [(specs, torch.device("cpu"))]
