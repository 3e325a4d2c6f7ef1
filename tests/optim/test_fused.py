"""The fused Triton AdamW step (hf_nvfp4.kernels.adamw) against the unfused QuantizedAdamW.

Run on the CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when
there is no GPU). The FP32 update may differ in the last bit (multiply-add contraction), so
parameters are compared to a few ULPs and the packed moments by the fraction of codes and
scales that differ, which must be tiny: a 1-ULP change flips a stochastic-rounding decision
only when the draw falls inside that ULP.
"""

import io

import pytest
import torch
from torch import nn

from hf_nvfp4.kernels import is_triton_available
from hf_nvfp4.numerics.e2m1 import unpack
from hf_nvfp4.optim import QuantizedAdamW

pytestmark = pytest.mark.skipif(not is_triton_available()[0], reason=is_triton_available()[1])

SHAPES = ((64, 96), (5000,), (33, 275))  # 275: the flat moment ends in a partial block
# On a GPU machine the fused path runs the compiled kernels on CUDA parameters (CPU
# parameters would silently take the unfused path there: no interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(**kw):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(DEVICE) for s in SHAPES]
    a = [nn.Parameter(t.clone()) for t in init]
    b = [nn.Parameter(t.clone()) for t in init]
    base = dict(lr=1e-2, weight_decay=0.1, min_quantized_numel=0, **kw)
    return a, QuantizedAdamW(a, fused=False, **base), b, QuantizedAdamW(b, fused=True, **base)


def _steps(params_a, opt_a, params_b, opt_b, n, start=0):
    for t in range(start, start + n):
        gen = torch.Generator().manual_seed(100 + t)
        for pa, pb in zip(params_a, params_b, strict=True):
            g = (torch.randn(pa.shape, generator=gen) * (0.05 + t)).to(DEVICE)
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()


def _compare(opt_a, params_a, opt_b, params_b):
    assert set(opt_b._scratch) == set(params_b)  # every parameter went through the kernels
    for pa, pb in zip(params_a, params_b, strict=True):
        ulp = torch.finfo(torch.float32).eps * pa.detach().abs().max()
        assert (pa - pb).abs().max() <= 4 * ulp
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb)
        for name in ("exp_avg", "exp_avg_sq"):
            codes_a, codes_b = unpack(sa[name + "_data"]), unpack(sb[name + "_data"])
            assert (codes_a != codes_b).float().mean() <= 1e-3
            scales_a = sa[name + "_scale"].view(torch.uint8)
            scales_b = sb[name + "_scale"].view(torch.uint8)
            assert (scales_a != scales_b).float().mean() <= 1e-2
            torch.testing.assert_close(sa[name + "_global_scale"], sb[name + "_global_scale"],
                                       rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "kw",
    [
        {"betas": (0.9, 0.999)},
        {"betas": (0.3, 0.95)},  # lerp weight >= 0.5: torch's other lerp formula
        {"square_tiles": True},  # one scale per 256 elements; 5000 and 9075 are ragged
    ],
)
def test_fused_step_matches_the_unfused_optimizer(kw):
    a, opt_a, b, opt_b = _pair(**kw)
    _steps(a, opt_a, b, opt_b, 4)
    _compare(opt_a, a, opt_b, b)
    # The moments moved (a kernel that skipped the update would keep the zeros).
    assert all(unpack(opt_b.state[p]["exp_avg_data"]).any() for p in b)


def test_fused_second_moment_never_decodes_to_zero_for_nonzero_gradients():
    a, opt_a, b, opt_b = _pair()
    _steps(a, opt_a, b, opt_b, 1)
    for p in b:
        codes = unpack(opt_b.state[p]["exp_avg_sq_data"])[: p.numel()]
        assert bool((codes != 0).all())  # every gradient entry was nonzero


def test_fused_state_dict_round_trip_continues_like_the_uninterrupted_run():
    a, opt_a, b, opt_b = _pair()
    _steps(a, opt_a, b, opt_b, 2)
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    c = [nn.Parameter(p.detach().clone()) for p in b]
    opt_c = QuantizedAdamW(c, lr=1e-2, weight_decay=0.1, min_quantized_numel=0, fused=True)
    buf.seek(0)
    opt_c.load_state_dict(torch.load(buf))
    _steps(b, opt_b, c, opt_c, 2, start=2)
    for pb, pc in zip(b, c, strict=True):
        assert torch.equal(pb, pc)
        for key, t in opt_b.state[pb].items():
            assert torch.equal(t, opt_c.state[pc][key]), key


