"""MoE experts in packed checkpoints and in the compressed-tensors / ModelOpt exports."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_nvfp4
from hf_nvfp4.checkpoint import (
    export_compressed_tensors,
    export_modelopt,
    load_packed,
    pack_model,
    save_packed,
)
from hf_nvfp4.checkpoint.experts import PACKED_IMPLEMENTATION, is_packed_experts
from hf_nvfp4.experts import is_experts_module, iter_nvfp4_experts
from hf_nvfp4.numerics import quantize

from .conftest import checkpoint_tensors

# Tiny MoE models (those of tests/test_experts.py, plus Mixtral): 4 experts, top 2.
CONFIGS = {
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=64,
                      moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                      vocab_size=128, head_dim=16),
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=64, intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=4, num_experts_per_tok=2, vocab_size=128, head_dim=16),
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=4, num_experts_per_tok=2, vocab_size=128, head_dim=16),
    # Llama 4's experts: no ExpertsInterface, a bmm over equal row slices, [E, in, out]
    "llama4_text": dict(model_type="llama4_text", hidden_size=64, intermediate_size=32,
                        intermediate_size_mlp=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, num_local_experts=4,
                        num_experts_per_tok=1, vocab_size=128, interleave_moe_layer_step=1),
    # DeepSeek V4: its attention's grouped o_a_proj (2 groups of [32, 32]) besides the experts
    "deepseek_v4": dict(model_type="deepseek_v4", vocab_size=128, hidden_size=64,
                        moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, q_lora_rank=32, n_routed_experts=4,
                        num_experts_per_tok=2, o_groups=2, o_lora_rank=32, sliding_window=8,
                        max_position_embeddings=128,
                        layer_types=["heavily_compressed_attention",
                                     "compressed_sparse_attention"],
                        mlp_layer_types=["hash_moe", "moe"]),
    # JetMoE's parallel experts: one projection per module, weight [E, out, in]
    "jetmoe": dict(model_type="jetmoe", hidden_size=64, intermediate_size=32,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   kv_channels=16, num_local_experts=4, num_experts_per_tok=2,
                   vocab_size=128),
    # Inkling: shared experts (gate/up/down [E, out, in], every token) besides routed ones
    "inkling_text": dict(model_type="inkling_text", hidden_size=64, intermediate_size=64,
                         moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4,
                         swa_num_key_value_heads=2, swa_head_dim=16, d_rel=16, rel_extent=64,
                         n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2,
                         vocab_size=128),
}
ALL_NVFP4 = {"first_bf16_blocks": 0, "last_bf16_blocks": 0, "backend": "reference"}
# Checkpoint names per expert e of layer L: (gate, up, down), as vLLM's expert mapping reads.
NAMES = {
    "qwen3_moe": ("model.layers.{L}.mlp.experts.{e}.gate_proj",
                  "model.layers.{L}.mlp.experts.{e}.up_proj",
                  "model.layers.{L}.mlp.experts.{e}.down_proj"),
    "mixtral": ("model.layers.{L}.block_sparse_moe.experts.{e}.w1",
                "model.layers.{L}.block_sparse_moe.experts.{e}.w3",
                "model.layers.{L}.block_sparse_moe.experts.{e}.w2"),
}


def _moe(kind: str, convert: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIGS[kind]))
    hf_nvfp4.convert(model, convert or ALL_NVFP4, verbose=False)
    return model.eval()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _expert_matrices(module) -> dict[str, torch.Tensor]:
    """The [E, out, in] GEMM matrices of gate_up and down, as the forward multiplies them."""
    return {"gate_up_proj": module.gate_up_proj.detach(), "down_proj": module.down_proj.detach()}


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def test_packed_layout_is_each_experts_quantization(tmp_path):
    model = _moe("qwen3_moe")
    save_packed(model, tmp_path / "ckpt")
    t = checkpoint_tensors(tmp_path / "ckpt")
    experts = dict(iter_nvfp4_experts(model))
    assert len(experts) == 2
    for name, mod in experts.items():
        assert f"{name}.gate_up_proj" not in t and f"{name}.sr_state" not in t
        for p, w in _expert_matrices(mod).items():
            num, out, inp = w.shape
            assert t[f"{name}.{p}_packed"].dtype == torch.uint8
            assert t[f"{name}.{p}_packed"].shape == (num, out, inp // 2)
            assert t[f"{name}.{p}_scale"].dtype == torch.float8_e4m3fn
            assert t[f"{name}.{p}_scale"].shape == (num, out, inp // 16)
            assert t[f"{name}.{p}_global_scale"].dtype == torch.float32
            assert t[f"{name}.{p}_global_scale"].shape == (num,)
            for e in range(num):
                q = quantize(w[e], tile=(16, 16))
                assert torch.equal(t[f"{name}.{p}_packed"][e], q.data)
                assert torch.equal(_bits(t[f"{name}.{p}_scale"][e]), _bits(q.scale))
                assert torch.equal(t[f"{name}.{p}_global_scale"][e], q.global_scale.reshape(()))


def test_packed_round_trip_gives_equal_logits_and_same_bytes(tmp_path, tokens):
    model = _moe("qwen3_moe")
    save_packed(model, tmp_path / "ckpt", dtype=None)
    loaded = load_packed(tmp_path / "ckpt")
    experts = [m for m in loaded.modules() if is_packed_experts(m)]
    assert len(experts) == 2
    assert all(m.config._experts_implementation == PACKED_IMPLEMENTATION for m in experts)
    assert not any(isinstance(b, torch.nn.Parameter) and b.dim() == 3
                   for m in experts for b in m.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    save_packed(loaded, tmp_path / "again", dtype=None)
    a, b = checkpoint_tensors(tmp_path / "ckpt"), checkpoint_tensors(tmp_path / "again")
    assert a.keys() == b.keys()
    assert all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


def test_pack_model_packs_experts_in_memory(tokens):
    model = _moe("qwen3_moe")
    with torch.no_grad():
        want = model(tokens).logits
    pack_model(model)
    assert sum(is_packed_experts(m) for m in model.modules()) == 2
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, want)


def test_train_mode_resumes_exactly_from_masters(tmp_path, tokens):
    model = _moe("qwen3_moe")
    model.train()
    model(input_ids=tokens, labels=tokens).loss.backward()  # advances the experts' SR state
    model.eval()
    save_packed(model, tmp_path / "ckpt", dtype=None, masters=True)
    resumed = load_packed(tmp_path / "ckpt", mode="train")
    pairs = list(zip(dict(iter_nvfp4_experts(resumed)).values(),
                     dict(iter_nvfp4_experts(model)).values(), strict=True))
    assert len(pairs) == 2
    for got, want in pairs:
        assert torch.equal(got.gate_up_proj, want.gate_up_proj)
        assert torch.equal(got.sr_state, want.sr_state) and int(got.sr_state[1]) == 1
        assert got.config._experts_implementation == "hf_nvfp4"
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(resumed(tokens).logits, model(tokens).logits)


def test_train_mode_without_masters_starts_from_the_dequantized_experts(tmp_path, tokens):
    model = _moe("qwen3_moe")
    save_packed(model, tmp_path / "ckpt", dtype=None)
    trainable = load_packed(tmp_path / "ckpt", mode="train")
    experts = dict(iter_nvfp4_experts(trainable))
    assert len(experts) == 2 and not any(is_packed_experts(m) for m in trainable.modules())
    for name, mod in dict(iter_nvfp4_experts(model)).items():
        want = quantize(mod.down_proj.detach()[1], tile=(16, 16)).dequantize()
        assert torch.equal(experts[name].down_proj[1].detach(), want)
    trainable.train()
    trainable(input_ids=tokens, labels=tokens).loss.backward()
    assert all(m.down_proj.grad is not None for m in experts.values())


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_exports_write_each_expert_under_its_checkpoint_names(kind, fmt, tmp_path):
    model = _moe(kind)
    export = export_compressed_tensors if fmt == "compressed-tensors" else export_modelopt
    export(model, tmp_path / "out", weight_only=True)
    t = checkpoint_tensors(tmp_path / "out")
    codes, scale2 = ("weight_packed", None) if fmt == "compressed-tensors" else (
        "weight", "weight_scale_2")
    layers = [n for n, _ in iter_nvfp4_experts(model)]
    assert [int(n.split(".")[2]) for n in layers] == [0, 1]
    for layer_index, name in enumerate(layers):
        mats = _expert_matrices(model.get_submodule(name))
        half = mats["gate_up_proj"].shape[1] // 2
        for e in range(mats["down_proj"].shape[0]):
            gate, up, down = (n.format(L=layer_index, e=e) for n in NAMES[kind])
            q_gate_up = quantize(mats["gate_up_proj"][e], tile=(16, 16))
            q_down = quantize(mats["down_proj"][e], tile=(16, 16))
            for lin, q, rows in ((gate, q_gate_up, slice(0, half)),
                                 (up, q_gate_up, slice(half, None)),
                                 (down, q_down, slice(None))):
                assert t[f"{lin}.{codes}"].dtype == torch.uint8
                assert torch.equal(t[f"{lin}.{codes}"], q.data[rows])
                assert t[f"{lin}.weight_scale"].dtype == torch.float8_e4m3fn
                assert torch.equal(_bits(t[f"{lin}.weight_scale"]), _bits(q.scale[rows]))
                if scale2 is None:  # compressed-tensors: the ENCODE scale, [1]
                    enc = t[f"{lin}.weight_global_scale"]
                    assert enc.shape == (1,) and enc.dtype == torch.float32
                    assert torch.equal(1.0 / enc, q.global_scale.reshape(1))
                else:  # ModelOpt: the DECODE scale, 0-dim
                    assert torch.equal(t[f"{lin}.{scale2}"], q.global_scale.reshape(()))
            # gate and up share one global scale, as vLLM's fused w13 needs
            key = "weight_global_scale" if scale2 is None else scale2
            assert torch.equal(t[f"{gate}.{key}"], t[f"{up}.{key}"])
    assert not any("gate_up_proj" in k or k.endswith(".experts.down_proj") or "sr_state" in k
                   for k in t)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    ignored = cfg.get("ignore") or cfg["quantization"]["exclude_modules"]
    router = "block_sparse_moe.gate" if kind == "mixtral" else "mlp.gate"
    assert f"model.layers.0.{router}" in ignored and f"model.layers.0.{router}.weight" in t


def test_compressed_tensors_decompresses_experts_to_our_weights(tmp_path):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    assert ct is not None
    model = _moe("qwen3_moe")
    export_compressed_tensors(model, tmp_path / "out", weight_only=True)
    t = checkpoint_tensors(tmp_path / "out")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    mod = model.get_submodule("model.layers.1.mlp.experts")
    for e in range(mod.down_proj.shape[0]):
        lin = f"model.layers.1.mlp.experts.{e}.down_proj"
        local = {k.rpartition(".")[2]: v for k, v in t.items() if k.rpartition(".")[0] == lin}
        dense = NVFP4PackedCompressor.decompress(local, scheme)["weight"]
        want = quantize(mod.down_proj.detach()[e], tile=(16, 16)).dequantize()
        torch.testing.assert_close(dense.float(), want, rtol=2**-8, atol=0)


def test_exports_refuse_what_they_cannot_lay_out(tmp_path):
    gpt_oss = _moe("gpt_oss")  # [E, in, out] experts with biases: no per-expert mapping
    with pytest.raises(ValueError, match=r"experts module 'model\.layers\.0\.mlp\.experts'"):
        export_compressed_tensors(gpt_oss, tmp_path / "a", weight_only=True)
    partly = _moe("qwen3_moe", dict(ALL_NVFP4, first_bf16_blocks=1))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.experts'.*high precision"):
        export_modelopt(partly, tmp_path / "b", weight_only=True)
    model = _moe("qwen3_moe")
    with pytest.raises(ValueError, match="input amax of each expert"):
        export_modelopt(model, tmp_path / "c", input_amax={})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_gpt_oss_packed_round_trip(tmp_path, tokens):
    """Transposed [E, in, out] experts with biases: packed as [E, out, in] GEMM matrices."""
    model = _moe("gpt_oss")
    assert any(is_experts_module(m) and m.is_transposed for m in model.modules())
    save_packed(model, tmp_path / "ckpt", dtype=None)
    loaded = load_packed(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_llama4_batched_experts_packed_round_trip_and_train_mode(tmp_path, tokens):
    """Llama4TextExperts ([E, in, out], forward bound on the instance): packed as [E, out, in]
    GEMM matrices, loaded packed with equal logits, and back to trainable experts."""
    from hf_nvfp4.experts import current_implementation

    model = _moe("llama4_text")
    save_packed(model, tmp_path / "ckpt", dtype=None)
    t = checkpoint_tensors(tmp_path / "ckpt")
    name, mod = next(iter(iter_nvfp4_experts(model)))
    w = mod.gate_up_proj.detach()[2].t()  # expert 2's [out, in] GEMM matrix
    q = quantize(w, tile=(16, 16))
    assert torch.equal(t[f"{name}.gate_up_proj_packed"][2], q.data)
    assert torch.equal(_bits(t[f"{name}.gate_up_proj_scale"][2]), _bits(q.scale))
    loaded = load_packed(tmp_path / "ckpt")
    experts = [m for m in loaded.modules() if is_packed_experts(m)]
    assert len(experts) == 2
    assert all(current_implementation(m) == PACKED_IMPLEMENTATION for m in experts)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    trainable = load_packed(tmp_path / "ckpt", mode="train")
    again = dict(iter_nvfp4_experts(trainable))
    assert len(again) == 2 and current_implementation(again[name]) == "hf_nvfp4"
    assert torch.equal(again[name].gate_up_proj[2].detach().t(), q.dequantize())
    trainable.train()
    trainable(input_ids=tokens, labels=tokens).loss.backward()
    assert again[name].gate_up_proj.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.feed_forward\.experts'"):
        export_compressed_tensors(model, tmp_path / "export", weight_only=True)


def _reload(path, model, tokens, name: str):
    """``load_packed(path)``: its experts ``name`` run the packed implementation and the model
    gives ``model``'s logits; with ``mode="train"`` they are trainable NVFP4 experts again.
    Returns the packed experts, the trainable model and its experts (by name)."""
    from hf_nvfp4.experts import current_implementation

    loaded = load_packed(path)
    packed = {n: m for n, m in loaded.named_modules() if is_packed_experts(m)}
    assert current_implementation(packed[name]) == PACKED_IMPLEMENTATION
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    trainable = load_packed(path, mode="train")
    again = dict(iter_nvfp4_experts(trainable))
    assert current_implementation(again[name]) == "hf_nvfp4"
    return packed, trainable, again


def test_jetmoe_parallel_experts_packed_round_trip_and_train_mode(tmp_path, tokens):
    """JetMoeParallelExperts (packed as ``weight_packed`` [E, out, in/2], told from a packed
    linear's 2D one by its rank): loaded packed with equal logits, back to trainable experts;
    exports refuse them (transformers has no per-expert names for JetMoE)."""
    model = _moe("jetmoe")
    save_packed(model, tmp_path / "ckpt", dtype=None)
    t = checkpoint_tensors(tmp_path / "ckpt")
    experts = dict(iter_nvfp4_experts(model))
    assert len(experts) == 8  # per block: the MoE's and the attention's input and output
    name = "model.layers.1.mlp.output_linear"
    q = quantize(experts[name].weight.detach()[3], tile=(16, 16))
    assert t[f"{name}.weight_packed"].shape == (4, 64, 16)
    assert torch.equal(t[f"{name}.weight_packed"][3], q.data)
    assert torch.equal(_bits(t[f"{name}.weight_scale"][3]), _bits(q.scale))
    assert f"{name}.weight" not in t and f"{name}.sr_state" not in t
    packed, trainable, again = _reload(tmp_path / "ckpt", model, tokens, name)
    assert len(packed) == 8 and len(again) == 8
    assert torch.equal(again[name].weight[3].detach(), q.dequantize())
    trainable.train()
    trainable(input_ids=tokens, labels=tokens).loss.backward()
    assert again[name].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.input_linear\.weight'.*"
                                         "no per-expert checkpoint names for JetMoe"):
        export_compressed_tensors(model, tmp_path / "export", weight_only=True)


def test_inkling_shared_experts_packed_round_trip_and_train_mode(tmp_path, tokens):
    """InklingSharedExperts (three 3D parameters, the forward set on the instance): each
    packed as [E, out, in/2], loaded packed with equal logits, back to trainable experts;
    exports refuse the model (transformers has no per-expert names for Inkling's experts)."""
    model = _moe("inkling_text")
    save_packed(model, tmp_path / "ckpt", dtype=None)
    t = checkpoint_tensors(tmp_path / "ckpt")
    name = "model.layers.1.mlp.shared_experts"
    shared = model.get_submodule(name)
    for p, shape in (("gate_proj", (2, 32, 32)), ("up_proj", (2, 32, 32)),
                     ("down_proj", (2, 64, 16))):
        q = quantize(getattr(shared, p).detach()[1], tile=(16, 16))
        assert t[f"{name}.{p}_packed"].shape == shape, p
        assert torch.equal(t[f"{name}.{p}_packed"][1], q.data), p
        assert torch.equal(_bits(t[f"{name}.{p}_scale"][1]), _bits(q.scale)), p
        assert f"{name}.{p}" not in t
    packed, trainable, again = _reload(tmp_path / "ckpt", model, tokens, name)
    assert sorted(packed) == sorted(again) == [f"model.layers.{i}.mlp.{m}" for i in (0, 1)
                                               for m in ("experts", "shared_experts")]
    q = quantize(shared.down_proj.detach()[0], tile=(16, 16))
    assert torch.equal(again[name].down_proj[0].detach(), q.dequantize())
    trainable.train()
    trainable(input_ids=tokens, labels=tokens).loss.backward()
    assert again[name].gate_proj.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no per-expert checkpoint names for InklingFor"):
        export_compressed_tensors(model, tmp_path / "export", weight_only=True)


def test_dtype_conversions_move_packed_scales_without_rounding_them(tmp_path, tokens):
    """``model.to(torch.bfloat16)`` / ``.half()`` of a packed model converts its high-precision
    tensors but keeps every packed scale's dtype and bits (dense layers and experts), so each
    packed GEMM is unchanged; a deep copy of packed experts keeps the behaviour for itself."""
    import copy

    from hf_nvfp4.nn.packed import SCALE_BUFFERS, NVFP4PackedLinear

    model = pack_model(_moe("qwen3_moe"))
    experts = [m for m in model.modules() if is_packed_experts(m)]
    linears = [m for m in model.modules() if isinstance(m, NVFP4PackedLinear)]
    assert len(experts) == 2 and linears
    scales = {n: t.clone() for n, t in model.named_buffers()
              if n.endswith(("_scale", "_global_scale"))}
    assert len(scales) == 2 * len(linears) + 4 * len(experts)
    x = torch.randn(20, 64).bfloat16()
    lin = linears[0]
    with torch.no_grad():
        before = lin(x)
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.half(),
                    lambda m: copy.deepcopy(m).float()):
        converted = convert(model)
        for name, t in converted.named_buffers():
            if name in scales:
                assert t.dtype == scales[name].dtype, name
                assert torch.equal(_bits(t), _bits(scales[name])), name
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert all(getattr(lin, n).dtype != torch.float16 for n in SCALE_BUFFERS)
    assert lin.weight.dtype == torch.float16  # follows the conversions, as a Linear's would
    assert torch.equal(lin.weight, lin.dequantize_weight(torch.float32).half())
    with torch.no_grad():
        assert torch.equal(lin(x), before)
    twin = copy.deepcopy(experts[0])
    twin.to(torch.bfloat16)
    assert twin.down_proj_global_scale.dtype == torch.float32
    assert twin._apply.module is twin and experts[0]._apply.module is experts[0]
    torch.save(experts[0], tmp_path / "experts.pt")
    loaded = torch.load(tmp_path / "experts.pt", weights_only=False).to(torch.bfloat16)
    assert loaded.gate_up_proj_scale.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("kind", ["jetmoe", "qwen3_moe", "inkling_text"])
def test_inspect_reports_the_2d_layers_of_a_packed_moe_checkpoint(kind, tmp_path):
    """``inspect`` lists the packed linears (a JetMoE experts ``weight_packed`` is 3D: not one
    of them) and counts the model's BF16 bytes, experts at two bytes a weight, with every
    tensor the high-precision model saves (Inkling's routers: a 2D weight, a scale parameter
    and a bias buffer); a training checkpoint's stochastic-rounding state is not one."""
    from hf_nvfp4.checkpoint.inspect import inspect_checkpoint
    from hf_nvfp4.nn.packed import NVFP4PackedLinear

    model = _moe(kind)
    model.save_pretrained(tmp_path / "master")  # the training checkpoint, sr_state included
    save_packed(model, tmp_path / "ckpt", dtype=None, masters=True)
    report = inspect_checkpoint(tmp_path / "ckpt")
    packed = pack_model(model)
    linears = {n for n, m in packed.named_modules() if isinstance(m, NVFP4PackedLinear)}
    assert {r.name for r in report.layers if r.format == "nvfp4"} == linears
    assert all(r.snr_db > 15 for r in report.layers if r.format == "nvfp4")
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIGS[kind]))
    plain.save_pretrained(tmp_path / "plain")
    saved = checkpoint_tensors(tmp_path / "plain")
    assert report.bf16_bytes == 2 * sum(t.numel() for t in saved.values())
    assert inspect_checkpoint(tmp_path / "master").bf16_bytes == report.bf16_bytes


