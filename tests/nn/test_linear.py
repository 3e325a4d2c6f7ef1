"""NVFP4Linear against a hand-built composition of numerics.quantize and matmuls."""

import copy

import pytest
import torch

from hf_nvfp4.backends.reference import ReferenceBackend
from hf_nvfp4.nn import NVFP4Linear
from hf_nvfp4.numerics import quantize
from hf_nvfp4.numerics.rng import derive_keys
from hf_nvfp4.quant.sr import new_state
from hf_nvfp4.recipe import PRESETS, Recipe


def _gemm(a, b):
    """a @ b^T from exact block values; the product of the global scales scales the output."""
    out = a.block_values() @ b.block_values().T
    return (out * (a.global_scale * b.global_scale))[: a.shape[0], : b.shape[0]]


def _run(recipe: Recipe, x, w, b, dy, seed=7):
    mod = NVFP4Linear(x.shape[1], w.shape[0], recipe=recipe, backend="reference")
    with torch.no_grad():
        mod.weight.copy_(w)
        mod.bias.copy_(b)
    mod.sr_state = new_state(seed)
    x = x.clone().requires_grad_(True)
    y = mod(x)
    y.backward(dy)
    return y.detach(), x.grad, mod.weight.grad, mod.bias.grad


@pytest.fixture
def operands():
    torch.manual_seed(0)
    m, k, n = 40, 64, 48  # M not a multiple of 16: the wgrad RHT pads the token dimension
    return (torch.randn(m, k), torch.randn(n, k) * 0.1, torch.randn(n), torch.randn(m, n))


def test_forward_and_grads_equal_hand_built_composition(operands):
    x, w, b, dy = operands
    y, dx, dw, db = _run(PRESETS["nvfp4"], x, w, b, dy, seed=7)

    qx = quantize(x, tile=(1, 16))
    qw = quantize(w, tile=(16, 16))
    qwt = quantize(w.T.contiguous(), tile=(16, 16))
    assert torch.equal(y, _gemm(qx, qw) + b)

    k_row, k_col = derive_keys(torch.tensor([7, 1]), rank=0)  # seed 7, first training step
    qdy = quantize(dy, rounding="stochastic", sr_key=k_row)
    qdy_t = quantize(dy.T.contiguous(), rounding="stochastic", rht=True, sr_key=k_col)
    qx_t = quantize(x.T.contiguous(), rht=True)
    assert torch.equal(dx, _gemm(qdy, qwt))
    assert torch.equal(dw, _gemm(qdy_t, qx_t))
    assert torch.equal(db, dy.sum(0))
    for t in (y, dx, dw, db):
        assert torch.isfinite(t).all()


def test_quantized_output_is_close_to_high_precision(operands):
    x, w, b, dy = operands
    y, dx, dw, _ = _run(PRESETS["nvfp4"], x, w, b, dy)
    yh, dxh, dwh, _ = _run(PRESETS["bf16"], x, w, b, dy)
    for q, h in ((y, yh), (dx, dxh), (dw, dwh)):
        rel = ((q - h).norm() / h.norm()).item()
        assert 0.01 < rel < 0.25


@pytest.mark.parametrize(
    "change, same, differ",
    [
        ({"rht": False}, ("y", "dx"), ("dw",)),
        ({"stochastic_rounding": False}, ("y",), ("dx", "dw")),
        ({"weight_2d": False}, ("dw",), ("y", "dx")),
        ({"fprop_format": "bf16"}, ("dx", "dw"), ("y",)),
        ({"dgrad_format": "bf16"}, ("y", "dw"), ("dx",)),
        ({"wgrad_format": "bf16", "rht": False}, ("y", "dx"), ("dw",)),
        ({"rht_sign": (1,) * 16}, ("y", "dx"), ("dw",)),
    ],
    ids=["rht", "sr", "2d", "fprop", "dgrad", "wgrad", "rht_sign"],
)
def test_each_knob_changes_only_its_gemm(operands, change, same, differ):
    x, w, b, dy = operands
    keys = ("y", "dx", "dw", "db")
    base = dict(zip(keys, _run(PRESETS["nvfp4"], x, w, b, dy), strict=True))
    new = dict(zip(keys, _run(Recipe().replace(**change), x, w, b, dy), strict=True))
    for k in same:
        assert torch.equal(base[k], new[k]), k
    for k in differ:
        assert not torch.equal(base[k], new[k]), k


def test_bf16_recipe_is_plain_linear(operands):
    x, w, b, _ = operands
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    q = NVFP4Linear.from_linear(lin, "bf16")
    assert torch.equal(q(x), lin(x))


