"""FP8 block-scaled GEMMs through torch._scaled_mm (GPU) and the layouts they read (CPU)."""

import pytest
import torch

from hf_nvfp4.backends.fp8_gemm import (
    ACCUMULATION_TOLERANCE,
    block_scaled_mm_available,
    fp8_block_gemm,
    row_block_scales,
    row_block_scales_b,
    tile_scales,
)
from hf_nvfp4.backends.reference import reference_gemm
from hf_nvfp4.numerics.quantize import quantize

CUDA = torch.cuda.is_available()


def test_tile_scales_take_one_scale_per_tile():
    w = torch.randn(256, 384) * torch.arange(1, 385)
    q = quantize(w, "fp8_block", tile=(128, 128))
    s = tile_scales(q)
    assert s.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            amax = w[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)].abs().amax()
            assert s[i, j] == q.scale[128 * i + 5, j]  # every row of a tile repeats it
            assert torch.allclose(s[i, j], amax / 448, rtol=1e-6)
    row = quantize(w, "fp8_block", tile=(1, 128))
    assert tile_scales(row) is row.scale


def test_refuses_what_it_cannot_run():
    x = quantize(torch.randn(32, 128), "fp8_block", tile=(1, 128))
    w = quantize(torch.randn(16, 128), "fp8_block", tile=(128, 128))
    if not CUDA:
        assert not block_scaled_mm_available(torch.device("cpu"))[0]
        assert fp8_block_gemm(x, w, torch.float32) is None
    assert fp8_block_gemm(w, x, torch.float32) is None  # 128x128 tiles as a: never
    odd = quantize(torch.randn(40, 128), "fp8_block", tile=(1, 128))
    assert fp8_block_gemm(x, odd, torch.float32) is None  # rows not a multiple of 16
    nv = quantize(torch.randn(32, 128), "nvfp4")
    assert fp8_block_gemm(nv, nv, torch.float32) is None


@pytest.mark.skipif(not CUDA, reason="FP8 tensor cores need a CUDA GPU (sm_90+)")
@pytest.mark.parametrize("m, k, n", [(256, 512, 384), (4096, 1024, 2048), (208, 640, 200)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b_tile", [(128, 128), (1, 128)], ids=["fprop_dgrad", "wgrad"])
def test_matches_reference_up_to_summation_order(m, k, n, out_dtype, b_tile):
    ok, why = block_scaled_mm_available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    if b_tile == (1, 128) and n % 16:
        n += 16 - n % 16  # the 1x128 x 1x128 path needs rows in multiples of 16
    g = torch.Generator(device="cuda").manual_seed(m)
    x = quantize(torch.randn(m, k, device="cuda", generator=g), "fp8_block", tile=(1, 128))
    w = quantize(torch.randn(n, k, device="cuda", generator=g) * 0.02, "fp8_block",
                 tile=b_tile)
    got = fp8_block_gemm(x, w, out_dtype)
    assert got is not None, "the block-scaled path did not run (self-check or layout)"
    want = reference_gemm(x, w, torch.float32)
    # FP8 tensor cores accumulate in fewer bits than FP32 (see the module); BF16 output
    # rounds once more
    tol = 2**-8 if out_dtype == torch.bfloat16 else 0.0
    assert got.shape == (m, n)
    bound = tol * want.abs() + ACCUMULATION_TOLERANCE * want.abs().max()
    assert ((got.float() - want).abs() <= bound).all()


@pytest.mark.parametrize("k", [384, 512, 640])
def test_scale_layouts_cublas_reads(k):
    g = torch.Generator().manual_seed(k)
    x = quantize(torch.randn(64, k, generator=g), "fp8_block", tile=(1, 128))
    w = quantize(torch.randn(256, k, generator=g), "fp8_block", tile=(128, 128))
    sa = row_block_scales(x)
    assert sa.shape == (64, k // 128) and sa.stride() == (1, 64)  # M-major
    assert torch.equal(sa, x.scale)
    sb = row_block_scales_b(w)  # [K/128, N], N fastest, one scale per row of b
    assert sb.shape == (k // 128, 256) and sb.stride() == (256, 1)
    # a 128x128 tile's scale on each of its rows: the 1x128 x 1x128 product is the tiled one
    assert torch.equal(sb, tile_scales(w).repeat_interleave(128, 0).t())
    xb = quantize(torch.randn(48, k, generator=g), "fp8_block", tile=(1, 128))
    assert torch.equal(row_block_scales_b(xb), xb.scale.t())


def test_a_failing_self_check_warns_and_keeps_the_path_off(monkeypatch):
    """A wrong _scaled_mm (as torch 2.11 gave with unpadded 128x128 scales) is caught with a
    warning naming the error; the reference GEMM is used instead (CPU: a stand-in matmul)."""
    import hf_nvfp4.backends.fp8_gemm as fp8

    monkeypatch.setattr(fp8, "block_scaled_mm_available", lambda device: (True, "ok"))
    monkeypatch.setattr(fp8, "_CHECKED", {})
    monkeypatch.setattr(fp8, "_scaled_mm", lambda a, b, out_dtype: 2 * reference_gemm(
        a, b, out_dtype))  # wrong by a factor of two
    x = quantize(torch.randn(32, 128), "fp8_block", tile=(1, 128))
    w = quantize(torch.randn(128, 128), "fp8_block", tile=(128, 128))
    with pytest.warns(RuntimeWarning, match="fail their self-check.*error against the reference"):
        assert fp8_block_gemm(x, w, torch.float32) is None
    assert fp8._CHECKED == {("cpu", None, (128, 128)): False}
    monkeypatch.setattr(fp8, "_CHECKED", {})
    monkeypatch.setattr(fp8, "_scaled_mm", lambda a, b, out_dtype: reference_gemm(
        a, b, out_dtype))  # right: the path turns on
    assert torch.equal(fp8_block_gemm(x, w, torch.float32), reference_gemm(x, w, torch.float32))
