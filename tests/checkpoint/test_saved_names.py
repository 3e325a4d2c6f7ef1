"""Checkpoints of models whose weights transformers converts on load (e.g. stored transposed).

``save_pretrained`` reverts transformers' checkpoint conversion, so an NVFP4 master checkpoint
holds such a layer's weight under its original name and layout (Ergo's shared expert is
stored ``[in, out]`` as ``feed_forward.shared_up_proj``); reloading must find it there,
apply the conversion back and give the same NVFP4 weights, bit for bit, and the same logits.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import hf_nvfp4
from hf_nvfp4 import NVFP4Config
from hf_nvfp4.checkpoint import CheckpointError, load_packed, save_packed
from hf_nvfp4.checkpoint.experts import expert_weights, iter_quantized_experts
from hf_nvfp4.checkpoint.layers import iter_packed_layers
from hf_nvfp4.checkpoint.saved_names import saved_name
from hf_nvfp4.checkpoint.shards import checkpoint_files

from .conftest import checkpoint_tensors

ALL_NVFP4 = NVFP4Config(backend="reference", first_bf16_blocks=0, last_bf16_blocks=0)
VOCAB = 256
# Ergo (transformers >= 5.25): block 0 dense, block 1 MoE with a shared expert. The shared
# expert's matrices are not square (96 x 64), so a missed transpose cannot load unnoticed.
ERGO = dict(model_type="ergo", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, first_dense_intermediate_size=128,
            num_dense_blocks=1, moe_intermediate_size=32, shared_intermediate_size=96,
            num_experts=4, num_experts_per_tok=2, max_position_embeddings=64, sliding_window=8)
SHARED = "model.layers.1.mlp.shared_experts"


class TransposedDownLlamaForCausalLM(LlamaForCausalLM):
    """Llama whose checkpoints store each ``mlp.down_proj`` weight transposed, as
    ``mlp.down_proj_t`` ``[in, out]`` (a conversion mapping registered for this class)."""


@pytest.fixture(scope="module")
def transposed_llama_mapping() -> None:
    try:
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping
        from transformers.core_model_loading import Transpose, WeightConverter
    except ImportError as e:
        pytest.skip(f"this transformers has no checkpoint conversion operations ({e})")
    register_checkpoint_conversion_mapping(
        TransposedDownLlamaForCausalLM.__name__,
        [WeightConverter(source_patterns=r"mlp\.down_proj_t",
                         target_patterns="mlp.down_proj.weight",
                         operations=[Transpose(dim0=0, dim1=1)])],
        overwrite=True,
    )


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def _trained(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` after one SGD step (every SR stream advanced), in eval mode."""
    model.train()
    ids = _ids(1)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    return model.eval()


def _nvfp4_bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every NVFP4 weight as its forward uses it (codes, block scales, global scales), as
    raw bytes, by module name: linears and MoE experts."""
    out = {}
    for layer in iter_packed_layers(model):
        q = layer.weight
        out[f"{layer.name}.codes"] = q.data
        out[f"{layer.name}.scales"] = q.scale.view(torch.uint8)
        out[f"{layer.name}.global"] = q.global_scale.reshape(1).float().view(torch.uint8)
    for name, mod in iter_quantized_experts(model):
        for p, w in expert_weights(mod).items():
            out[f"{name}.{p}.codes"] = w.data
            out[f"{name}.{p}.scales"] = w.scale.view(torch.uint8)
            out[f"{name}.{p}.global"] = w.global_scale.view(torch.uint8)
    return out


def _assert_same_nvfp4(model: torch.nn.Module, loaded: torch.nn.Module, layers: int) -> None:
    want, got = _nvfp4_bits(model), _nvfp4_bits(loaded)
    assert got.keys() == want.keys()
    assert len(want) == 3 * layers
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids(2), use_cache=False).logits


def _ergo() -> torch.nn.Module:
    if "ergo" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Ergo (added in transformers 5.25)")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**ERGO))
    hf_nvfp4.prepare_model(model, ALL_NVFP4)
    return _trained(model)


def _transposed_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    model = TransposedDownLlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    hf_nvfp4.prepare_model(model, ALL_NVFP4)
    return _trained(model)


def test_ergo_master_checkpoint_reloads_its_transposed_shared_expert(tmp_path):
    model = _ergo()
    model.save_pretrained(tmp_path)
    files = checkpoint_tensors(tmp_path)
    # Saved in Ergo's original layout: the shared expert's [out, in] weights transposed.
    for proj, saved in (("up_proj", "shared_up_proj"), ("down_proj", "shared_down_proj")):
        weight = model.get_submodule(f"{SHARED}.{proj}").weight
        assert torch.equal(files[f"layers.1.feed_forward.{saved}"], weight.detach().T)
        assert f"{SHARED}.{proj}.weight" not in files
        assert saved_name(model, f"{SHARED}.{proj}.weight").names == (
            f"layers.1.feed_forward.{saved}",)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    # 4 attention, 2 dense MLP and 2 shared-expert linears; up and down of the experts.
    _assert_same_nvfp4(model, loaded, layers=10)
    for key, value in model.state_dict().items():  # masters and SR streams
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.get_submodule(f"{SHARED}.up_proj").sr_state.tolist()[1] == 1
    assert torch.equal(_logits(loaded), _logits(model))


def test_ergo_packed_checkpoint_keeps_its_nvfp4_weights(tmp_path):
    model = _ergo()
    save_packed(model, tmp_path, dtype=None, masters=True)
    assert f"{SHARED}.up_proj.weight_packed" in checkpoint_tensors(tmp_path)
    packed = load_packed(tmp_path)
    _assert_same_nvfp4(model, packed, layers=10)
    # Ergo's decoder layer reads o_proj.weight.dtype: a packed layer answers with its dtype
    o_proj = packed.get_submodule("model.layers.0.self_attn.o_proj")
    assert o_proj.weight.dtype == torch.float32 and "weight" not in o_proj.state_dict()
    assert torch.equal(_logits(packed.eval()), _logits(model))
    trainable = load_packed(tmp_path, mode="train", masters=True).eval()
    _assert_same_nvfp4(model, trainable, layers=10)
    assert torch.equal(_logits(trainable), _logits(model))


def test_a_transpose_conversion_round_trips_bit_for_bit(transposed_llama_mapping, tmp_path):
    model = _transposed_llama()
    model.save_pretrained(tmp_path)
    files = checkpoint_tensors(tmp_path)
    for i in range(2):
        weight = model.get_submodule(f"model.layers.{i}.mlp.down_proj").weight.detach()
        assert weight.shape == (64, 128)
        assert torch.equal(files[f"model.layers.{i}.mlp.down_proj_t"], weight.T)
        assert f"model.layers.{i}.mlp.down_proj.weight" not in files

    loaded = TransposedDownLlamaForCausalLM.from_pretrained(tmp_path).eval()
    _assert_same_nvfp4(model, loaded, layers=14)  # 7 linears per block
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(_logits(loaded), _logits(model))


def test_a_missing_converted_weight_is_named_not_initialized(transposed_llama_mapping,
                                                             tmp_path):
    model = _transposed_llama()
    model.save_pretrained(tmp_path)
    path = checkpoint_files(tmp_path)[0]
    tensors = checkpoint_tensors(tmp_path)
    del tensors["model.layers.1.mlp.down_proj_t"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=(
            r"1 NVFP4 layer weights are missing .*'model\.layers\.1\.mlp\.down_proj\.weight' "
            r"\(saved as 'model\.layers\.1\.mlp\.down_proj_t'\); refusing to load")):
        TransposedDownLlamaForCausalLM.from_pretrained(tmp_path)
