"""The te backend's ``te.Linear`` is a registered submodule of NVFP4Linear, with visible state.

Transformer Engine cannot be installed here (it needs CUDA and Blackwell for NVFP4), so these
tests run against a stub of the part of its API the backend uses: ``transformer_engine.pytorch``
(``Linear``, ``autocast`` / ``fp8_autocast``) and ``transformer_engine.common.recipe``
(``NVFP4BlockScaling``). The stub's Linear computes ``F.linear`` exactly, records the recipe of
the autocast it runs in, and keeps an extra state (a forward counter) as TE keeps its quantizer
metadata: a uint8 tensor from ``get_extra_state``, empty meaning "nothing to restore".
"""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_nvfp4.backends as backends
import hf_nvfp4.backends.te as te_backend
from hf_nvfp4 import NVFP4Config, NVFP4Linear, convert
from hf_nvfp4.backends.te import te_recipe_kwargs
from hf_nvfp4.recipe import Recipe

IN, OUT = 32, 16


def _make_fake_te(new_api: bool) -> types.SimpleNamespace:
    """Module objects of a fake Transformer Engine and the calls its Linear records."""
    calls: list[dict] = []
    active: list[object] = []

    class NVFP4BlockScaling:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    @contextlib.contextmanager
    def _autocast(enabled, recipe):
        active.append(recipe if enabled else None)
        try:
            yield
        finally:
            active.pop()

    class Linear(nn.Module):
        def __init__(self, in_features, out_features, bias=True, params_dtype=None,
                     device="cuda"):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            kw = dict(device=device, dtype=params_dtype)
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
            if bias:
                self.bias = nn.Parameter(torch.empty(out_features, **kw))
            else:
                self.bias = torch.Tensor()  # as TE: a plain empty tensor, not a parameter
            self.forwards = 0
            self.built_on = torch.device(device)

        def forward(self, x):
            recipe = active[-1] if active else None
            calls.append({"recipe": None if recipe is None else dict(recipe.kwargs),
                          "weight": self.weight})
            self.forwards += 1
            bias = self.bias if isinstance(self.bias, nn.Parameter) else None
            return nn.functional.linear(x, self.weight, bias)

        def get_extra_state(self):
            if self.forwards == 0:
                return torch.empty(0, dtype=torch.uint8)
            return torch.tensor([self.forwards], dtype=torch.int64).view(torch.uint8)

        def set_extra_state(self, state):
            if state is None or state.numel() == 0:
                return
            self.forwards = int(state.view(torch.int64)[0])

    pkg = types.ModuleType("transformer_engine")
    pt = types.ModuleType("transformer_engine.pytorch")
    common = types.ModuleType("transformer_engine.common")
    recipe_mod = types.ModuleType("transformer_engine.common.recipe")
    pt.Linear = Linear
    if new_api:
        pt.autocast = lambda enabled=True, recipe=None: _autocast(enabled, recipe)
    else:  # TE < 2.8 names it fp8_autocast
        pt.fp8_autocast = lambda enabled=True, fp8_recipe=None: _autocast(enabled, fp8_recipe)
    recipe_mod.NVFP4BlockScaling = NVFP4BlockScaling
    pkg.pytorch, pkg.common, common.recipe = pt, common, recipe_mod
    modules = {"transformer_engine": pkg, "transformer_engine.pytorch": pt,
               "transformer_engine.common": common, "transformer_engine.common.recipe": recipe_mod}
    return types.SimpleNamespace(modules=modules, Linear=Linear, calls=calls)


@pytest.fixture(params=[True, False], ids=["autocast", "fp8_autocast"])
def fake_te(request, monkeypatch):
    fake = _make_fake_te(new_api=request.param)
    for name, mod in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(te_backend, "is_te_available", lambda: (True, "ok"))
    monkeypatch.setattr(backends, "_INSTANCES", {})  # no TEBackend of the fake outlives the test
    return fake


def _layer(backend: str = "te", bias: bool = True, seed: int = 0, **kw) -> NVFP4Linear:
    torch.manual_seed(seed)
    return NVFP4Linear(IN, OUT, bias=bias, backend=backend, sr_seed=1, **kw)


def test_without_te_a_te_layer_refuses_at_construction():
    with pytest.raises(RuntimeError, match="te backend cannot run here"):
        NVFP4Linear(IN, OUT, backend="te")


