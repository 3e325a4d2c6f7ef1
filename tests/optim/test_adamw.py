"""QuantizedAdamW: equality with torch's AdamW, checkpoints, clipping, errors, memory."""

import io

import pytest
import torch
from torch import nn

from hf_nvfp4.optim import MomentCodec, QuantizedAdamW, param_groups


def _params(seed=0, shapes=((64, 128), (300,), (40, 130))):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    return [scale * torch.randn(p.shape, generator=gen) for p in params]


def _run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        for p, g in zip(params, _grads(params, t), strict=True):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_bitwise_equal_to_torch_adamw_without_quantization(weight_decay):
    # Same FP32 ops in the same order on the same device: bitwise, not just allclose. (On
    # CUDA torch's fused/foreach kernels reassociate, so there only allclose holds.)
    ours, ref = _params(), _params()
    kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=weight_decay)
    opt = QuantizedAdamW(ours, exp_avg_format=None, exp_avg_sq_format=None, **kw)
    _run(opt, ours, 20)
    _run(torch.optim.AdamW(ref, foreach=False, **kw), ref, 20)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)


def test_small_tensors_and_unquantized_groups_match_torch_bitwise():
    ours, ref = _params(), _params()
    groups = [{"params": ours[:1], "quantize": False}, {"params": ours[1:]}]
    opt = QuantizedAdamW(groups, lr=1e-2, min_quantized_numel=6000)  # 300 and 5200 < 6000
    _run(opt, ours, 5)
    _run(torch.optim.AdamW(ref, lr=1e-2, foreach=False), ref, 5)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    assert all("exp_avg" in s for s in opt.state.values())


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8_block", "mxfp8"])
def test_quantized_moments_track_fp32_adamw(fmt):
    ours, ref = _params(), _params()
    opt = QuantizedAdamW(ours, lr=1e-2, exp_avg_format=fmt, exp_avg_sq_format=fmt)
    _run(opt, ours, 15)
    _run(torch.optim.AdamW(ref, lr=1e-2), ref, 15)
    # Pure-noise gradients make m / sqrt(v) sensitive; measured gaps: NVFP4 22%, FP8 6%.
    tol = {"nvfp4": 0.3, "fp8_block": 0.08, "mxfp8": 0.08}[fmt]
    for a, b, p0 in zip(ours, ref, _params(), strict=True):
        assert (a - b).norm() < tol * (b - p0).norm()


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8_block", "mxfp8"])
def test_state_dict_round_trip_continues_identically(fmt):
    kw = dict(lr=1e-2, exp_avg_format=fmt, exp_avg_sq_format=fmt, seed=7)
    straight = _params()
    opt = QuantizedAdamW(straight, **kw)
    _run(opt, straight, 6)

    resumed = _params()
    first = QuantizedAdamW(resumed, **kw)
    _run(first, resumed, 3)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    saved = torch.load(io.BytesIO(buf.getvalue()))
    assert saved["state"][0]["exp_avg_data"].dtype != torch.float32  # saved packed
    fresh = QuantizedAdamW(resumed, **kw)
    fresh.load_state_dict(saved)
    for key, t in first.state[resumed[0]].items():
        assert t.dtype == fresh.state[resumed[0]][key].dtype
    _run(fresh, resumed, 3, start=3)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))


def test_load_state_dict_rejects_a_different_layout():
    params = _params()
    opt = QuantizedAdamW(params, exp_avg_format=None)
    _run(opt, params, 1)
    other = QuantizedAdamW(params, exp_avg_format="nvfp4")
    with pytest.raises(ValueError, match="'exp_avg'.*FP32.*'nvfp4'"):
        other.load_state_dict(opt.state_dict())


def test_gradient_clipping_is_applied_before_the_update():
    ours, ref = _params(), _params()
    opt = QuantizedAdamW(ours, lr=1e-2, exp_avg_format=None, exp_avg_sq_format=None)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for t in range(4):
        for group, o in ((ours, opt), (ref, ref_opt)):
            for p, g in zip(group, _grads(group, t, scale=100.0), strict=True):
                p.grad = g
            norm = torch.nn.utils.clip_grad_norm_(group, max_norm=1.0)
            assert norm > 1.0
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    quant = _params()
    qopt = QuantizedAdamW(quant, lr=1e-2)
    for p, g in zip(quant, _grads(quant, 0, scale=1e6), strict=True):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(quant, max_norm=1.0)
    qopt.step()
    assert all(torch.isfinite(p).all() for p in quant)


