"""The 16-point RHT: orthonormality, TE's default signs, inverses, errors."""

from __future__ import annotations

import pytest
import torch

from hf_nvfp4.numerics import TE_RHT_SIGN, hadamard_transform, rht_matrix
from hf_nvfp4.numerics.hadamard import sylvester_hadamard
from hf_nvfp4.numerics.testing import exact_rht, rht_tie_blocks

TE_SIGN = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)  # NUMERICS.md


def test_default_sign_is_te_vector():
    assert tuple(TE_RHT_SIGN) == TE_SIGN
    h = sylvester_hadamard(16)
    assert torch.equal(rht_matrix(), torch.diag(torch.tensor(TE_SIGN, dtype=torch.float32)) @ h / 4)
    assert torch.equal(rht_matrix(), rht_matrix(TE_SIGN))


def test_sylvester_structure():
    h = sylvester_hadamard(16)
    assert torch.equal(h[:8, :8], h[8:, :8]) and torch.equal(h[:8, 8:], -h[8:, 8:])
    assert torch.equal(h, h.T) and torch.equal(h @ h, 16 * torch.eye(16))
    assert set(h.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("sign", [None, [1, -1] * 8, [-1] * 16])
def test_orthonormal_exactly(sign):
    m = rht_matrix(sign)
    assert torch.equal(m.T @ m, torch.eye(16)) and torch.equal(m @ m.T, torch.eye(16))


def test_involution_and_inverse():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-64, 64, (8, 64), generator=g).float()  # exact through the transform
    plus = [1] * 16
    assert torch.equal(hadamard_transform(hadamard_transform(x, plus), plus), x)  # H/4 twice
    m = rht_matrix()
    y = hadamard_transform(x)
    back = (y.reshape(8, 4, 16) @ m.T).reshape(8, 64)  # inverse: (D H / 4)^T
    assert torch.equal(back, x)
    # a GEMM over the transformed reduction dimension is unchanged
    w = torch.randint(-64, 64, (5, 64), generator=g).float()
    assert torch.equal(hadamard_transform(x) @ hadamard_transform(w).T * 1.0, x @ w.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_dtype_and_norm(dtype):
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = hadamard_transform(x)
    assert y.dtype == dtype and y.shape == x.shape
    n0 = x.float().reshape(-1, 16).norm(dim=-1)
    n1 = y.float().reshape(-1, 16).norm(dim=-1)
    assert torch.allclose(n0, n1, rtol=torch.finfo(dtype).eps * 8)
    # exact accumulation, then one rounding to the input dtype
    want = (x.double().reshape(32, 8, 16) @ rht_matrix().double()).reshape(32, 128).to(dtype)
    assert torch.equal(y, want)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_correctly_rounded_at_midpoints(dtype):
    """Exact outputs within half an FP32 ulp of a BF16/FP16 midpoint, on both sides, and sums
    that cancel after an FP32 rounding: the transform is the exact one (integers) rounded
    once; accumulating in FP32 first, then rounding, gets about half of them wrong."""
    x = rht_tie_blocks(256, dtype, seed=11)
    want = exact_rht(x)
    assert torch.equal(_bits(hadamard_transform(x)), _bits(want))
    fp32_first = (x.float() @ rht_matrix()).to(dtype)
    assert (_bits(fp32_first) != _bits(want)).sum() > 1000


def test_issue_example():
    """Like the H200 vs Transformer Engine mismatch (exact -0.46777340327: BF16 -0.466796875,
    where rounding an FP32 sum on the midpoint -0.4677734375 to even gave -0.46875): an exact
    output a quarter FP32 ulp inside the midpoint."""
    from fractions import Fraction

    d = TE_SIGN
    x = torch.zeros(1, 16, dtype=torch.float64)
    x[0, 1], x[0, 2], x[0, 3] = 4 * d[1] * -0.466796875, 4 * d[2] * -2**-10, 4 * d[3] * 2**-27
    x = x.bfloat16()
    exact = sum(Fraction(float(v)) * d[i] / 4 for i, v in enumerate(x[0].tolist()))
    assert exact == Fraction(-0.4677734375) + Fraction(1, 2**27)
    y = hadamard_transform(x)
    assert float(y[0, 0]) == -0.466796875 == float(exact_rht(x)[0, 0])
    assert float((x.float() @ rht_matrix()).bfloat16()[0, 0]) == -0.46875


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_random_outputs_correctly_rounded(dtype):
    """Random blocks over many binades (BF16: spans up to 40, where the FP64 sum is exact;
    FP16: its whole range; FP32: up to 24): every output is the exact transform rounded
    once."""
    g = torch.Generator().manual_seed(12)
    span = {torch.bfloat16: 40, torch.float16: 30, torch.float32: 24}[dtype]
    e = torch.randint(-span, 1, (1024, 16), generator=g).double()
    x = torch.randn(1024, 16, generator=g, dtype=torch.float64) * torch.pow(2.0, e)
    if dtype == torch.float16:
        x = x * 2**14
    x = x.to(dtype)
    x[torch.rand(1024, 16, generator=g) < 0.1] = 0.0
    assert torch.equal(_bits(hadamard_transform(x)), _bits(exact_rht(x)))


def test_wide_blocks_round_the_fp64_sum():
    """Beyond 41 binades (BF16) the FP64 sum may drop bits: the output is that sum rounded
    once (documented), here the midpoint's even neighbour, not the exact transform's."""
    d = TE_SIGN
    x = torch.zeros(1, 16, dtype=torch.float64)
    x[0, 0], x[0, 1], x[0, 2] = 4 * d[0] * 1.0, 4 * d[1] * 2**-8, 4 * d[2] * 2**-70
    x = x.bfloat16()
    assert float(hadamard_transform(x)[0, 0]) == 1.0
    assert float(exact_rht(x)[0, 0]) == 1.0078125


@pytest.mark.parametrize("sign", [[1] * 15, [1] * 17, [1, 0] * 8, [2] * 16, torch.ones(4, 4)])
def test_bad_sign_vectors_raise(sign):
    with pytest.raises(ValueError, match="RHT sign"):
        rht_matrix(sign)
    with pytest.raises(ValueError, match="RHT sign"):
        hadamard_transform(torch.zeros(2, 16), sign)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of 16"):
        hadamard_transform(torch.zeros(2, 24))
    with pytest.raises(ValueError, match="power of two"):
        sylvester_hadamard(12)
