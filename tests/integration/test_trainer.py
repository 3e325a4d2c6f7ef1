"""hf_nvfp4.Trainer on tiny real Llama models (CPU)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainerCallback

from hf_nvfp4 import (
    LateSwitchCallback,
    NVFP4Config,
    NVFP4Linear,
    NVFP4Trainer,
    NVFP4TrainingArguments,
    QuantTelemetryCallback,
    switch_to_high_precision,
)
from hf_nvfp4.data import BlockDataset, byte_tokens, split_blocks, stdlib_corpus

ALL_BLOCKS = {"first_bf16_blocks": 0, "last_bf16_blocks": 0, "backend": "reference"}


@pytest.fixture(scope="module")
def data():
    train, val = split_blocks(byte_tokens(stdlib_corpus(60_000)), 32)
    return BlockDataset(train[:256]), BlockDataset(val[:16])


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6,
                learning_rate=3e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                data_seed=0, save_strategy="no", disable_tqdm=True)
    base.update(kw)
    return NVFP4TrainingArguments(**base)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_converts_and_trains(tmp_path, data):
    model = _model()
    trainer = NVFP4Trainer(model=model, args=_args(tmp_path), nvfp4=ALL_BLOCKS,
                           train_dataset=data[0], eval_dataset=data[1])
    assert sum(isinstance(m, NVFP4Linear) for m in model.modules()) == 14
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    trainer.save_model(str(tmp_path / "final"))
    cfg = json.loads((tmp_path / "final" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "hf_nvfp4"
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    x = data[1][0]["input_ids"][None]
    model.eval()
    assert torch.equal(reloaded(x).logits, model(x).logits)


@pytest.mark.parametrize(
    "how", ["true", "preset", "dict", "file", "args", "env"],
)
def test_nvfp4_argument_forms(tmp_path, data, monkeypatch, how):
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps({"recipe": "mxfp4", **ALL_BLOCKS}))
    kw, args_kw = {}, {}
    if how == "true":
        kw["nvfp4"] = True
    elif how == "preset":
        kw["nvfp4"] = "mxfp4"
    elif how == "dict":
        kw["nvfp4"] = {"recipe": "mxfp4", **ALL_BLOCKS}
    elif how == "file":
        kw["nvfp4"] = str(recipe_file)
    elif how == "args":
        args_kw["nvfp4"] = str(recipe_file)
    else:
        monkeypatch.setenv("HF_NVFP4_RECIPE", str(recipe_file))
    model = _model()
    trainer = NVFP4Trainer(model=model, args=_args(tmp_path, max_steps=1, **args_kw),
                           train_dataset=data[0], **kw)
    layers = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    assert layers
    expected = "nvfp4" if how == "true" else "mxfp4"
    assert layers[0].recipe.fprop_format == expected
    assert trainer.nvfp4_config.quant_method == "hf_nvfp4"


def test_no_nvfp4_is_plain_trainer(tmp_path, data, monkeypatch, caplog, capsys):
    monkeypatch.delenv("HF_NVFP4_RECIPE", raising=False)
    model = _model()
    with caplog.at_level("WARNING", logger="hf_nvfp4.trainer"):
        NVFP4Trainer(model=model, args=_args(tmp_path), train_dataset=data[0])
    assert not any(isinstance(m, NVFP4Linear) for m in model.modules())
    assert "no NVFP4 config" in caplog.text and "training in high precision" in caplog.text
    NVFP4Trainer(model=_model(), args=_args(tmp_path), train_dataset=data[0], nvfp4=False)
    assert "NVFP4 is off (nvfp4=False)" in capsys.readouterr().out
    NVFP4Trainer(model=_model(), args=_args(tmp_path), train_dataset=data[0], nvfp4=True)
    out = capsys.readouterr().out
    assert "hf_nvfp4.Trainer: training with NVFP4Config" in out
    assert "run eager" not in out  # no CUDA here: no hint to compile


def test_eager_blocks_on_cuda_get_the_compile_hint(capsys):
    """NVFP4 training on a CUDA device with eager blocks names compile_blocks; other devices
    get no hint (the Trainer asks only when NVFP4 is on and no compile mode was given)."""
    NVFP4Trainer._hint_compile(torch.device("cuda", 0))
    out = capsys.readouterr().out
    assert "run eager" in out and "compile_blocks='reduce-overhead'" in out
    NVFP4Trainer._hint_compile(torch.device("cpu"))
    assert capsys.readouterr().out == ""


def test_no_compile_hint_when_blocks_are_compiled_or_not_on_cuda(tmp_path, data, monkeypatch,
                                                                  capsys):
    """The Trainer asks for the hint only for NVFP4 with eager blocks, and passes the device
    it trains on (here the CPU: no hint)."""
    devices = []
    monkeypatch.setattr(NVFP4Trainer, "_hint_compile", staticmethod(devices.append))
    NVFP4Trainer(model=_model(), args=_args(tmp_path), train_dataset=data[0], nvfp4=True)
    assert devices == [torch.device("cpu")]
    NVFP4Trainer(model=_model(), args=_args(tmp_path), train_dataset=data[0], nvfp4=True,
                 compile_blocks="default")
    NVFP4Trainer(model=_model(), args=_args(tmp_path), train_dataset=data[0], nvfp4=False)
    assert devices == [torch.device("cpu")]


def test_resume_reproduces_uninterrupted_run(tmp_path, data):
    full = NVFP4Trainer(model=_model(), args=_args(tmp_path / "a"), nvfp4=ALL_BLOCKS,
                        train_dataset=data[0])
    full.train()
    ref = _losses(full)

    first = NVFP4Trainer(model=_model(), args=_args(tmp_path / "b", save_strategy="steps",
                                                     save_steps=3), nvfp4=ALL_BLOCKS,
                         train_dataset=data[0])
    first.train()
    resumed = NVFP4Trainer(model=_model(), args=_args(tmp_path / "b"), nvfp4=ALL_BLOCKS,
                           train_dataset=data[0])
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert len(ref) == 6
    assert _losses(resumed)[-3:] == ref[3:]


class _SwitchAfterStep2(TrainerCallback):
    """A switch no schedule re-derives on resume (like the telemetry's auto switch)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:
            switch_to_high_precision(model, "all")


def test_resume_keeps_a_switch_taken_before_the_checkpoint(tmp_path, data):
    full = NVFP4Trainer(model=_model(), args=_args(tmp_path / "a"), nvfp4=ALL_BLOCKS,
                        train_dataset=data[0], callbacks=[_SwitchAfterStep2()])
    full.train()
    first = NVFP4Trainer(model=_model(), args=_args(tmp_path / "b", save_strategy="steps",
                                                     save_steps=3), nvfp4=ALL_BLOCKS,
                         train_dataset=data[0], callbacks=[_SwitchAfterStep2()])
    first.train()
    resumed = NVFP4Trainer(model=_model(), args=_args(tmp_path / "b"), nvfp4=ALL_BLOCKS,
                           train_dataset=data[0])
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    layers = [m for m in resumed.model.modules() if isinstance(m, NVFP4Linear)]
    assert layers and all(m.recipe.fprop_format == "bf16" for m in layers)
    assert _losses(resumed)[-3:] == _losses(full)[3:]


def test_grad_accumulation_checkpointing_and_late_switch(tmp_path, data):
    model = _model()
    trainer = NVFP4Trainer(
        model=model,
        args=_args(tmp_path, max_steps=4, gradient_accumulation_steps=2,
                   gradient_checkpointing=True),
        nvfp4={**ALL_BLOCKS, "switch_to_bf16_at": 0.5, "switch_mode": "forward"},
        train_dataset=data[0],
    )
    assert any(isinstance(c, LateSwitchCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    assert model.is_gradient_checkpointing
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.recipe.fprop_format == "bf16" and layer.recipe.wgrad_format == "nvfp4"
    # 4 steps x 2 micro-batches, each forward run twice (the checkpointed recomputation draws
    # its own keys, which that micro-batch's backward then uses)
    assert layer.sr_step == 16
    assert all(math.isfinite(v) for v in _losses(trainer))


def test_telemetry_is_logged(tmp_path, data):
    cb = QuantTelemetryCallback(every=2, max_layers=2)
    trainer = NVFP4Trainer(model=_model(), args=_args(tmp_path, max_steps=4), nvfp4=ALL_BLOCKS,
                           train_dataset=data[0], callbacks=[cb])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "nvfp4/x_snr_db" in h]
    assert len(logged) == 2
    h = logged[0]
    # NVFP4 on activations keeps ~15-25 dB; random-init weights in 16x16 tiles similar.
    for role in ("x", "w", "dy"):
        assert 10 < h[f"nvfp4/{role}_snr_db"] < 30
        assert 0 <= h[f"nvfp4/{role}_zero_frac"] < 0.5
        assert 0 <= h[f"nvfp4/{role}_sat_frac"] < 0.1
    assert h["nvfp4/wgrad_noise_ratio"] > math.sqrt(3)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_quantized_optimizer_moments(tmp_path, data, fmt):
    """Every moment format QuantizedAdamW has is accepted by the config and trains."""
    from hf_nvfp4.optim import QuantizedAdamW

    trainer = NVFP4Trainer(model=_model(), args=_args(tmp_path, max_steps=2),
                           nvfp4={**ALL_BLOCKS, "optimizer_moments": fmt},
                           train_dataset=data[0])
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, QuantizedAdamW)
    assert opt.codecs["exp_avg"].fmt == opt.codecs["exp_avg_sq"].fmt == fmt
    assert any("exp_avg_data" in state for state in opt.state.values())  # stored quantized


def test_conflicting_configs_rejected(tmp_path, data):
    model = _model()
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "m"), quantization_config=NVFP4Config(**ALL_BLOCKS)
    )
    with pytest.raises(ValueError, match="differs from the nvfp4= argument"):
        NVFP4Trainer(model=loaded, args=_args(tmp_path), nvfp4="mxfp4", train_dataset=data[0])


