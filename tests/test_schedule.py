"""The late precision switch: switch_to_high_precision, restore, quantization_disabled, schedule."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_nvfp4 import (
    NVFP4Config,
    NVFP4Linear,
    PrecisionSchedule,
    convert,
    quantization_disabled,
    restore_quantization,
    switch_to_high_precision,
)
from hf_nvfp4.recipe import PRESETS

NVFP4 = PRESETS["nvfp4"]
BF16 = PRESETS["bf16"]


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny Llama in high precision and its NVFP4 copy (same weights, 14 NVFP4 layers)."""
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ))
    quantized = copy.deepcopy(plain)
    convert(quantized, NVFP4Config(first_bf16_blocks=0, last_bf16_blocks=0, backend="reference"),
            verbose=False)
    return plain, quantized


@pytest.fixture
def model() -> torch.nn.Module:
    return _models()[1]


def _recipes(model) -> list:
    return [m.recipe for m in model.modules() if isinstance(m, NVFP4Linear)]


def test_switch_forward_keeps_gradients_quantized(model):
    assert switch_to_high_precision(model, "forward") == 14
    for recipe in _recipes(model):
        assert recipe == NVFP4.replace(fprop_format="bf16")
        assert (recipe.dgrad_format, recipe.wgrad_format) == ("nvfp4", "nvfp4")
        assert recipe.rht and recipe.stochastic_rounding and recipe.weight_2d
        specs = recipe.role_specs()
        assert specs.x is None and specs.w is None
        assert specs.dy.rounding == "stochastic" and specs.dy_t.rht and specs.x_t.rht
        assert specs.w_dgrad.tile == (16, 16)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_switch_all_then_restore(model):
    assert switch_to_high_precision(model, "all") == 14
    assert all(r == BF16 and r.is_high_precision for r in _recipes(model))
    # A second switch keeps the original quantized recipe to restore.
    switch_to_high_precision(model, "forward")
    assert restore_quantization(model) == 14
    assert all(r == NVFP4 for r in _recipes(model))
    assert restore_quantization(model) == 0


def test_switch_rejects_unknown_mode(model):
    with pytest.raises(ValueError,
                       match=r"switch mode must be one of \('forward', 'all'\); got 'half'"):
        switch_to_high_precision(model, "half")


def test_quantization_disabled_restores_on_exit(model):
    layers = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    switch_to_high_precision(layers[0], "forward")  # one layer switched beforehand
    with pytest.raises(RuntimeError, match="inside"), quantization_disabled(model):
        assert all(r == BF16 for r in _recipes(model))
        raise RuntimeError("inside")
    assert layers[0].recipe == NVFP4.replace(fprop_format="bf16")
    assert all(m.recipe == NVFP4 for m in layers[1:])
    # The switched layer still remembers its quantized recipe.
    assert restore_quantization(model) == 1
    assert all(r == NVFP4 for r in _recipes(model))


def test_precision_schedule_switches_once_at_the_rounded_step(model):
    schedule = PrecisionSchedule(switch_at=0.82, total_steps=50, mode="forward")
    assert schedule.switch_step == 41  # round(0.82 * 50)
    fired = [step for step in range(50) if schedule.update(model, step)]
    assert fired == [41]
    assert schedule.switched
    assert all(r == NVFP4.replace(fprop_format="bf16") for r in _recipes(model))


def test_precision_schedule_without_switch_never_fires(model):
    schedule = PrecisionSchedule(switch_at=None, total_steps=10)
    assert schedule.switch_step is None
    assert not any(schedule.update(model, step) for step in range(20))
    assert all(r == NVFP4 for r in _recipes(model))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(switch_at=1.5, total_steps=10), "switch_at must be a fraction in \\[0, 1\\]"),
        (dict(switch_at=0.5, total_steps=0), "total_steps must be positive; got 0"),
        (dict(switch_at=0.5, total_steps=10, mode="fwd"), "got 'fwd'"),
    ],
)
def test_precision_schedule_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        PrecisionSchedule(**kw)


def _assert_computes_as(model, plain, ids, summed_elsewhere: str | None = None) -> None:
    """``model`` gives ``plain``'s logits and gradients bit for bit; the gradients of
    parameters whose name holds ``summed_elsewhere`` up to FP32 summation order."""
    out_q = model(input_ids=ids, labels=ids)
    out_p = plain(input_ids=ids, labels=ids)
    assert torch.equal(out_q.logits, out_p.logits)
    out_q.loss.backward()
    out_p.loss.backward()
    grads = dict(plain.named_parameters())
    for name, param in model.named_parameters():
        want = grads[name].grad
        if summed_elsewhere is not None and summed_elsewhere in name:
            assert torch.allclose(param.grad, want, rtol=0, atol=1e-6 * want.abs().max()), name
        else:
            assert torch.equal(param.grad, want), name


