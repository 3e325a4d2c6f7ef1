"""The 16-point RHT: orthonormality, TE's default signs, inverses, errors."""

from __future__ import annotations

import pytest
import torch

from hf_nvfp4.numerics import TE_RHT_SIGN, hadamard_transform, rht_matrix
from hf_nvfp4.numerics.hadamard import sylvester_hadamard

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
    # FP32 accumulate, then one rounding to the input dtype
    want = (x.float().reshape(32, 8, 16) @ rht_matrix()).reshape(32, 128).to(dtype)
    assert torch.equal(y, want)


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


def test_hadamard_transform_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces the RHT with a sign tuple (torch 2.11 refused the
    sign check when it ran on a tensor: a data-dependent branch) and gives the eager bits;
    a bad sign, tuple or tensor, still raises naming its values."""
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    f = torch.compile(lambda t: hadamard_transform(t, TE_RHT_SIGN), fullgraph=True)
    assert torch.equal(f(x), hadamard_transform(x, TE_RHT_SIGN))
    for bad in ((1,) * 15 + (2,), torch.ones(15)):
        with pytest.raises(ValueError, match="16 entries of"):
            rht_matrix(bad)
