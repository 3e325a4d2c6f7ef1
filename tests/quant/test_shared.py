"""Sibling layers reading one activation quantize it once, with bit-identical results."""

import copy

import pytest
import torch

from hf_nvfp4.backends.reference import ReferenceBackend
from hf_nvfp4.nn import NVFP4Linear
from hf_nvfp4.quant import shared


def _siblings(share: bool) -> list[NVFP4Linear]:
    torch.manual_seed(0)
    layers = [
        NVFP4Linear(64, n, backend="reference", sr_seed=i) for i, n in enumerate((48, 32, 32))
    ]
    for layer in layers:
        layer.share_input = share
    return layers


def _step(layers, x, dys):
    x = x.clone().requires_grad_(True)
    ys = [layer(x) for layer in layers]  # q, k, v: three consumers of one tensor
    torch.autograd.backward(ys, dys)
    return [y.detach() for y in ys], x.grad, [layer.weight.grad for layer in layers]


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 64, generator=g)
    return x, [torch.randn(40, n, generator=g) for n in (48, 32, 32)]


def test_shared_equals_separate_bit_for_bit(data, monkeypatch):
    x, dys = data
    calls = []
    orig = ReferenceBackend.quantize_rowcol

    def counting(self, t, row, col, rng=None, **kw):
        calls.append(t.shape)
        return orig(self, t, row, col, rng, **kw)

    monkeypatch.setattr(ReferenceBackend, "quantize_rowcol", counting)
    got = _step(_siblings(True), x, dys)
    n_shared = sum(1 for s in calls if s == x.shape)
    calls.clear()
    want = _step(_siblings(False), x, dys)
    n_separate = sum(1 for s in calls if s == x.shape)
    assert (n_shared, n_separate) == (1, 3)
    for g, w in zip(got[0] + [got[1]] + got[2], want[0] + [want[1]] + want[2], strict=True):
        assert torch.equal(g, w)


def test_saved_copy_is_stored_once(data):
    x, _ = data

    def saved_bytes(layers):
        seen = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                seen[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
            return t

        xg = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = [layer(xg) for layer in layers]  # alive: no storage is reused
        assert len(outputs) == 3
        return sum(seen.values())

    shared_bytes, separate_bytes = saved_bytes(_siblings(True)), saved_bytes(_siblings(False))
    # x^T packed (tokens padded to 48), its E4M3 block scales and its FP32 global scale
    x_t_bytes = 64 * 48 // 2 + 64 * 48 // 16 + 4
    assert separate_bytes - shared_bytes == 2 * x_t_bytes


def test_in_place_change_or_new_tensor_invalidates(data):
    x, _ = data
    a, b = _siblings(True)[1:]
    b.weight, b.bias = copy.deepcopy(a.weight), copy.deepcopy(a.bias)
    a.eval(), b.eval()
    x = x.clone()
    ya = a(x)
    x.mul_(2)  # same object, new version: must be quantized again
    assert torch.equal(b(x), a(x.clone()))
    assert not torch.equal(ya, b(x))
    shared.clear()


def test_inference_mode_tensors_are_quantized_each_call(data):
    """Inference tensors carry no version counter (the evaluation suite runs under
    torch.inference_mode): siblings still give the separate layers' outputs, and an
    in-place change between two calls is seen."""
    x, _ = data
    shared_layers, separate = _siblings(True), _siblings(False)
    with torch.no_grad():
        want = [layer(x) for layer in separate]
    with torch.inference_mode():
        xi = x.clone()
        got = [layer(xi) for layer in shared_layers]
        a, b = shared_layers[1:]
        b.load_state_dict(a.state_dict())
        ya = a(xi)
        xi.mul_(2)
        yb = b(xi)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    with torch.no_grad():
        assert torch.equal(yb, a(x * 2)) and not torch.equal(ya, yb)
    shared.clear()