def test_fully_switched_model_equals_high_precision_model():
    plain, quantized = _models()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    out_q = quantized(input_ids=ids, labels=ids)
    out_p = plain(input_ids=ids, labels=ids)
    assert not torch.equal(out_q.logits, out_p.logits)

    switch_to_high_precision(quantized, "all")
    _assert_computes_as(quantized, plain, ids)

    restore_quantization(quantized)
    with torch.no_grad():
        assert not torch.equal(quantized(input_ids=ids).logits, out_p.logits)


@pytest.mark.parametrize("mode", ["forward", "all"])
def test_a_switched_model_reloads_switched(mode, tmp_path):
    from transformers import AutoModelForCausalLM

    import hf_nvfp4
    from hf_nvfp4.checkpoint import save_packed

    plain, _ = _models()
    model = hf_nvfp4.prepare_model(plain, {"first_bf16_blocks": 0, "last_bf16_blocks": 0,
                                           "backend": "reference"})
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with quantization_disabled(model):  # a temporary switch is not recorded
        pass
    assert model.config.quantization_config.switched is None
    switch_to_high_precision(model, mode)
    assert model.config.quantization_config.switched == mode
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    layers = [m for m in reloaded.modules() if isinstance(m, NVFP4Linear)]
    assert layers and all(m.recipe.fprop_format == "bf16" for m in layers)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    if mode == "all":
        with pytest.raises(ValueError, match="switched to BF16"):
            save_packed(model, tmp_path / "packed")
    restore_quantization(reloaded)
    assert reloaded.config.quantization_config.switched is None
    assert all(m.recipe == NVFP4 for m in layers)


def _moe_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny Qwen3-MoE in high precision and its NVFP4 copy (8 linears, 2 experts modules)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    plain = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2))
    quantized = copy.deepcopy(plain)
    convert(quantized, NVFP4Config(first_bf16_blocks=0, last_bf16_blocks=0, backend="reference"),
            verbose=False)
    return plain, quantized


def _expert_recipes(model) -> list:
    from hf_nvfp4.experts import iter_nvfp4_experts

    return [m._hf_nvfp4.recipe for _, m in iter_nvfp4_experts(model)]


def test_the_switch_covers_moe_experts():
    """MoE experts switch and restore with the linears: fully switched, the model computes the
    high-precision model's logits and every gradient but the experts' weights' bit for bit
    (those up to FP32 summation order: 2.4e-7 of their largest measured)."""
    plain, quantized = _moe_models()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    out_p = plain(input_ids=ids, labels=ids)
    assert switch_to_high_precision(quantized, "forward") == 10  # 8 linears + 2 experts
    assert all(r == NVFP4.replace(fprop_format="bf16") for r in _expert_recipes(quantized))
    with torch.no_grad():
        assert torch.equal(quantized(input_ids=ids).logits, out_p.logits)
    switch_to_high_precision(quantized, "all")
    assert _expert_recipes(quantized) == [BF16, BF16]
    _assert_computes_as(quantized, plain, ids, summed_elsewhere=".experts.")
    with quantization_disabled(quantized, "forward"):  # already switched: stays switched
        pass
    assert _expert_recipes(quantized) == [BF16, BF16]
    assert restore_quantization(quantized) == 10
    assert _expert_recipes(quantized) == [NVFP4, NVFP4]
    with torch.no_grad():
        assert not torch.equal(quantized(input_ids=ids).logits, out_p.logits)


def test_a_switched_moe_model_reloads_with_its_experts_switched(tmp_path):
    from transformers import AutoModelForCausalLM

    import hf_nvfp4
    from hf_nvfp4.schedule import is_switched

    plain, _ = _moe_models()
    model = hf_nvfp4.prepare_model(plain, {"first_bf16_blocks": 0, "last_bf16_blocks": 0,
                                           "backend": "reference"})
    switch_to_high_precision(model, "all")
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert _expert_recipes(reloaded) == [BF16, BF16] and is_switched(reloaded)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    restore_quantization(reloaded)
    assert _expert_recipes(reloaded) == [NVFP4, NVFP4]