@pytest.mark.parametrize("bias", [True, False])
def test_te_linear_is_a_registered_submodule_sharing_the_parameters(fake_te, bias):
    layer = _layer(bias=bias)
    te_linear = dict(layer.named_children())["te_linear"]
    assert isinstance(te_linear, fake_te.Linear)
    assert te_linear.built_on == torch.device("meta")  # built without memory of its own
    assert te_linear.weight is layer.weight
    if bias:
        assert te_linear.bias is layer.bias
    names = [n for n, _ in layer.named_parameters()]
    assert names == (["weight", "bias"] if bias else ["weight"])
    assert sum(p.numel() for p in layer.parameters()) == IN * OUT + (OUT if bias else 0)
    assert set(layer.state_dict()) == (
        {"weight", "sr_state", "te_linear._extra_state"} | ({"bias"} if bias else set())
    )
    assert layer.plan().backend == "te"


def test_from_linear_shares_the_wrapped_parameters(fake_te):
    linear = nn.Linear(IN, OUT)
    layer = NVFP4Linear.from_linear(linear, backend="te")
    assert layer.te_linear.weight is linear.weight and layer.te_linear.bias is linear.bias
    assert [p for p in layer.parameters()] == [linear.weight, linear.bias]


def test_moves_and_casts_reach_the_te_linear(fake_te):
    layer = _layer()
    layer.to(torch.float64)
    assert layer.te_linear.weight is layer.weight and layer.te_linear.bias is layer.bias
    assert layer.te_linear.weight.dtype == torch.float64
    layer.to("meta")
    assert layer.weight.is_meta and layer.te_linear.weight is layer.weight
    assert layer.te_linear.bias is layer.bias
    layer.to_empty(device="cpu")
    assert layer.te_linear.weight is layer.weight and not layer.weight.is_meta
    assert layer.te_linear.bias is layer.bias


@pytest.mark.parametrize(
    "recipe", [Recipe(), Recipe(rht=False, stochastic_rounding=False, weight_2d=False)],
    ids=["nvfp4", "no_rht_sr_2d"],
)
def test_forward_runs_the_te_linear_inside_the_autocast_with_the_recipe(fake_te, recipe):
    layer = _layer(recipe=recipe)
    x = torch.randn(4, 8, IN, requires_grad=True)
    y = layer(x)
    assert len(fake_te.calls) == 1
    assert fake_te.calls[0]["recipe"] == te_recipe_kwargs(recipe)
    assert fake_te.calls[0]["weight"] is layer.weight
    assert torch.equal(y, nn.functional.linear(x, layer.weight, layer.bias))
    y.sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None


def test_a_recipe_te_cannot_run_is_refused_at_construction(fake_te):
    with pytest.raises(ValueError, match="every GEMM in NVFP4"):
        _layer(recipe="mxfp4")


def test_a_parameter_replaced_on_the_layer_is_retied_before_the_forward(fake_te):
    """What a loader does (transformers assigns loaded parameters to the owning module)."""
    layer = _layer()
    layer.weight = nn.Parameter(torch.randn(OUT, IN))
    layer(torch.randn(2, IN))
    assert layer.te_linear.weight is layer.weight
    assert fake_te.calls[-1]["weight"] is layer.weight


def test_state_dict_round_trips_between_te_and_other_backends(fake_te):
    te_layer = _layer(seed=1)
    te_layer(torch.randn(2, IN))  # TE's extra state now records one forward
    saved = te_layer.state_dict()
    assert set(saved) == {"weight", "bias", "sr_state", "te_linear._extra_state"}
    assert saved["te_linear._extra_state"].numel() > 0

    ref = _layer("reference", seed=2)
    assert not torch.equal(ref.weight, te_layer.weight)
    ref.load_state_dict(saved)  # strict: TE's extra state is dropped, not unexpected
    assert torch.equal(ref.weight, te_layer.weight) and torch.equal(ref.bias, te_layer.bias)
    assert "te_linear" not in dict(ref.named_children())

    with torch.no_grad():
        ref.weight.mul_(2)
    te_new = _layer(seed=3)
    te_new.load_state_dict(ref.state_dict())  # strict: no te_linear keys in the checkpoint
    assert torch.equal(te_new.weight, ref.weight) and torch.equal(te_new.bias, ref.bias)
    assert te_new.te_linear.weight is te_new.weight and te_new.te_linear.bias is te_new.bias
    assert te_new.te_linear.forwards == 0  # no extra state saved: TE's stays as it was

    te_new.load_state_dict(saved)
    assert torch.equal(te_new.weight, te_layer.weight)
    assert te_new.te_linear.forwards == 1  # TE's extra state restored

    assigned = _layer(seed=4)
    assigned.load_state_dict(ref.state_dict(), assign=True)
    assert torch.equal(assigned.weight, ref.weight)
    assert assigned.te_linear.weight is assigned.weight
    assert assigned.te_linear.bias is assigned.bias

    wrapped = nn.Sequential(_layer(seed=5))
    wrapped.load_state_dict({f"0.{k}": v for k, v in saved.items()})
    assert torch.equal(wrapped[0].weight, te_layer.weight) and wrapped[0].te_linear.forwards == 1