def test_second_moment_underflow_does_not_blow_up_updates():
    # One large gradient per 16-block, the rest 1000x smaller: sqrt(v) of the small ones is
    # below the block's smallest E2M1 step. Without the floor they decode to 0, v collapses
    # to (1 - beta2) g^2 each step and the updates grow to ~1 / sqrt(1 - beta2) = 10x lr
    # (8x by step 100, with the bias correction).
    lr, steps = 1e-3, 100

    def mean_small_update(floor):
        p = nn.Parameter(torch.zeros(16, 256))
        opt = QuantizedAdamW([p], lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
        opt.codecs["exp_avg_sq"] = MomentCodec("nvfp4", sqrt=True, floor_nonzero=floor)
        opt.codecs["exp_avg"] = None  # isolate the denominator
        g = torch.full((16, 256), 1e-3)
        g[:, ::16] = 1.0
        for _ in range(steps):
            before = p.detach().clone()
            p.grad = g.clone()
            opt.step()
        small = torch.ones_like(g, dtype=torch.bool)
        small[:, ::16] = False
        return ((p.detach() - before).abs()[small] / lr).mean().item()

    assert mean_small_update(floor=False) > 5.0
    assert mean_small_update(floor=True) <= 1.0 + 1e-3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1e-3}, "lr must be >= 0; got -0.001"),
        ({"eps": -1.0}, "eps must be >= 0; got -1.0"),
        ({"betas": (0.9, 1.0)}, r"betas must be two values in \[0, 1\); got \(0.9, 1.0\)"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0; got -0.1"),
        ({"exp_avg_format": "int4"}, "exp_avg_format must be one of .* got 'int4'"),
        ({"exp_avg_sq_format": "e5m2"}, "exp_avg_sq_format must be one of .* got 'e5m2'"),
        ({"rounding": "up"}, "rounding must be 'nearest' or 'stochastic'; got 'up'"),
        ({"min_quantized_numel": -1}, "min_quantized_numel must be >= 0; got -1"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizedAdamW(_params(), **kwargs)


def test_negative_lr_in_a_group_is_caught_at_step():
    params = _params()
    opt = QuantizedAdamW(params)
    opt.param_groups[0]["lr"] = -0.5
    with pytest.raises(ValueError, match="lr must be >= 0; got -0.5"):
        _run(opt, params, 1)


def test_complex_params_and_sparse_grads_are_rejected():
    with pytest.raises(TypeError, match="complex.*complex64"):
        QuantizedAdamW([nn.Parameter(torch.zeros(8, dtype=torch.complex64))])
    emb = nn.Embedding(100, 64, sparse=True)
    opt = QuantizedAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*shape \\(100, 64\\)"):
        opt.step()


@pytest.mark.parametrize(
    ("fmt", "square", "bytes_per_param"),
    [
        (None, False, 8.0),
        ("nvfp4", False, 2 * (0.5 + 1 / 16)),
        ("nvfp4", True, 2 * (0.5 + 1 / 256)),
        ("mxfp4", False, 2 * (0.5 + 1 / 32)),
        ("fp8_block", False, 2 * (1 + 4 / 128)),
        ("mxfp8", False, 2 * (1 + 1 / 32)),
    ],
)
def test_state_memory_per_parameter(fmt, square, bytes_per_param):
    p = nn.Parameter(torch.zeros(512, 512))  # a multiple of every block: no padding
    opt = QuantizedAdamW([p], exp_avg_format=fmt, exp_avg_sq_format=fmt, square_tiles=square)
    p.grad = torch.randn(512, 512)
    opt.step()
    measured = opt.state_nbytes() / p.numel()
    step_and_global = (4 + (8 if fmt == "nvfp4" else 0)) / p.numel()
    assert measured == pytest.approx(bytes_per_param + step_and_global, rel=1e-12)


def test_param_groups_keep_norms_embeddings_and_small_tensors_fp32():
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 128), nn.LayerNorm(128))
    groups = param_groups(model, weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [1, 4]
    assert groups[0]["params"][0] is model[1].weight
    assert groups[1]["quantize"] is False
    opt = QuantizedAdamW(groups)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    assert "exp_avg_data" in opt.state[model[1].weight]
    assert "exp_avg" in opt.state[model[0].weight]
