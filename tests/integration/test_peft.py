"""PEFT (LoRA) over NVFP4 models: the base layers run NVFP4, the adapters high precision."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, NVFP4Linear, NVFP4Trainer, NVFP4TrainingArguments
from hf_nvfp4.data import BlockDataset, byte_tokens, split_blocks, stdlib_corpus

peft = pytest.importorskip("peft")

ALL_BLOCKS = {"first_bf16_blocks": 0, "last_bf16_blocks": 0, "backend": "reference"}
TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture(scope="module")
def data():
    train, val = split_blocks(byte_tokens(stdlib_corpus(60_000)), 32)
    return BlockDataset(train[:256]), BlockDataset(val[:16])


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def _adapted(model: torch.nn.Module, name: str = "q_proj", layer: int = 0):
    return model.get_submodule(f"base_model.model.model.layers.{layer}.self_attn.{name}")


def test_lora_on_an_nvfp4_model_trains_only_its_adapters_and_reloads(tmp_path, data):
    """LoRA on a model loaded with NVFP4Config: every adapted base layer stays NVFP4Linear, the
    adapters are plain Linears; with B = 0 the logits are the NVFP4 model's, bit for bit; the
    Trainer changes only the adapters (base layers: no weight gradient, their rounding state
    advances as dgrad rounds stochastically); the saved adapter on a fresh NVFP4 base gives
    the same logits."""
    _llama().save_pretrained(tmp_path / "base")

    def load():
        return AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=NVFP4Config(**ALL_BLOCKS))

    base = load().eval()
    model = _lora(load())
    q = _adapted(model)
    assert isinstance(q.base_layer, NVFP4Linear)
    assert type(q.lora_A["default"]) is torch.nn.Linear
    ids = data[1][0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = NVFP4TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4,
        learning_rate=3e-3, report_to=[], use_cpu=True, seed=0, save_strategy="no",
        disable_tqdm=True)
    NVFP4Trainer(model=model, args=args, train_dataset=data[0]).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {n for n in before if ".lora_" in n}
    assert len(changed) == 2 * len(TARGETS) * 2  # A and B, 3 targets, 2 layers
    assert q.base_layer.weight.grad is None and int(q.base_layer.sr_state[1]) == 4

    model.save_pretrained(tmp_path / "adapter")
    again = peft.PeftModel.from_pretrained(load(), tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_converting_a_peft_model_keeps_its_adapters_high_precision():
    """convert (or Trainer(nvfp4=...)) on a model that already has LoRA adapters: the adapted
    base layers convert, the adapters (16 x 64, convertible sizes) stay high precision with
    the reason, outside the NVFP4 share; merging folds B A into the NVFP4 layer's weight."""
    model = _lora(_llama())
    q = _adapted(model)
    with torch.no_grad():
        q.lora_B["default"].weight.normal_()
    weight = q.base_layer.weight.detach().clone()
    delta = q.get_delta_weight("default").detach().clone()
    summary = hf_nvfp4.convert(model, ALL_BLOCKS, verbose=False)
    decisions = {d.name: d for d in summary.layers}
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    assert decisions[f"{name}.base_layer"].quantized
    for part in ("lora_A.default", "lora_B.default"):
        assert decisions[f"{name}.{part}"].reason.startswith("a PEFT adapter"), part
    assert summary.block_matmul_share()[0] == summary.block_matmul_share()[1]
    assert isinstance(_adapted(model).base_layer, NVFP4Linear)
    merged = model.merge_and_unload()
    layer = merged.model.layers[0].self_attn.q_proj
    assert isinstance(layer, NVFP4Linear)
    assert torch.equal(layer.weight.detach(), weight + delta)
    # VB-LoRA's tuner layer is itself an nn.Linear (with no weight of its own): an adapter too
    vb = peft.get_peft_model(_llama(), peft.VBLoRAConfig(r=4, target_modules=["q_proj"],
                                                         vector_length=16, num_vectors=32))
    decisions = {d.name: d for d in hf_nvfp4.convert(vb, ALL_BLOCKS, verbose=False).layers}
    assert decisions[name].reason.startswith("a PEFT adapter or tuner layer")
    assert decisions[f"{name}.base_layer"].quantized