def test_strict_load_still_reports_what_is_missing(fake_te):
    layer = _layer()
    saved = layer.state_dict()
    del saved["weight"]
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict(saved)
    result = layer.load_state_dict(saved, strict=False)
    assert result.missing_keys == ["weight"] and result.unexpected_keys == []


LLAMA = LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
)
QCFG = dict(backend="te", first_bf16_blocks=0, last_bf16_blocks=0, sr_seed=5)


def test_convert_with_backend_te_builds_te_submodules(fake_te):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LLAMA)
    keys_before = set(model.state_dict())
    params_before = sum(p.numel() for p in model.parameters())
    summary = convert(model, NVFP4Config(**QCFG), verbose=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Linear)}
    assert len(layers) == 14 and sorted(summary.quantized_layers) == sorted(layers)
    # The te.Linear's (shared) weight is the NVFP4Linear's, not a high-precision matrix.
    assert summary.other_matmuls == [] and summary.block_matmul_share() == (73728, 73728)
    for name, layer in layers.items():
        assert isinstance(layer.te_linear, fake_te.Linear), name
        assert layer.te_linear.weight is layer.weight, name
    assert sum(p.numel() for p in model.parameters()) == params_before
    added = {f"{n}.{suffix}" for n in layers for suffix in ("sr_state", "te_linear._extra_state")}
    assert set(model.state_dict()) == keys_before | added
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (1, 8)))
    assert len(fake_te.calls) == 14
    assert all(c["recipe"] == te_recipe_kwargs(layers[next(iter(layers))].recipe)
               for c in fake_te.calls)


def test_from_pretrained_and_save_pretrained_with_backend_te(fake_te, tmp_path, monkeypatch,
                                                             caplog):
    """transformers converts on the meta device and assigns the loaded parameters to the
    NVFP4Linear: the te.Linear exists before loading and holds the loaded tensors after."""
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LLAMA)
    plain.save_pretrained(tmp_path / "plain")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "plain",
                                                 quantization_config=NVFP4Config(**QCFG))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Linear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        assert layer.te_linear.weight is layer.weight and not layer.weight.is_meta, name
        assert torch.equal(layer.weight, plain.get_submodule(name).weight), name
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        model(input_ids=ids)
    assert len(fake_te.calls) == 14

    model.save_pretrained(tmp_path / "te")
    with safe_open(str(tmp_path / "te" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {f"{n}.te_linear._extra_state" for n in layers} <= keys
    assert not any(k.endswith(("te_linear.weight", "te_linear.bias")) for k in keys)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "te")
    for name, layer in layers.items():
        again = reloaded.get_submodule(name)
        assert again.te_linear.weight is again.weight, name
        assert torch.equal(again.weight, layer.weight), name
        assert again.te_linear.forwards == 1, name  # TE's extra state came back

    # The same checkpoint on a machine without TE: another backend, TE's state ignored.
    monkeypatch.setattr(te_backend, "is_te_available", lambda: (False, "no CUDA device"))
    monkeypatch.setattr(backends, "_INSTANCES", {})
    elsewhere = AutoModelForCausalLM.from_pretrained(tmp_path / "te")
    for name, layer in layers.items():
        other = elsewhere.get_submodule(name)
        assert "te_linear" not in dict(other.named_children()), name
        assert torch.equal(other.weight, layer.weight), name
    assert "te_linear" not in caplog.text
