"""Native packed checkpoints: bit-exact round trip, sharding, masters, memory."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_nvfp4
from hf_nvfp4 import NVFP4Linear
from hf_nvfp4.checkpoint import load_packed, pack_model, save_packed
from hf_nvfp4.checkpoint.layers import iter_packed_layers
from hf_nvfp4.nn.packed import NVFP4PackedLinear

from .conftest import checkpoint_tensors, tiny_llama


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_round_trip_is_bit_exact(model, tokens, tmp_path):
    save_packed(model, tmp_path / "ckpt", dtype=None)
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "hf_nvfp4" and qc["checkpoint_format"] == "packed"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    expected = {layer.name: layer.weight for layer in iter_packed_layers(model)}
    assert len(expected) == 14
    for name, mod in loaded.named_modules():
        if name in expected:
            assert isinstance(mod, NVFP4PackedLinear)
            q = expected[name]
            assert mod.weight_packed.dtype == torch.uint8
            assert mod.weight_scale.dtype == torch.float8_e4m3fn
            assert torch.equal(mod.weight_packed, q.data)
            assert torch.equal(mod.weight_scale.view(torch.uint8), q.scale.view(torch.uint8))
            assert torch.equal(mod.weight_global_scale, q.global_scale)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    # Saving the loaded packed model again writes the same bytes.
    save_packed(loaded, tmp_path / "again", dtype=None)
    a, b = checkpoint_tensors(tmp_path / "ckpt"), checkpoint_tensors(tmp_path / "again")
    assert a.keys() == b.keys()
    assert all(_bytes(a[k]) == _bytes(b[k]) for k in a)


def test_bf16_default_layout(model, tmp_path):
    save_packed(model, tmp_path / "ckpt")
    t = checkpoint_tensors(tmp_path / "ckpt")
    name = "model.layers.0.mlp.up_proj"
    assert t[f"{name}.weight_packed"].shape == (128, 32)
    assert t[f"{name}.weight_scale"].shape == (128, 4)
    assert t[f"{name}.weight_global_scale"].shape == ()
    assert f"{name}.weight" not in t and f"{name}.sr_state" not in t
    assert t["model.layers.2.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_sharded_save_loads_identically(model, tokens, tmp_path):
    save_packed(model, tmp_path / "one", dtype=None)
    save_packed(model, tmp_path / "many", dtype=None, max_shard_size="40KB")
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "many")
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)


def test_train_mode_uses_masters_exactly(model, tmp_path):
    model.model.layers[0].mlp.up_proj.sr_state[1] = 7
    save_packed(model, tmp_path / "ckpt", masters=True, max_shard_size="100KB")
    trained = load_packed(tmp_path / "ckpt", mode="train")
    assert isinstance(trained.model.layers[0].mlp.up_proj, NVFP4Linear)
    ref = model.state_dict()
    got = trained.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert trained.model.layers[0].mlp.up_proj.sr_step == 7
    assert trained.config.quantization_config.checkpoint_format == "master"
    assert trained.hf_quantizer.is_qat_trainable


def test_train_mode_without_masters_dequantizes(model, tmp_path):
    save_packed(model, tmp_path / "ckpt")
    trained = load_packed(tmp_path / "ckpt", mode="train")
    layer = trained.model.layers[1].self_attn.q_proj
    assert isinstance(layer, NVFP4Linear) and layer.weight.dtype == torch.float32
    expected = next(x for x in iter_packed_layers(model) if x.name.endswith("1.self_attn.q_proj"))
    assert torch.equal(layer.weight.detach(), expected.weight.dequantize())
    with pytest.raises(ValueError, match="masters=True"):
        load_packed(tmp_path / "ckpt", mode="train", masters=True)


def test_inference_memory_of_packed_layers(model, tmp_path):
    save_packed(model, tmp_path / "ckpt")
    loaded = load_packed(tmp_path / "ckpt")
    # adapters may train on it (hf_nvfp4.lora), the packed weights themselves not
    assert loaded.hf_quantizer.is_trainable and not loaded.hf_quantizer.is_qat_trainable
    packed = [m for m in loaded.modules() if isinstance(m, NVFP4PackedLinear)]
    in_memory = sum(
        t.numel() * t.element_size() for m in packed for t in (*m.buffers(), *m.parameters())
    )
    bf16 = sum(2 * m.in_features * m.out_features for m in packed)
    assert in_memory <= 0.35 * bf16, in_memory / bf16


def test_master_checkpoint_packs_on_load(model, tokens, tmp_path):
    model.save_pretrained(tmp_path / "master")
    qc = json.loads((tmp_path / "master" / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "master"
    packed = load_packed(tmp_path / "master")
    assert isinstance(packed.model.layers[0].mlp.up_proj, NVFP4PackedLinear)
    with torch.no_grad():
        assert torch.equal(packed(tokens).logits, model(tokens).logits)


def test_packed_linear_matches_nvfp4_linear():
    torch.manual_seed(0)
    lin = NVFP4Linear(64, 32, recipe="nvfp4", backend="reference").eval()
    packed = NVFP4PackedLinear.from_linear(lin)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert torch.equal(packed(x), lin(x))
    back = packed.to_linear()
    assert torch.equal(back.weight.detach(), packed.dequantize_weight())


def test_train_mode_without_masters_keeps_reduce_amax(tmp_path):
    model = tiny_llama()
    hf_nvfp4.prepare_model(model, {"backend": "reference", "first_bf16_blocks": 0,
                                   "last_bf16_blocks": 1, "reduce_amax": True})
    save_packed(model, tmp_path / "ckpt")
    trained = load_packed(tmp_path / "ckpt", mode="train")
    layers = [m for m in trained.modules() if isinstance(m, NVFP4Linear)]
    assert layers and all(m.reduce_amax for m in layers)


def test_master_checkpoint_of_a_non_nvfp4_recipe_loads_unpacked(tokens, tmp_path):
    model = tiny_llama()
    hf_nvfp4.prepare_model(model, {"recipe": "mxfp4", "backend": "reference",
                                   "first_bf16_blocks": 0, "last_bf16_blocks": 0})
    model.save_pretrained(tmp_path / "master")
    loaded = load_packed(tmp_path / "master")  # nothing to pack: stays MXFP4 NVFP4Linear
    assert isinstance(loaded.model.layers[0].mlp.up_proj, NVFP4Linear)
    assert loaded.config.quantization_config.checkpoint_format == "master"
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model.eval()(tokens).logits)
    with pytest.raises(ValueError, match="no layer runs NVFP4"):
        pack_model(loaded)


def test_master_checkpoint_without_sr_state_reseeds_from_the_config(model, tmp_path):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path / "master")
    path = tmp_path / "master" / "model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if not k.endswith(".sr_state")}
    save_file(tensors, path, metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "master")
    got = [m.sr_state.tolist() for m in loaded.modules() if isinstance(m, NVFP4Linear)]
    want = [[m._sr_seed, 0] for m in model.modules() if isinstance(m, NVFP4Linear)]
    assert got == want


def test_packed_linear_weight_reads_dequantized_and_refuses_assignment(tmp_path):
    """``weight`` is the dequantized weight in the layer's dtype (model code reads its dtype);
    assigning one is refused by name; a layer pickled before ``weight_dtype`` existed loads
    with the dtype its forward used."""
    torch.manual_seed(0)
    lin = NVFP4Linear(64, 32, bias=False, recipe="nvfp4", backend="reference").eval()
    packed = NVFP4PackedLinear.from_linear(lin)
    assert packed.weight.dtype == torch.float32 and "weight" not in packed.state_dict()
    assert torch.equal(packed.weight, packed.dequantize_weight())
    with pytest.raises(TypeError, match="NVFP4PackedLinear holds its weight packed"):
        packed.weight = torch.nn.Parameter(torch.zeros(32, 64))
    del packed.__dict__["weight_dtype"]  # as an older pickle holds it
    torch.save(packed, tmp_path / "layer.pt")
    old = torch.load(tmp_path / "layer.pt", weights_only=False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert old.weight_dtype == torch.float32 and torch.equal(old(x), lin(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_through_a_packed_linear_are_the_frozen_nvfp4_linears(dtype):
    """With a gradient wanted for its input, a packed layer runs the frozen NVFP4Linear's
    autograd function on its codes: the same output as its inference forward, and the same
    input gradient as the NVFP4Linear it came from (dy 1x16 with stochastic rounding from the
    same seed, over two steps; W^T from the 16x16 tiles), bit for bit."""
    torch.manual_seed(0)
    lin = NVFP4Linear(64, 48, bias=True, backend="reference", sr_seed=5)
    lin.weight.requires_grad_(False)
    packed = NVFP4PackedLinear.from_linear(lin)
    lin.train()
    packed.train()
    for step in range(2):
        x = torch.randn(3, 7, 64, dtype=dtype)
        dy = torch.randn(3, 7, 48, dtype=dtype)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = lin(x1), packed(x2)
        y1.backward(dy)
        y2.backward(dy)
        with torch.no_grad():
            assert torch.equal(y2, packed(x))
        assert torch.equal(y1, y2), step
        assert torch.equal(x1.grad, x2.grad), step
        assert x2.grad.abs().sum() > 0
    assert packed.grad_sr_state.tolist() == [5, 2] == lin.sr_state.tolist()
    no_2d = NVFP4PackedLinear(64, 48, recipe={"weight_2d": False})
    with pytest.raises(RuntimeError, match="needs the weight in 16x16 tiles"):
        no_2d(torch.randn(2, 64, requires_grad=True))


def test_the_gradient_path_follows_the_codes_however_they_are_loaded():
    """The gradient path's frozen weight wraps the layer's current codes: after an in-place
    load into a layer built empty, after buffers replaced behind ``__setattr__`` (accelerate's
    ``set_module_tensor_to_device`` writes ``_buffers`` directly) and after a backend change,
    its output is the inference forward's, bit for bit."""
    torch.manual_seed(0)
    layers = [NVFP4PackedLinear.from_linear(NVFP4Linear(64, 48, backend="reference"))
              for _ in range(2)]
    x = torch.randn(5, 64)

    def agrees(layer: NVFP4PackedLinear, source: NVFP4PackedLinear) -> None:
        with torch.no_grad():
            want = source(x)
            assert torch.equal(layer(x), want)
        assert torch.equal(layer(x.clone().requires_grad_(True)), want)

    empty = NVFP4PackedLinear(64, 48, backend="reference")
    assert empty._frozen_weight is not None  # made at construction, not in a forward
    empty.load_state_dict(layers[0].state_dict())
    agrees(empty, layers[0])
    for name, tensor in layers[1].state_dict().items():
        if name != "bias":
            empty._buffers[name] = tensor.clone()
    with torch.no_grad():
        empty.bias.copy_(layers[1].bias)
    agrees(empty, layers[1])
    empty.backend_name = "triton"
    assert empty._plan(x.device).backend == "triton"
    empty.backend_name = "reference"
    assert empty._plan(x.device).backend == "reference"