def test_data_parallel_is_refused_with_its_reason(tmp_path, data):
    """One process seeing several GPUs: transformers' Trainer would wrap the model in
    torch.nn.DataParallel, whose replicas share one rounding state; training refuses before
    any step, naming the launchers to use, while evaluation (no rounding bits) runs; a model
    with instance-forward experts refuses evaluation too; a plain replica refuses to train."""
    from transformers import AutoConfig

    model = _model()
    args = _args(tmp_path)
    trainer = NVFP4Trainer(model=model, args=args, nvfp4=ALL_BLOCKS, train_dataset=data[0],
                           eval_dataset=data[1])
    args._n_gpu = 2  # what TrainingArguments finds on a machine with two visible GPUs
    with pytest.raises(RuntimeError, match=r"sees 2 GPUs.*DataParallel.*accelerate launch"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert math.isfinite(trainer.evaluate()["eval_loss"])  # on a CPU DataParallel is a no-op
    torch.manual_seed(0)
    inkling = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        model_type="inkling_text", hidden_size=64, intermediate_size=64,
        moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4,
        swa_num_key_value_heads=2, swa_head_dim=16, d_rel=16, rel_extent=64,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2, vocab_size=256))
    args = _args(tmp_path / "moe")
    moe = NVFP4Trainer(model=inkling, args=args, nvfp4=ALL_BLOCKS, eval_dataset=data[1])
    args._n_gpu = 2
    with pytest.raises(RuntimeError, match=r"sees 2 GPUs.*experts modules run a forward set "
                                           "on the instance"):
        moe.evaluate()
    layer = model.model.layers[0].mlp.up_proj
    # what torch.nn.parallel.replicate gives each GPU: parameters as non-leaf copies
    replica = layer._replicate_for_data_parallel()
    for name, param in layer._parameters.items():
        setattr(replica, name, None if param is None else param * 1)
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match=r"NVFP4Linear: .*does not run under torch\.nn\."
                                            "DataParallel"):
        replica.train()(x)
    layer.eval()
    with torch.no_grad():  # evaluation draws no random bits: replicas compute as the layer
        assert torch.equal(replica.eval()(x), layer(x))


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_torch_compile_trains_like_eager(tmp_path, data):
    """``TrainingArguments(torch_compile=True)`` compiles the converted model (forward and
    backward traced, the NVFP4 ops as custom ops); aot_eager runs the traced graphs with the
    same ops, so the losses equal eager training bit for bit."""
    from hf_nvfp4.kernels import is_triton_available

    ok, why = is_triton_available()
    if not ok:
        pytest.skip(why)
    from torch._dynamo.utils import counters

    recipe = {**ALL_BLOCKS, "backend": "triton"}
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        kw = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        trainer = NVFP4Trainer(model=_model(), args=_args(tmp_path, max_steps=2, **kw),
                               nvfp4=recipe, train_dataset=data[0])
        trainer.train()
        runs[compiled] = (_losses(trainer), counters["stats"]["unique_graphs"])
    (losses, graphs), (eager_losses, eager_graphs) = runs[True], runs[False]
    assert graphs > 0 and eager_graphs == 0  # the compiled run traced the model
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert losses == eager_losses