def test_deepseek_v4_grouped_linear_packed_round_trip_and_train_mode(tmp_path, tokens):
    """DeepSeek V4's grouped o_a_proj (an nn.Linear [G * out, in]) packs per group as
    [G, out, in/2], loads packed with equal logits, and goes back to its Linear weight."""
    from hf_nvfp4.experts import current_implementation, is_grouped_linear

    model = _moe("deepseek_v4")
    name = "model.layers.1.self_attn.o_a_proj"
    grouped = dict(iter_nvfp4_experts(model))[name]
    assert is_grouped_linear(grouped)
    save_packed(model, tmp_path / "ckpt", dtype=None)
    t = checkpoint_tensors(tmp_path / "ckpt")
    q = quantize(grouped.weight.detach()[32:], tile=(16, 16))  # group 1
    assert t[f"{name}.weight_packed"].shape == (2, 32, 16)
    assert torch.equal(t[f"{name}.weight_packed"][1], q.data)
    assert torch.equal(_bits(t[f"{name}.weight_scale"][1]), _bits(q.scale))
    loaded = load_packed(tmp_path / "ckpt")
    assert current_implementation(loaded.get_submodule(name)) == PACKED_IMPLEMENTATION
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    trainable = load_packed(tmp_path / "ckpt", mode="train")
    again = trainable.get_submodule(name)
    assert current_implementation(again) == "hf_nvfp4" and again.weight.shape == (64, 32)
    assert torch.equal(again.weight[32:].detach(), q.dequantize())
    trainable.train()
    trainable(input_ids=tokens, labels=tokens).loss.backward()
    assert again.weight.grad.abs().sum() > 0


