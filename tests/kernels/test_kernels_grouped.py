"""Grouped (MoE experts) Triton kernels vs the reference on each expert alone, bit for bit.

Every expert's copies must be exactly what ``ReferenceBackend`` gives on that expert's own
rows with that expert's SR keys: codes and E4M3 scales byte for byte, block values bit for
bit, global scales equal. The grouped GEMM equals the per-expert reference GEMM up to FP32
summation order.
"""

import pytest
import torch

from hf_nvfp4.backends.reference import ReferenceBackend, reference_gemm
from hf_nvfp4.kernels import is_triton_available
from hf_nvfp4.numerics.rng import derive_keys
from hf_nvfp4.numerics.scales import nvfp4_global_encode
from hf_nvfp4.recipe import Recipe

_OK, _REASON = is_triton_available()
pytestmark = [
    pytest.mark.skipif(not _OK, reason=_REASON),
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SPECS = Recipe().role_specs()
NO_RHT = Recipe(rht=False).role_specs()
COUNTS = [21, 0, 16, 5, 40]  # partial blocks, an expert without rows, an exact block


def _x(rows: int, k: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-2, 1, k)
    return x.to(dtype).to(DEV)


def _keys() -> torch.Tensor:
    return derive_keys(torch.tensor([5, 3]), torch.arange(len(COUNTS)), 2).to(DEV)


def _s_dec(amax: torch.Tensor) -> torch.Tensor:
    """The decode scale the reference derives from a global amax."""
    return 1.0 / nvfp4_global_encode(amax)


def _segments(x: torch.Tensor):
    return x[: sum(COUNTS)].split(COUNTS)


@pytest.mark.parametrize("specs", [SPECS, NO_RHT], ids=["rht", "no_rht"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["rtn", "sr"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rowcol_equals_reference_per_expert(specs, stochastic, dtype):
    from hf_nvfp4.kernels.grouped import GroupLayout, grouped_amax, grouped_quantize_rowcol

    row_spec, col_spec = (specs.dy, specs.dy_t) if stochastic else (specs.x, specs.x_t)
    x = _x(sum(COUNTS) + 3, 64, dtype)  # 3 sentinel rows past the experts' rows
    keys = _keys() if stochastic else None
    layout = GroupLayout.build(COUNTS, x.device)
    sign = tuple(col_spec.rht_sign) if col_spec.rht else None
    amax = grouped_amax(x, layout, True, True, sign)
    kw = dict(row=True, col=True, col_rht_sign=sign, row_sr=stochastic, col_sr=stochastic)
    rows, cdata, cscale = grouped_quantize_rowcol(x, layout, amax, keys, col_values=False, **kw)
    _, cvals, _ = grouped_quantize_rowcol(x, layout, amax, keys, col_values=True, **kw)

    ref = ReferenceBackend()
    k = x.shape[1]
    for g, (xe, start, off) in enumerate(zip(_segments(x), layout.starts, layout.off16,
                                             strict=True)):
        n = COUNTS[g]
        if n == 0:
            continue
        q_row, q_col = ref.quantize_rowcol(xe, row_spec, col_spec,
                                           keys[g] if keys is not None else None)
        m16 = q_col.data.shape[1] * 2
        assert torch.equal(rows[start:start + n].float(), q_row.block_values()), g
        lo = k * off
        data = cdata[lo // 2: (lo + k * m16) // 2].view(k, m16 // 2)
        scale = cscale[lo // 16: (lo + k * m16) // 16].view(k, m16 // 16)
        assert torch.equal(data, q_col.data), g
        assert torch.equal(scale, q_col.scale.view(torch.uint8)), g
        vals = cvals[lo: lo + k * m16].view(k, m16)
        assert torch.equal(vals.float(), q_col.block_values()), g
        for a, q in ((amax[g, 0], q_row), (amax[g, 1], q_col)):
            assert torch.equal(_s_dec(a), q.global_scale.reshape(())), g


@pytest.mark.parametrize("transposed", [False, True])
def test_weight_equals_reference_per_expert(transposed):
    from hf_nvfp4.kernels.grouped import grouped_quantize_weight

    g = torch.Generator().manual_seed(1)
    w = (torch.randn(3, 48, 32, generator=g) * torch.logspace(-3, 1, 32)).bfloat16().to(DEV)
    w[1] *= 1e-3  # its own global scale
    if transposed:
        w = w.transpose(1, 2).contiguous().transpose(1, 2)  # a [G, K, N] parameter's view
    amax, vals, data_t, scale_t = grouped_quantize_weight(w)
    ref = ReferenceBackend()
    for e in range(3):
        q_w, q_wt = ref.quantize_weight(w[e], SPECS.w)
        assert torch.equal(vals[e].float(), q_w.block_values()), e
        assert torch.equal(data_t[e], q_wt.data), e
        assert torch.equal(scale_t[e], q_wt.scale.view(torch.uint8)), e
        assert torch.equal(_s_dec(amax[e]), q_w.global_scale.reshape(())), e


def test_fp32_rows_are_refused():
    from hf_nvfp4.kernels.grouped import GroupLayout, grouped_amax

    x = _x(8, 16, torch.float32)
    with pytest.raises(ValueError, match="bf16 or fp16 rows; got torch.float32"):
        grouped_amax(x, GroupLayout.build([8], x.device), True, True, None)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """FP32 outputs of the same products summed in another order."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_grouped_gemms_equal_per_expert_reference_gemms():
    from hf_nvfp4.kernels.grouped import (
        GroupLayout,
        grouped_amax,
        grouped_gemm,
        grouped_quantize_rowcol,
        grouped_quantize_weight,
    )

    n, k = 48, 64
    x = _x(sum(COUNTS) + 2, k, seed=2)
    dy = _x(sum(COUNTS) + 2, n, seed=3)
    w = _x(len(COUNTS) * n, k, seed=4).view(len(COUNTS), n, k)
    layout = GroupLayout.build(COUNTS, x.device)
    sign = tuple(SPECS.x_t.rht_sign)
    kw = dict(row=True, col=True, col_rht_sign=sign, row_sr=False, col_sr=False,
              col_values=True)
    ax = grouped_amax(x, layout, True, True, sign)
    xrow, xcol, _ = grouped_quantize_rowcol(x, layout, ax, None, **kw)
    ady = grouped_amax(dy, layout, True, True, sign)
    dyrow, dycol, _ = grouped_quantize_rowcol(dy, layout, ady, None, **kw)
    aw, wvals, _, _ = grouped_quantize_weight(w)

    y = torch.full((x.shape[0], n), 7.0, device=DEV)
    grouped_gemm(xrow, wvals, y, ax[:, 0], aw, layout, wgrad=False)
    dw = torch.full((len(COUNTS), k, n), 7.0, device=DEV).transpose(1, 2)  # strided output
    grouped_gemm(dycol, xcol, dw, ady[:, 1], ax[:, 1], layout, wgrad=True)

    ref = ReferenceBackend()
    for g, (xe, dye) in enumerate(zip(_segments(x), _segments(dy), strict=True)):
        if COUNTS[g] == 0:
            assert torch.equal(dw[g], torch.zeros_like(dw[g]))
            continue
        s = layout.starts[g]
        q_x, q_xt = ref.quantize_rowcol(xe, SPECS.x, SPECS.x_t)
        _, q_dyt = ref.quantize_rowcol(dye, None, SPECS.x_t)
        q_w, _ = ref.quantize_weight(w[g], SPECS.w)
        _close(y[s:s + COUNTS[g]], reference_gemm(q_x, q_w, torch.float32))
        _close(dw[g], reference_gemm(q_dyt, q_xt, torch.float32))
    assert torch.equal(y[sum(COUNTS):], torch.full((2, n), 7.0, device=DEV))  # untouched


def test_rht_correctly_rounded_at_midpoints():
    """The grouped amax and row/column kernels at RHT midpoint ties (redo path): each
    expert's column amax is the correctly rounded maximum (expert 0: 1.2578125, where
    rounding the FP32 sum gives 1.25) and its column copy is the reference's."""
    from hf_nvfp4.kernels.grouped import GroupLayout, grouped_amax, grouped_quantize_rowcol
    from hf_nvfp4.numerics.testing import exact_rht, rht_amax_tie_blocks, rht_tie_blocks

    counts, k = [16, 32], 16
    sign = tuple(SPECS.x_t.rht_sign)
    blocks = torch.cat([rht_amax_tie_blocks(16, seed=6), rht_tie_blocks(32, torch.bfloat16,
                                                                        seed=7)])
    # token block t (16 rows) of feature c holds blocks[16 t + c]: expert 0 the amax ties
    x = blocks.reshape(3, k, 16).transpose(1, 2).reshape(48, k).contiguous().to(DEV)
    layout = GroupLayout.build(counts, x.device)
    amax = grouped_amax(x, layout, True, True, sign)
    assert float(amax[0, 1]) == 1.2578125
    assert float(amax[1, 1]) == float(exact_rht(blocks[16:]).float().abs().max())
    rows, cdata, cscale = grouped_quantize_rowcol(
        x, layout, amax, None, row=True, col=True, col_rht_sign=sign, row_sr=False,
        col_sr=False, col_values=False)
    ref = ReferenceBackend()
    for g, (start, off) in enumerate(zip(layout.starts, layout.off16, strict=True)):
        xe = x[start:start + counts[g]]
        q_row, q_col = ref.quantize_rowcol(xe, SPECS.x, SPECS.x_t, None)
        m16 = counts[g]
        lo = k * off
        assert torch.equal(cdata[lo // 2: (lo + k * m16) // 2].view(k, m16 // 2), q_col.data)
        assert torch.equal(cscale[lo // 16: (lo + k * m16) // 16].view(k, m16 // 16),
                           q_col.scale.view(torch.uint8))
        assert torch.equal(_s_dec(amax[g, 1]), q_col.global_scale.reshape(()))


def test_amax_fix_up_rounds_or_redoes_each_experts_maximum():
    """The BF16 RHT amax's fix-up launch per expert, on ordinary rows with one midpoint-tie
    block placed in a later program and column program: expert 1 (its FP32 maximum next to
    the midpoint) redoes that block and gets the exact 1.2578125 (rounding the FP32 sum gives
    1.25); expert 2 holds the same tie and a louder, exactly representable maximum (3.0), so
    its maximum is rounded once and the tie does not matter; expert 0 has no tie. Each equals
    the dense amax pass on that expert's rows alone."""
    from hf_nvfp4.kernels.amax import amax_rowcol
    from hf_nvfp4.kernels.grouped import GroupLayout, grouped_amax
    from hf_nvfp4.numerics.testing import exact_rht, rht_amax_tie_blocks

    counts, k = [40, 96, 64], 128
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(sum(counts), k, generator=g) * 0.05).bfloat16()
    tie = rht_amax_tie_blocks(1, seed=14)[0]
    x[40 + 64:40 + 80, 70] = tie  # expert 1, its fifth block, column program 1
    x[136 + 32:136 + 48, 9] = tie  # expert 2
    x[136:152, 100] = 0.0
    x[136, 100] = 12.0  # its block's 16 outputs are +-12/4
    sign = tuple(SPECS.x_t.rht_sign)
    layout = GroupLayout.build(counts, torch.device(DEV))
    got = grouped_amax(x.to(DEV), layout, True, True, sign).cpu()
    want = [None, 1.2578125, 3.0]
    for e, xe in enumerate(x.split(counts)):
        padded = torch.nn.functional.pad(xe, (0, 0, 0, -len(xe) % 16))  # zeros to M16
        exact = float(exact_rht(padded.t().contiguous().reshape(-1, 16)).abs().max())
        if want[e] is not None:
            assert exact == want[e]
        dense = amax_rowcol(xe.contiguous().to(DEV), True, True, sign).cpu()
        assert float(got[e, 1]) == exact == float(dense[1]), e
        assert float(got[e, 0]) == float(xe.float().abs().max()) == float(dense[0]), e
