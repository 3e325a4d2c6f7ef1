"""NVFP4Conv1D: GPT-2's Conv1D ([in, out] weight) trained exactly as NVFP4Linear of W^T."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, NVFP4Linear
from hf_nvfp4.checkpoint import (
    export_compressed_tensors,
    export_modelopt,
    inspect_checkpoint,
    load_packed,
    save_packed,
)
from hf_nvfp4.checkpoint.layers import iter_packed_layers
from hf_nvfp4.nn import NVFP4Conv1D
from hf_nvfp4.nn.conv1d import NVFP4PackedConv1D, is_conv1d, weight_matrix
from hf_nvfp4.nn.packed import NVFP4PackedLinear

IN, OUT = 64, 48
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _pair(recipe, seed: int = 7) -> tuple[NVFP4Conv1D, NVFP4Linear]:
    """An NVFP4Conv1D and the NVFP4Linear of its transposed weight, same bias and SR seed."""
    torch.manual_seed(0)
    w = torch.randn(IN, OUT) * 0.1
    b = torch.randn(OUT)
    conv = NVFP4Conv1D.from_weight(nn.Parameter(w.clone()), nn.Parameter(b.clone()), recipe,
                                   "reference", sr_seed=seed)
    lin = NVFP4Linear(IN, OUT, recipe=recipe, backend="reference", sr_seed=seed)
    with torch.no_grad():
        lin.weight.copy_(w.t().contiguous())
        lin.bias.copy_(b)
    return conv, lin


def _step(mod: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    mod.weight.grad = mod.bias.grad = None
    y = mod(x)
    y.backward(dy)
    return y.detach(), x.grad, mod.weight.grad, mod.bias.grad


@pytest.mark.parametrize(
    "recipe", ["nvfp4", {"weight_2d": False}, {"rht": False}, "mxfp4", "fp8_block"]
)
def test_bitwise_equal_to_nvfp4linear_of_the_transposed_weight(recipe):
    conv, lin = _pair(recipe)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # two training steps: the stochastic-rounding streams advance alike
        x = torch.randn(2, 20, IN, generator=gen)  # 40 tokens: not a multiple of 16
        dy = torch.randn(2, 20, OUT, generator=gen)
        y, dx, dw, db = _step(conv, x, dy)
        y_l, dx_l, dw_l, db_l = _step(lin, x, dy)
        assert y.shape == (2, 20, OUT) and dw.shape == (IN, OUT)
        assert torch.equal(y, y_l)
        assert torch.equal(dx, dx_l)
        assert torch.equal(dw, dw_l.t())
        assert torch.equal(db, db_l)
        assert dw.abs().sum() > 0 and torch.isfinite(dw).all()
    assert conv.sr_step == lin.sr_step == (2 if conv.recipe.stochastic_rounding else 0)
    # The quantized output is near the exact x W + b (a wrong orientation would not be).
    exact = x @ conv.weight.detach() + conv.bias.detach()
    rel = ((y - exact).norm() / exact.norm()).item()
    assert 0.001 < rel < 0.2


def test_bf16_recipe_computes_x_w_plus_b():
    conv, _ = _pair("bf16")
    x = torch.randn(5, IN)
    expected = torch.addmm(conv.bias, x, conv.weight)  # transformers' Conv1D forward
    torch.testing.assert_close(conv(x), expected, rtol=1e-6, atol=1e-6)


def test_from_conv1d_shares_parameters_and_keeps_the_layout():
    torch.manual_seed(0)
    ref = Conv1D(OUT, IN)  # nf, nx
    assert is_conv1d(ref) and not is_conv1d(nn.Linear(IN, OUT))
    q = NVFP4Conv1D.from_conv1d(ref, "nvfp4", "reference", sr_seed=3)
    assert q.weight is ref.weight and q.bias is ref.bias
    assert (q.in_features, q.out_features) == (IN, OUT) and q.weight.shape == (IN, OUT)
    assert q.sr_state.tolist() == [3, 0]
    assert q.state_dict().keys() == {"weight", "bias", "sr_state"}
    assert weight_matrix(q).shape == weight_matrix(ref).shape == (OUT, IN)
    x = torch.randn(3, 7, IN)
    with torch.no_grad():
        exact, quant = ref(x), q.eval()(x)
    rel = ((quant - exact).norm() / exact.norm()).item()
    assert 0.01 < rel < 0.2


def test_new_layer_initializes_like_conv1d():
    torch.manual_seed(0)
    q = NVFP4Conv1D(256, 128, backend="reference", sr_seed=5)
    assert q.weight.shape == (256, 128) and not q.weight.is_meta
    assert abs(q.weight.std().item() - 0.02) < 0.001
    assert torch.equal(q.bias, torch.zeros(128))
    assert q.sr_state.tolist() == [5, 0]
    assert NVFP4Conv1D(32, 16, bias=False, backend="reference").bias is None


def test_te_backend_and_from_linear_are_refused():
    with pytest.raises(ValueError, match="cannot run on the te backend"):
        NVFP4Conv1D(32, 16, backend="te")
    with pytest.raises(TypeError, match="from_conv1d"):
        NVFP4Conv1D.from_linear(nn.Linear(32, 16))
    with pytest.raises(TypeError, match="expected a transformers Conv1D"):
        NVFP4Conv1D.from_conv1d(nn.Linear(32, 16))


def test_packed_conv1d_is_the_packed_linear_of_the_transposed_weight():
    conv, lin = _pair("nvfp4")
    pc, pl = NVFP4PackedConv1D.from_linear(conv), NVFP4PackedLinear.from_linear(lin)
    for name in ("weight_packed", "weight_scale", "weight_global_scale"):
        a, b = getattr(pc, name), getattr(pl, name)
        assert a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    assert pc.weight_packed.shape == (OUT, IN // 2)  # engines' [out, in/2] layout
    x = torch.randn(3, IN)
    with torch.no_grad():
        assert torch.equal(pc(x), conv.eval()(x))
    assert pc.weight.shape == (IN, OUT)
    assert torch.equal(pc.weight, pc.dequantize_weight().t())
    back = pc.to_linear(sr_seed=9)
    assert isinstance(back, NVFP4Conv1D) and back.weight.shape == (IN, OUT)
    assert torch.equal(back.weight, pc.weight) and back.sr_state.tolist() == [9, 0]
    with pytest.raises(TypeError, match="expected an NVFP4Conv1D"):
        NVFP4PackedConv1D.from_linear(lin)


def _gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    config = NVFP4Config(backend="reference", first_bf16_blocks=0, last_bf16_blocks=0)
    hf_nvfp4.prepare_model(model, config)
    return model.eval()


@pytest.fixture(scope="module")
def gpt2_tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def test_gpt2_packed_round_trip_has_equal_logits(gpt2_tokens, tmp_path):
    model = _gpt2()
    names = [f"transformer.h.{i}.{leaf}" for i in range(2) for leaf in GPT2_CONV1D]
    assert sorted(layer.name for layer in iter_packed_layers(model)) == sorted(names)
    with torch.no_grad():
        logits = model(gpt2_tokens).logits
    save_packed(model, tmp_path / "ckpt", dtype=None, masters=True)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    attn = loaded.transformer.h[0].attn.c_attn
    assert isinstance(attn, NVFP4PackedConv1D) and attn.weight_packed.shape == (192, 32)
    with torch.no_grad():
        assert torch.equal(loaded(gpt2_tokens).logits, logits)

    trained = load_packed(tmp_path / "ckpt", mode="train")  # from the saved FP32 masters
    for name in names:
        mod, orig = trained.get_submodule(name), model.get_submodule(name)
        assert isinstance(mod, NVFP4Conv1D)
        assert torch.equal(mod.weight, orig.weight) and torch.equal(mod.sr_state, orig.sr_state)
    with torch.no_grad():
        assert torch.equal(trained.eval()(gpt2_tokens).logits, logits)

    lossy = load_packed(tmp_path / "ckpt", mode="train", masters=False)
    c_fc = lossy.transformer.h[1].mlp.c_fc
    assert isinstance(c_fc, NVFP4Conv1D) and c_fc.weight.shape == (64, 256)
    with torch.no_grad():  # the dequantized masters quantize to the same NVFP4 weights
        assert torch.equal(lossy.eval()(gpt2_tokens).logits, logits)

    snr = {r.name: r.snr_db for r in inspect_checkpoint(tmp_path / "ckpt").layers}
    assert all(15 < snr[n] < 25 for n in names)  # against the [in, out] masters, transposed


def test_gpt2_master_checkpoint_round_trip(gpt2_tokens, tmp_path):
    model = _gpt2()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    c_attn = loaded.transformer.h[1].attn.c_attn
    assert isinstance(c_attn, NVFP4Conv1D) and c_attn.weight.shape == (64, 192)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(gpt2_tokens).logits, model(gpt2_tokens).logits)


@pytest.mark.parametrize("export", [export_compressed_tensors, export_modelopt])
def test_exports_refuse_conv1d_layers_by_name(export, tmp_path):
    model = _gpt2()
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.c_attn': it is a GPT-2"):
        export(model, tmp_path / "out", weight_only=True)
    assert not (tmp_path / "out").exists()