def test_fused_true_rejects_formats_the_kernel_does_not_implement():
    params = [nn.Parameter(torch.zeros(64))]
    with pytest.raises(ValueError, match="fused=True needs"):
        QuantizedAdamW(params, exp_avg_format="fp8_block", fused=True)
    with pytest.raises(ValueError, match="rounding='stochastic'"):
        QuantizedAdamW(params, rounding="nearest", fused=True)


def test_auto_mode_keeps_cpu_parameters_on_the_unfused_path():
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(64, 64, generator=gen)
    auto, off = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    opt_auto = QuantizedAdamW([auto], min_quantized_numel=0)
    opt_off = QuantizedAdamW([off], min_quantized_numel=0, fused=False)
    for _ in range(3):
        g = torch.randn(64, 64, generator=gen)
        auto.grad, off.grad = g.clone(), g.clone()
        opt_auto.step()
        opt_off.step()
    assert torch.equal(auto, off)
    for key, t in opt_off.state[off].items():
        assert torch.equal(t, opt_auto.state[auto][key])


def test_fused_reload_into_the_same_optimizer_mid_run():
    # The per-parameter scratch (alternating amax pairs) must not leak across a reload.
    a, opt_a, b, opt_b = _pair()
    _steps(a, opt_a, b, opt_b, 2)
    sd = opt_b.state_dict()
    saved = {"state": {i: {k: t.clone() for k, t in s.items()} for i, s in sd["state"].items()},
             "param_groups": sd["param_groups"]}
    weights = [p.detach().clone() for p in b]
    _steps(a, opt_a, b, opt_b, 1, start=5)  # a detour, then back to step 2
    with torch.no_grad():
        for p, w in zip(b, weights, strict=True):
            p.copy_(w)
    opt_b.load_state_dict(saved)
    c = [nn.Parameter(w.clone()) for w in weights]
    opt_c = QuantizedAdamW(c, lr=1e-2, weight_decay=0.1, min_quantized_numel=0, fused=True)
    opt_c.load_state_dict(saved)
    _steps(b, opt_b, c, opt_c, 2, start=2)
    for pb, pc in zip(b, c, strict=True):
        assert torch.equal(pb, pc)
        for key, t in opt_b.state[pb].items():
            assert torch.equal(t, opt_c.state[pc][key]), key


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the Triton interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e22])  # 1e22: g^2 overflows
def test_non_finite_moments_leave_the_parameter_and_its_state_unchanged(bad):
    a, opt_a, b, opt_b = _pair()
    _steps(a, opt_a, b, opt_b, 2)
    for params, opt in ((a, opt_a), (b, opt_b)):
        before = [p.detach().clone() for p in params]
        state0 = {k: t.clone() for k, t in opt.state[params[1]].items()}
        gen = torch.Generator().manual_seed(7)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
        params[1].grad.view(-1)[123] = bad
        with pytest.raises(ValueError, match=r"parameter\(s\) \[1\].*left unchanged"):
            opt.step()
        assert torch.equal(params[1], before[1])
        for key, t in state0.items():
            assert torch.equal(opt.state[params[1]][key], t), key
        assert not torch.equal(params[0], before[0])  # the others were updated
    _compare(opt_a, a, opt_b, b)
    _steps(a, opt_a, b, opt_b, 2, start=2)  # and training goes on, fused == unfused
    _compare(opt_a, a, opt_b, b)


def test_reset_state_does_not_reuse_the_old_scratch():
    a, opt_a, b, opt_b = _pair()
    _steps(a, opt_a, b, opt_b, 1)
    for params, opt in ((a, opt_a), (b, opt_b)):
        del opt.state[params[0]]
    _steps(a, opt_a, b, opt_b, 1, start=1)
    _compare(opt_a, a, opt_b, b)


@pytest.mark.parametrize("fused", [False, True])
def test_loading_a_state_saved_with_other_tiles_raises(fused):
    a, opt_a, _, _ = _pair()
    _steps(a, opt_a, a, opt_a, 1)
    other = QuantizedAdamW(a, lr=1e-2, weight_decay=0.1, min_quantized_numel=0,
                           square_tiles=True, fused=fused)
    with pytest.raises(ValueError, match="square_tiles=True needs"):
        other.load_state_dict(opt_a.state_dict())
