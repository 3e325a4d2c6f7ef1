"""transformers integration: NVFP4Config, from_pretrained/save_pretrained, Trainer."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FineGrainedFP8Config,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.quantizers import AutoHfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, NVFP4Linear
from hf_nvfp4.hf_quantizer import NVFP4HfQuantizer, prepare_model, register
from hf_nvfp4.recipe import PRESETS

LLAMA = LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
)
QCFG = dict(first_bf16_blocks=0, last_bf16_blocks=0, backend="reference", sr_seed=5)


def _ids(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 32), generator=torch.Generator().manual_seed(seed))


def _train_step(model) -> dict[str, torch.Tensor]:
    """One forward/backward in train mode; the gradients of the NVFP4 layers."""
    model.train()
    model.zero_grad(set_to_none=True)
    ids = _ids(1)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: m.weight.grad for n, m in model.named_modules() if isinstance(m, NVFP4Linear)}


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LLAMA)
    path = tmp_path_factory.mktemp("plain")
    model.save_pretrained(path)
    return path, model


def test_method_is_registered():
    register()  # idempotent: the import already registered it
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hf_nvfp4"] is NVFP4Config
    assert AUTO_QUANTIZER_MAPPING["hf_nvfp4"] is NVFP4HfQuantizer


def test_from_pretrained_swaps_linears_and_keeps_checkpoint_weights(plain_checkpoint):
    path, plain = plain_checkpoint
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config(**QCFG))
    nvfp4 = {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Linear)}
    assert len(nvfp4) == 14
    assert model.is_quantized and model.hf_quantizer.is_qat_trainable
    reference = plain.state_dict()
    for name, value in model.state_dict().items():
        if name.endswith("sr_state"):
            continue
        assert torch.equal(value, reference[name]), name
    # A plain checkpoint has no SR state: each layer is seeded from sr_seed, step 0.
    seeds = sorted(int(m.sr_state[0]) for m in nvfp4.values())
    assert seeds == list(range(5, 19))
    assert all(m.sr_step == 0 for m in nvfp4.values())

    with torch.no_grad():
        quantized = model(input_ids=_ids()).logits
        exact = plain(input_ids=_ids()).logits
    # NVFP4 forward: close to, but not equal to, the high-precision model.
    assert not torch.equal(quantized, exact)
    assert (quantized - exact).norm() / exact.norm() < 0.25


def test_save_pretrained_and_reload_round_trip(plain_checkpoint, tmp_path):
    path, _ = plain_checkpoint
    config = NVFP4Config(**QCFG, exclude=["o_proj"])
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    _train_step(model)  # advances every layer's SR stream to step 1
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == config.to_dict()
    assert saved["quant_method"] == "hf_nvfp4" and saved["exclude"] == ["o_proj"]

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.hf_quantizer.quantization_config, NVFP4Config)
    assert reloaded.hf_quantizer.quantization_config.to_dict() == config.to_dict()
    names = [n for n, m in reloaded.named_modules() if isinstance(m, NVFP4Linear)]
    assert names == [n for n, m in model.named_modules() if isinstance(m, NVFP4Linear)]
    assert len(names) == 12
    for name, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name]), name
    for name in names:
        mod = reloaded.get_submodule(name)
        assert mod.sr_state.tolist() == [mod._sr_seed, 1]
        assert mod.sr_step == 1

    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).logits, reloaded(input_ids=_ids()).logits)
    # The stochastic-rounding stream resumes where it stopped: the next step is identical.
    grads, grads_reloaded = _train_step(model), _train_step(reloaded)
    for name in names:
        assert torch.equal(grads[name], grads_reloaded[name]), name


def test_a_checkpoint_whose_backend_cannot_run_here_loads_with_auto(plain_checkpoint, tmp_path,
                                                                    caplog):
    path, _ = plain_checkpoint
    # Saved on a Blackwell machine: the native FP4 backend never runs on this CPU.
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=NVFP4Config(**{**QCFG, "backend": "native"}))
    model.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="hf_nvfp4.hf_quantizer"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "backend 'native' cannot run here" in caplog.text
    assert reloaded.hf_quantizer.quantization_config.backend == "auto"
    layers = [m for m in reloaded.modules() if isinstance(m, NVFP4Linear)]
    assert layers and {m.backend_name for m in layers} == {"auto"}
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=_ids()).logits).all()


def test_from_config_builds_an_nvfp4_model():
    torch.manual_seed(0)
    model = hf_nvfp4.from_config(LLAMA, NVFP4Config(backend="reference"))
    # Default split on 2 blocks: round(2*2/62) = 0 and round(2*8/62) = 0 blocks kept in BF16.
    assert sum(isinstance(m, NVFP4Linear) for m in model.modules()) == 14
    assert model.is_quantized and model.quantization_method == "hf_nvfp4"
    assert model.config.quantization_config.quant_method == "hf_nvfp4"
    grads = _train_step(model)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def test_trainer_trains_the_full_model(tmp_path):
    torch.manual_seed(0)
    model = hf_nvfp4.from_config(LLAMA, NVFP4Config(**QCFG))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = _ids(2, batch=8)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r}
                                                             for r in rows])
    result = trainer.train()

    assert result.global_step == 3
    assert 4.5 < result.training_loss < 6.5
    assert all(p.requires_grad for p in model.parameters())
    for name, param in model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"
    nvfp4 = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    assert len(nvfp4) == 14 and all(m.sr_step == 3 for m in nvfp4)


def test_prepare_model_rejects_a_model_quantized_by_another_method():
    model = LlamaForCausalLM(LLAMA)
    model.hf_quantizer = AutoHfQuantizer.from_config(FineGrainedFP8Config())
    with pytest.raises(ValueError, match="already quantized with .*fp8"):
        prepare_model(model, NVFP4Config())
    assert not any(isinstance(m, NVFP4Linear) for m in model.modules())


def test_prepare_model_rejects_a_second_conversion():
    model = prepare_model(LlamaForCausalLM(LLAMA), NVFP4Config(backend="reference"))
    with pytest.raises(ValueError, match="already quantized with 'hf_nvfp4'"):
        prepare_model(model, NVFP4Config())


# ---- NVFP4Config ------------------------------------------------------------------------


def test_config_defaults():
    config = NVFP4Config()
    assert config.quant_method == "hf_nvfp4"
    assert config.get_recipe() == PRESETS["nvfp4"]
    assert config.block_split(62) == (2, 8)
    assert (config.include, config.exclude, config.modules_to_not_convert) == ([], [], [])


def test_config_round_trips_dict_and_json(tmp_path):
    config = NVFP4Config(
        recipe={"preset": "fp8_block", "dgrad_format": "nvfp4"}, backend="reference",
        first_bf16_blocks=1, last_bf16_blocks=0.25, include=["mlp"], exclude=["down"],
        modules_to_not_convert=["model.layers.0"], switch_to_bf16_at=0.8, switch_mode="forward",
        sr_seed=7,
    )
    d = config.to_dict()
    assert d["recipe"]["fprop_format"] == "fp8_block" and d["recipe"]["dgrad_format"] == "nvfp4"
    assert NVFP4Config.from_dict(d).to_dict() == d
    assert NVFP4Config.load(d).to_dict() == d

    path = tmp_path / "recipe.json"
    path.write_text(config.to_json_string())
    loaded = NVFP4Config.load(path)
    assert loaded.to_dict() == d
    assert loaded.get_recipe() == config.get_recipe()
    assert loaded.block_split(8) == (1, 2)


def test_config_loads_yaml_recipe_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "recipe:\n  preset: nvfp4\n  rht: false\n"
        "backend: reference\nfirst_bf16_blocks: 1\nlast_bf16_blocks: 0.125\n"
        "exclude: [lm_head, 'o_proj$']\nswitch_to_bf16_at: 0.82\n"
    )
    config = NVFP4Config.load(str(path))
    assert config.get_recipe() == PRESETS["nvfp4"].replace(rht=False)
    assert config.exclude == ["lm_head", "o_proj$"]
    assert config.block_split(16) == (1, 2)
    assert config.switch_to_bf16_at == 0.82
    assert NVFP4Config.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_config_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        NVFP4Config.load(tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- nvfp4\n")
    with pytest.raises(ValueError, match="must hold a mapping; got list"):
        NVFP4Config.load(path)
    with pytest.raises(TypeError, match="got int"):
        NVFP4Config.load(3)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(backend="cuda"), ValueError, "backend must be one of .*got 'cuda'"),
        (dict(first_bf16_blocks=-1), ValueError, "first_bf16_blocks must be .*got -1"),
        (dict(last_bf16_blocks=1.5), ValueError, "last_bf16_blocks must be .*got 1.5"),
        (dict(last_bf16_blocks="2"), TypeError, "last_bf16_blocks must be an int"),
        (dict(include=["mlp", "(unclosed"]), ValueError, "include pattern '\\(unclosed'"),
        (dict(exclude=["[a-"]), ValueError, "exclude pattern '\\[a-' is not a valid regex"),
        (dict(block_size=16), TypeError, "unknown arguments \\['block_size'\\]"),
        (dict(recipe={"rounding": "sr"}), ValueError, "unknown recipe fields \\['rounding'\\]"),
        (dict(recipe="fp6"), ValueError, "unknown recipe preset 'fp6'"),
        (dict(recipe={"wgrad_format": "bf16"}), ValueError,
         "rht=True needs a quantized wgrad GEMM; got wgrad_format='bf16'"),
        (dict(recipe={"fprop_format": "int4"}), ValueError, "fprop_format must be one of"),
        (dict(switch_to_bf16_at=1.2), ValueError, "switch_to_bf16_at must be .*got 1.2"),
        (dict(switch_mode="backward"), ValueError, "switch_mode must be one of"),
        (dict(optimizer_moments="int8"), ValueError, "optimizer_moments must be"),
        (dict(checkpoint_format="gguf"), ValueError, "checkpoint_format must be one of"),
        (dict(switch_to_bf16_at="0.8"), TypeError, "switch_to_bf16_at must be a float .*'0.8'"),
        (dict(exclude=5), TypeError, "exclude must be a string or a list of strings; got 5"),
        (dict(include=["mlp", 3]), TypeError, "include must be a string or a list of strings"),
        (dict(modules_to_not_convert=7), TypeError, "modules_to_not_convert must be a string"),
        (dict(sr_seed="abc"), TypeError, "sr_seed must be an int; got 'abc'"),
        (dict(sr_seed=True), TypeError, "sr_seed must be an int; got True"),
        (dict(backend=3), TypeError, "backend must be a string; got 3"),
        (dict(optimizer_moments=4), TypeError, "optimizer_moments must be a string or None"),
        (dict(reduce_amax="yes"), TypeError, "reduce_amax must be a bool"),
    ],
)
def test_config_rejects_bad_values(kw, error, match):
    with pytest.raises(error, match=match):
        NVFP4Config(**kw)


def test_recipe_file_with_unknown_recipe_field_names_it(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("recipe:\n  preset: nvfp4\n  stochastic_round: true\n")
    with pytest.raises(ValueError, match="unknown recipe fields \\['stochastic_round'\\]"):
        NVFP4Config.load(path)