def test_lora_on_a_packed_model_trains_as_on_its_nvfp4_model(tmp_path, data):
    """QLoRA in NVFP4: LoRA on a packed model (base weights as 4-bit codes) computes the loss
    and adapter gradients of the same LoRA on the NVFP4 model it was packed from, bit for bit
    (the input gradients of packed layers are the frozen NVFP4Linear's, same rounding seeds);
    it trains, saves its adapter, reloads on the packed checkpoint with equal logits, and
    refuses to merge into codes; packed experts refuse gradients instead of inventing them."""
    import copy

    from hf_nvfp4.checkpoint import load_packed, pack_model, save_packed
    from hf_nvfp4.lora import load_adapter, lora_config
    from hf_nvfp4.nn.packed import NVFP4PackedLinear

    trained = _llama()
    hf_nvfp4.convert(trained, ALL_BLOCKS, verbose=False)
    master = _lora(copy.deepcopy(trained))
    packed = pack_model(copy.deepcopy(trained))
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora = peft.get_peft_model(packed, lora_config(peft.LoraConfig(
            r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)))
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]
    assert isinstance(_adapted(lora).base_layer, NVFP4PackedLinear)
    ids = data[0][0]["input_ids"][None].repeat(2, 1)
    for model in (master, lora):
        model.train()
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(len(n)))
    losses = [m(input_ids=ids, labels=ids).loss for m in (master, lora)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad}
             for m in (master, lora)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * len(TARGETS) * 2
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name

    save_packed(trained, tmp_path / "packed", dtype=None)
    base = load_packed(tmp_path / "packed")
    torch.manual_seed(1)
    model = peft.get_peft_model(base, lora_config(peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)))
    args = NVFP4TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3,
        learning_rate=3e-3, report_to=[], use_cpu=True, seed=0, save_strategy="no",
        disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    NVFP4Trainer(model=model, args=args, train_dataset=data[0]).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(".lora_" in n for n in changed)
    model.save_pretrained(tmp_path / "adapter")
    again = load_adapter(load_packed(tmp_path / "packed"), tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(RuntimeError, match="cannot merge a LoRA adapter into NVFP4PackedLinear"):
        model.merge_and_unload()


def test_lora_refuses_what_a_packed_base_cannot_do_and_merges_gpt2_transposed(tmp_path, data):
    """A packed base takes no weight-rewriting initialization (PiSSA) and trains only with
    adapters; GPT-2's NVFP4Conv1D ([in, out] weight) registered through lora_config merges
    B A transposed, as PEFT merges transformers' Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_nvfp4 import NVFP4Conv1D
    from hf_nvfp4.checkpoint import load_packed, pack_model, save_packed
    from hf_nvfp4.lora import lora_config

    trained = _llama()
    hf_nvfp4.convert(trained, ALL_BLOCKS, verbose=False)
    save_packed(trained, tmp_path / "packed", dtype=None)
    packed = pack_model(trained)
    with pytest.raises(ValueError, match="init_lora_weights='pissa' rewrites the base weight"):
        peft.get_peft_model(packed, lora_config(peft.LoraConfig(
            r=16, target_modules=TARGETS, init_lora_weights="pissa")))
    args = NVFP4TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, report_to=[],
                                  use_cpu=True, disable_tqdm=True)
    with pytest.raises(ValueError, match="purely quantized"):  # transformers' own check
        NVFP4Trainer(model=load_packed(tmp_path / "packed"), args=args,
                     train_dataset=data[0]).train()

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256,
                                      n_positions=64))
    hf_nvfp4.convert(gpt2, ALL_BLOCKS, verbose=False)
    model = peft.get_peft_model(gpt2, lora_config(peft.LoraConfig(
        r=16, target_modules=["c_attn", "c_proj"], lora_dropout=0.0)))
    for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_proj"):
        adapted = model.get_submodule(f"base_model.model.transformer.h.0.{layer}")
        assert isinstance(adapted.base_layer, NVFP4Conv1D) and adapted.fan_in_fan_out, layer
        with torch.no_grad():
            adapted.lora_B["default"].weight.normal_()
    adapted = model.get_submodule("base_model.model.transformer.h.0.attn.c_proj")  # square
    weight = adapted.base_layer.weight.detach().clone()  # [in, out]
    delta = (adapted.lora_B["default"].weight @ adapted.lora_A["default"].weight).detach()
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged.transformer.h[0].attn.c_proj.weight.detach(),
                               weight + adapted.scaling["default"] * delta.t())


def test_packed_weights_are_left_out_of_ddp_broadcasts(tmp_path):
    """DDP would broadcast a packed model's weights (buffers; the FP8 scales fail on gloo):
    exclude_packed_from_ddp lists every packed buffer in the attribute DDP reads, keeps what
    was listed, and hf_nvfp4.Trainer applies it to its (PEFT) model."""
    from hf_nvfp4.checkpoint import exclude_packed_from_ddp, load_packed, save_packed
    from hf_nvfp4.lora import lora_config

    trained = _llama()
    hf_nvfp4.convert(trained, ALL_BLOCKS, verbose=False)
    save_packed(trained, tmp_path / "packed", dtype=None)
    model = load_packed(tmp_path / "packed")
    model._ddp_params_and_buffers_to_ignore = ["lm_head.weight"]
    names = exclude_packed_from_ddp(model)
    assert len(names) == 3 * 14  # codes, block scales, global scale of 14 linears
    assert set(model._ddp_params_and_buffers_to_ignore) == {"lm_head.weight", *names}
    buffers = dict(model.named_buffers())
    assert all(buffers[n].dtype in (torch.uint8, torch.float8_e4m3fn, torch.float32)
               for n in names)
    lora = peft.get_peft_model(load_packed(tmp_path / "packed"), lora_config(peft.LoraConfig(
        r=16, target_modules=TARGETS, lora_dropout=0.0)))
    args = NVFP4TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, report_to=[],
                                  use_cpu=True, disable_tqdm=True)
    NVFP4Trainer(model=lora, args=args)
    ignored = set(lora._ddp_params_and_buffers_to_ignore)
    assert len(ignored) == 3 * 14 and all(n in dict(lora.named_buffers()) for n in ignored)


def test_lora_on_a_packed_model_under_two_process_ddp(tmp_path, launch):
    """Two ranks (gloo, CPU) train LoRA on a packed model through hf_nvfp4.Trainer: the packed
    weights stay out of DDP's broadcasts and both ranks end with the same adapters."""
    import json
    from pathlib import Path

    from hf_nvfp4.checkpoint import save_packed

    trained = _llama()
    hf_nvfp4.convert(trained, ALL_BLOCKS, verbose=False)
    save_packed(trained, tmp_path / "packed", dtype=None)
    proc = launch([Path(__file__).with_name("peft_ddp_worker.py"), tmp_path / "packed",
                   tmp_path / "out"])
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and len(ranks[0]["losses"]) == 3
    assert ranks[0]["adapters"] == ranks[1]["adapters"]  # DDP kept the replicas equal
    assert len(ranks[0]["adapters"]) == 2 * len(TARGETS) * 2