def test_saves_packed_codes_not_activations():
    torch.manual_seed(0)
    x = torch.randn(256, 512, dtype=torch.bfloat16, requires_grad=True)

    def saved_bytes(mod):
        total = []

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mod(x)
        return sum(total)

    nv = NVFP4Linear(512, 512, bias=False, backend="reference", dtype=torch.bfloat16)
    nv.weight.requires_grad_(True)
    hp = torch.nn.Linear(512, 512, bias=False, dtype=torch.bfloat16)
    ratio = saved_bytes(nv) / saved_bytes(hp)
    # x^T packed (0.5 B) + E4M3 scales (1/16 B) + W^T packed and scales, vs BF16 x (2 B).
    assert ratio < 0.6, ratio


def test_weight_quantized_once_per_forward_and_reused_by_dgrad(monkeypatch):
    mod = NVFP4Linear(32, 32, backend="reference")
    calls = []
    orig = ReferenceBackend.quantize_weight

    def counting(self, w, spec, **kwargs):
        calls.append(1)
        return orig(self, w, spec, **kwargs)

    monkeypatch.setattr(ReferenceBackend, "quantize_weight", counting)
    x = torch.randn(4, 32)
    mod(x).sum().backward()
    assert len(calls) == 1
    # Updates that bypass the version counter (fused optimizers, .data) are always seen.
    opt = torch.optim.AdamW(mod.parameters(), lr=0.1, fused=True)
    opt.step()
    y1 = mod(x)
    with torch.no_grad():
        mod.weight.data.mul_(0.5)
    assert not torch.equal(y1, mod(x))
    assert len(calls) == 3


def test_stochastic_rounding_state_round_trips():
    torch.manual_seed(0)
    a = NVFP4Linear(32, 32, backend="reference", sr_seed=123)
    x = torch.randn(16, 32)
    r = torch.randn(16, 32)
    (a(x) * r).sum().backward()
    b = NVFP4Linear(32, 32, backend="reference", sr_seed=999)
    b.load_state_dict(a.state_dict())
    assert b.sr_state.tolist() == [123, 1]
    a.weight.grad = None
    (a(x) * r).sum().backward()
    (b(x) * r).sum().backward()
    assert torch.equal(a.weight.grad, b.weight.grad)
    first = a.weight.grad.clone()
    a.weight.grad = None
    (a(x) * r).sum().backward()
    assert not torch.equal(a.weight.grad, first)  # the stream moves on every step


def test_from_linear_shares_parameters():
    lin = torch.nn.Linear(32, 16)
    q = NVFP4Linear.from_linear(lin)
    assert q.weight is lin.weight and q.bias is lin.bias
    assert isinstance(q, torch.nn.Linear)


def test_leading_dims_and_bf16_autocast():
    mod = NVFP4Linear(32, 16, backend="reference")
    x = torch.randn(2, 3, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mod(x)
    assert y.shape == (2, 3, 16) and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and mod.weight.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"recipe": "nvfp5"}, ValueError, "unknown recipe preset"),
        ({"recipe": {"fprop_format": "int4"}}, ValueError, "fprop_format must be one of"),
        ({"recipe": {"x_tile": [16, 16]}}, ValueError, "unknown recipe fields"),
        ({"recipe": {"wgrad_format": "bf16"}}, ValueError, "rht=True needs a quantized wgrad"),
        ({"recipe": {"rht_sign": [1, -1]}}, ValueError, "16 entries"),
        ({"backend": "cuda"}, ValueError, "unknown backend"),
    ],
)
def test_bad_configs_fail_clearly(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        NVFP4Linear(32, 32, **kwargs)


def test_bad_backend_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        NVFP4Linear(32, 16, backend="cuda")
    with pytest.raises(ValueError, match="reduce_amax is not implemented for the te backend"):
        NVFP4Linear(32, 16, backend="te", reduce_amax=True)


@pytest.mark.parametrize("bias", [True, False])
def test_output_can_be_modified_in_place(bias):
    """Models that add into a linear's output in place (Falcon: mlp_output += attn) train."""
    torch.manual_seed(0)
    mod = NVFP4Linear(32, 16, bias=bias, backend="reference", sr_seed=1)
    ref = copy.deepcopy(mod)
    x = torch.randn(2, 5, 32)
    r = torch.randn(2, 5, 16)
    y = mod(x)
    y += r  # in place on the layer's output
    y.square().sum().backward()
    (ref(x) + r).square().sum().backward()
    assert torch.equal(mod.weight.grad, ref.weight.grad)