def test_deepseek_v4_exports_with_its_grouped_linear_kept_high_precision(tmp_path):
    """An export refuses an NVFP4 grouped o_a_proj by name (one global scale per group); kept
    in high precision it is a plain weight and the model exports."""
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.o_a_proj' "
                                         r"\(DeepseekV4GroupedLinear\).*exclude=\['o_a_proj'\]"):
        export_compressed_tensors(_moe("deepseek_v4"), tmp_path / "a", weight_only=True)
    model = _moe("deepseek_v4", {**ALL_NVFP4, "exclude": ["o_a_proj"]})
    export_compressed_tensors(model, tmp_path / "b", weight_only=True)
    t = checkpoint_tensors(tmp_path / "b")
    kept = [k for k in t if "wo_a" in k or "o_a_proj" in k]
    assert kept and all(t[k].dtype != torch.uint8 for k in kept)


def test_packed_experts_refuse_gradients_instead_of_inventing_them(tmp_path, tokens):
    """Packed experts have no input gradient of their own (their GEMMs are inference ops):
    a forward that wants one is refused with the way out, not answered with zeros."""
    model = pack_model(_moe("qwen3_moe"))
    embeds = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"packed NVFP4 experts are inference only.*"
                                           "mode='train'"):
        model(inputs_embeds=embeds)
    with torch.no_grad():
        assert torch.isfinite(model(inputs_embeds=embeds).logits).all()


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_exports_from_a_packed_checkpoint_equal_exports_from_the_model(kind, tmp_path):
    """A packed checkpoint holds the fused experts, so loading it records no weight
    conversion; its exports must still write each expert under the hub's names, with the
    same tensors as the export of the model it was saved from."""
    model = _moe(kind)
    save_packed(model, tmp_path / "packed", dtype=None)
    loaded = load_packed(tmp_path / "packed")
    assert getattr(loaded, "_weight_conversions", None) == []  # the case under test
    for export, fmt in ((export_compressed_tensors, "ct"), (export_modelopt, "mo")):
        # unfused: a fused group's members would be re-quantized from a packed checkpoint
        export(model, tmp_path / f"{fmt}_model", weight_only=True, fuse_global_scales=False)
        export(loaded, tmp_path / f"{fmt}_packed", weight_only=True, fuse_global_scales=False)
        want = checkpoint_tensors(tmp_path / f"{fmt}_model")
        got = checkpoint_tensors(tmp_path / f"{fmt}_packed")
        assert sorted(got) == sorted(want)
        gate = NAMES[kind][0].format(L=0, e=1)
        assert any(k.startswith(gate + ".") for k in got)
        for k, t in want.items():
            if k.endswith("weight_global_scale"):  # the encode scale: the same decode scale
                assert torch.equal(1.0 / got[k], 1.0 / t), k  # (module docstring)
            else:
                assert torch.equal(_bits(got[k]), _bits(t)), (fmt, k)
