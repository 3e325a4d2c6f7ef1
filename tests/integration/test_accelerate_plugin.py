"""NVFP4Plugin on a real Accelerator (CPU)."""

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from hf_nvfp4 import NVFP4Config, NVFP4Linear, NVFP4Plugin


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4))


def test_prepare_converts_and_optimizer_keeps_training_the_same_params():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = NVFP4Plugin(NVFP4Config(first_bf16_blocks=0, last_bf16_blocks=0)).apply(
        Accelerator(cpu=True)
    )
    model, opt = acc.prepare(model, opt)
    layers = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    assert len(layers) == 14 and model.hf_quantizer.quantization_config.quant_method == "hf_nvfp4"
    before = layers[0].weight.detach().clone()
    x = torch.randint(0, 256, (2, 16))
    acc.backward(model(input_ids=x, labels=x).loss)
    opt.step()
    assert not torch.equal(before, layers[0].weight)


def test_from_env_and_idempotent_apply(tmp_path):
    assert NVFP4Plugin.from_env({}) is None
    recipe = tmp_path / "r.yaml"
    recipe.write_text("recipe: mxfp4\nfirst_bf16_blocks: 0\nlast_bf16_blocks: 0\n")
    plugin = NVFP4Plugin.from_env({"HF_NVFP4_RECIPE": str(recipe)})
    assert plugin.config.get_recipe().fprop_format == "mxfp4"
    assert NVFP4Plugin.from_env({"HF_NVFP4_RECIPE": "fp8_block"}).config.get_recipe(
    ).fprop_format == "fp8_block"
    acc = Accelerator(cpu=True)
    plugin.apply(acc)
    plugin.apply(acc)
    model = acc.prepare(_model())
    assert plugin.summaries and len(plugin.summaries) == 1
    assert sum(isinstance(m, NVFP4Linear) for m in model.modules()) == 14
