"""NVFP4 MoE experts (transformers' ExpertsInterface) against per-expert compositions."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_nvfp4.experts import (
    IMPLEMENTATION,
    ExpertsQuantization,
    convert_experts_module,
    expert_shapes,
    is_experts_module,
    unsupported_reason,
)
from hf_nvfp4.nn.functional import LinearPlan, quantized_linear
from hf_nvfp4.numerics import quantize
from hf_nvfp4.numerics.rng import derive_keys
from hf_nvfp4.recipe import PRESETS

E, TOP_K, H = 4, 2, 64
CONFIGS = {
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=H, intermediate_size=64,
                      moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=E, num_experts_per_tok=TOP_K,
                      vocab_size=128, head_dim=16),
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=H, intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=E, num_experts_per_tok=TOP_K, vocab_size=128,
                    head_dim=16),
}


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIGS[kind]))


def _experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if is_experts_module(m)]


def _routing(tokens: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(tokens)])
    idx[idx == E - 1] = 0  # expert E-1 gets no token: its GEMMs are skipped
    idx[:, 1] = torch.where(idx[:, 0] == idx[:, 1], (idx[:, 0] + 1) % (E - 1), idx[:, 1])
    weights = torch.softmax(torch.randn(tokens, TOP_K, generator=g), dim=-1)
    return idx, weights


def _gemm(a, b):
    out = a.block_values() @ b.block_values().T
    return (out * (a.global_scale * b.global_scale))[: a.shape[0], : b.shape[0]]


def _matrix(module, name, e):
    w = getattr(module, name)[e]
    return w.t() if getattr(module, "is_transposed", False) else w


def _bias(module, name, e):
    return getattr(module, f"{name}_bias")[e] if module.has_bias else 0


def _tokens_of(idx: torch.Tensor, e: int) -> torch.Tensor:
    """Flattened (token, slot) positions routed to expert e, in the order the layer uses."""
    return (idx.reshape(-1) == e).nonzero().flatten()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_forward_equals_hand_built_per_expert_composition(kind):
    module = _experts(_model(kind))[0]
    assert module.down_proj.shape[0] == E and unsupported_reason(module) is None
    convert_experts_module(module, PRESETS["nvfp4"], "reference", sr_seed=3)
    module.eval()
    x = torch.randn(24, H)
    idx, weights = _routing(24)
    got = module(x, idx, weights)

    up = "gate_up_proj" if hasattr(module, "gate_up_proj") else "up_proj"
    want = torch.zeros(24 * TOP_K, H)
    for e in range(E - 1):
        pos = _tokens_of(idx, e)
        xe = x[pos // TOP_K]
        h = _gemm(quantize(xe, tile=(1, 16)), quantize(_matrix(module, up, e), tile=(16, 16)))
        h = module._apply_gate(h + _bias(module, up, e))
        y = _gemm(quantize(h, tile=(1, 16)),
                  quantize(_matrix(module, "down_proj", e), tile=(16, 16)))
        want[pos] = (y + _bias(module, "down_proj", e)) * weights.reshape(-1)[pos, None]
    want = want.view(24, TOP_K, H).sum(1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_grads_equal_per_expert_quantized_linears_with_their_key_streams(kind):
    module = _experts(_model(kind))[0]
    convert_experts_module(module, PRESETS["nvfp4"], "reference", sr_seed=11)
    module.train()
    x = torch.randn(40, H, requires_grad=True)
    idx, weights = _routing(40, seed=2)
    dy = torch.randn(40, H)
    module(x, idx, weights).backward(dy)
    assert int(module.sr_state[1]) == 1

    up = "gate_up_proj" if hasattr(module, "gate_up_proj") else "up_proj"
    params = {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters()}
    plan = LinearPlan(PRESETS["nvfp4"].role_specs(), "reference", share_input=False)
    keys = derive_keys(torch.tensor([11, 1]), torch.arange(2 * E), 2).view(2, E, 2)
    x2 = x.detach().clone().requires_grad_(True)
    out = torch.zeros(40 * TOP_K, H)
    for e in range(E - 1):
        pos = _tokens_of(idx, e)

        def lin(inp, name, stage, e=e):
            w = params[name][e]
            w = w.t() if getattr(module, "is_transposed", False) else w
            b = params[f"{name}_bias"][e] if module.has_bias else None
            return quantized_linear(inp, w, b, plan, keys[stage, e])

        h = module._apply_gate(lin(x2[pos // TOP_K], up, 0))
        out = out.index_put((pos,), lin(h, "down_proj", 1) * weights.reshape(-1)[pos, None])
    out.view(40, TOP_K, H).sum(1).backward(dy)

    assert torch.equal(x.grad, x2.grad)
    for name, p in module.named_parameters():
        assert torch.equal(p.grad, params[name].grad), name
        assert p.grad[E - 1].abs().sum() == 0  # the expert without tokens
        assert p.grad[: E - 1].abs().sum() > 0


def test_only_converted_modules_change_implementation():
    model = _model("qwen3_moe")
    first, second = _experts(model)
    before = first.config._experts_implementation
    convert_experts_module(second, PRESETS["nvfp4"], "reference", sr_seed=0)
    assert second.config._experts_implementation == IMPLEMENTATION
    assert first.config._experts_implementation == before
    assert model.config._experts_implementation == before
    assert [s[1:] for s in expert_shapes(second)] == [(64, 64), (32, 64)]  # (in, out)


def test_trains_and_stays_close_to_high_precision():
    model = _model("qwen3_moe")
    ref = _model("qwen3_moe")
    for m in _experts(model):
        convert_experts_module(m, PRESETS["nvfp4"], "reference", sr_seed=5)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w0 = _experts(model)[0].down_proj.detach().clone()
    losses = []
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(_experts(model)[0].down_proj, w0)
    with torch.no_grad():
        model.eval()
        ref_loss = ref(input_ids=ids, labels=ids).loss.item()
    assert abs(losses[0] - ref_loss) < 0.05 * ref_loss


def test_convert_puts_every_block_matmul_of_a_moe_model_in_nvfp4():
    import hf_nvfp4

    cfg = dict(CONFIGS["qwen3_moe"], num_experts=16, num_hidden_layers=3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    summary = hf_nvfp4.convert(model, {"first_bf16_blocks": 1, "last_bf16_blocks": 0,
                                       "backend": "reference"}, verbose=False)
    experts = _experts(model)
    assert [hasattr(m, "_hf_nvfp4") for m in experts] == [False, True, True]
    assert experts[0].config._experts_implementation != IMPLEMENTATION
    decisions = {d.name: d for d in summary.layers}
    assert decisions["model.layers.0.mlp.experts"].reason == "in the first 1 blocks (kept BF16)"
    assert decisions["model.layers.2.mlp.experts"].quantized
    quantized, total = summary.block_matmul_share()
    assert not summary.other_matmuls or all("Router" in d.name or "gate" in d.name
                                            for d in summary.other_matmuls)
    assert quantized / total > 0.99, summary.table()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and experts[2].down_proj.grad.abs().sum() > 0
    assert int(experts[2].sr_state[1]) == 1
    again = hf_nvfp4.convert(model, {"first_bf16_blocks": 1, "last_bf16_blocks": 0,
                                     "backend": "reference"}, verbose=False)
    assert {d.reason for d in again.layers if d.name.endswith("experts")} >= {
        "already NVFP4 experts"}


def test_from_pretrained_and_save_pretrained_round_trip(tmp_path):
    from hf_nvfp4 import NVFP4Config

    plain = _model("qwen3_moe")
    plain.save_pretrained(tmp_path / "plain")
    qcfg = NVFP4Config(first_bf16_blocks=0, last_bf16_blocks=0, backend="reference", sr_seed=9)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", quantization_config=qcfg)
    experts = _experts(model)
    assert all(m.config._experts_implementation == IMPLEMENTATION for m in experts)
    assert all(int(m.sr_state[1]) == 0 and not m.sr_state.is_meta for m in experts)
    for m, p in zip(experts, _experts(plain), strict=True):
        assert torch.equal(m.down_proj, p.down_proj)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.save_pretrained(tmp_path / "nvfp4")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nvfp4")
    assert all(hasattr(m, "_hf_nvfp4") for m in _experts(reloaded))
    assert [int(m.sr_state[1]) for m in _experts(reloaded)] == [1, 1]
    with torch.no_grad():
        model.eval()
        reloaded.eval()
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_fp8_block_experts_trace_whole_on_first_use(monkeypatch):
    """The experts' plan runs the backend's one-time checks (the FP8 GEMM's) before the
    quantized autograd.Function: the grouped FP8 GEMMs then trace whole under
    torch.compile(fullgraph=True) instead of failing on the check's side effect."""
    from hf_nvfp4.backends import fp8_gemm
    from hf_nvfp4.kernels import is_triton_available
    from hf_nvfp4.nn.grouped import quantized_grouped_linear
    from hf_nvfp4.recipe import get_recipe

    if not is_triton_available()[0]:
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(fp8_gemm, "_CHECKED", {})
    torch._dynamo.reset()
    quant = ExpertsQuantization(get_recipe("fp8_block"), "triton", None, 0)
    w = torch.randn(2, 128, 128, requires_grad=True)
    x = torch.randn(256, 128)

    plan = quant.plan(x.device)  # what the experts forward calls before the Function

    def step(x, w):
        return quantized_grouped_linear(x, w, None, [128, 128], plan)

    torch.compile(step, backend="aot_eager", fullgraph=True)(x, w).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    assert fp8_gemm._CHECKED  # the check ran, outside the traced Function


LLAMA4 = dict(model_type="llama4_text", hidden_size=H, intermediate_size=32,
              intermediate_size_mlp=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, num_local_experts=E, num_experts_per_tok=1,
              vocab_size=128, interleave_moe_layer_step=1)


def _llama4() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA4))


def _assert_trains_and_round_trips(build, name: str, param: str, tmp_path) -> None:
    """prepare_model (every block NVFP4), one training step (experts ``name`` get a gradient
    on ``param``, their SR state advances), then save_pretrained/from_pretrained: the same
    masters, SR state and logits."""
    import hf_nvfp4

    model = hf_nvfp4.prepare_model(build(), {"first_bf16_blocks": 0, "last_bf16_blocks": 0,
                                             "backend": "reference"})
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    experts = model.get_submodule(name)
    assert getattr(experts, param).grad.abs().sum() > 0 and int(experts.sr_state[1]) == 1
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    again = reloaded.get_submodule(name)
    assert torch.equal(getattr(again, param), getattr(experts, param))
    assert torch.equal(again.sr_state, experts.sr_state)
    with torch.no_grad():
        model.eval()
        reloaded.eval()
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_llama4_batched_experts_equal_per_expert_quantized_linears():
    """Llama4TextExperts (no ExpertsInterface: a bmm over E equal row slices, [E, in, out]
    weights): forward and every gradient equal E separate quantized linears per projection,
    each with its own key stream; the class forward comes back when unconverted."""
    from hf_nvfp4.experts import current_implementation, is_batched_experts, set_implementation

    module = _llama4().model.layers[0].feed_forward.experts
    assert is_experts_module(module) and is_batched_experts(module)
    assert expert_shapes(module) == [("gate_up_proj", H, 64), ("down_proj", 32, H)]
    convert_experts_module(module, PRESETS["nvfp4"], "reference", sr_seed=5)
    assert current_implementation(module) == IMPLEMENTATION
    module.train()
    t = 20  # rows per expert: not a multiple of 16
    x = torch.randn(E * t, H, requires_grad=True)
    dy = torch.randn(E * t, H)
    got = module(x)
    got.backward(dy)

    params = {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters()}
    plan = LinearPlan(PRESETS["nvfp4"].role_specs(), "reference", share_input=False)
    keys = derive_keys(torch.tensor([5, 1]), torch.arange(2 * E), 2).view(2, E, 2)
    x2 = x.detach().clone().requires_grad_(True)
    outs = []
    for e in range(E):
        rows = x2[e * t:(e + 1) * t]
        gate, up = quantized_linear(rows, params["gate_up_proj"][e].t(), None, plan,
                                    keys[0, e]).chunk(2, dim=-1)
        outs.append(quantized_linear(up * module.act_fn(gate), params["down_proj"][e].t(),
                                     None, plan, keys[1, e]))
    want = torch.cat(outs)
    want.backward(dy)
    assert torch.equal(got, want)
    assert torch.equal(x.grad, x2.grad)
    for name, p in module.named_parameters():
        assert torch.equal(p.grad, params[name].grad), name
    assert int(module.sr_state[1]) == 1
    with pytest.raises(ValueError, match="do not split into 4 equal expert slices"):
        module(torch.randn(E * t + 1, H))
    set_implementation(module, None)
    assert current_implementation(module) is None and "forward" not in module.__dict__


def test_llama4_converts_trains_and_round_trips(tmp_path):
    import hf_nvfp4

    model = _llama4()
    summary = hf_nvfp4.convert(model, {"first_bf16_blocks": 0, "last_bf16_blocks": 0,
                                       "backend": "reference"}, verbose=False)
    decisions = {d.name: d for d in summary.layers}
    assert decisions["model.layers.1.feed_forward.experts"].quantized
    quantized, total = summary.block_matmul_share()
    assert quantized / total > 0.99, summary.table()
    assert not summary.other_matmuls

    _assert_trains_and_round_trips(_llama4, "model.layers.1.feed_forward.experts",
                                   "gate_up_proj", tmp_path)


def test_llama4_converted_experts_pickle_copy_hook_and_subclass(tmp_path):
    """The instance forward of converted Llama 4 experts survives torch.save/load and
    deepcopy (the copy runs its own weights), sits under an accelerate hook added before
    conversion (the hook stays and calls it), and a subclass (FSDP2's swap) is recognized."""
    import copy

    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    from hf_nvfp4.experts import current_implementation, is_batched_experts, set_implementation

    module = _llama4().model.layers[0].feed_forward.experts
    convert_experts_module(module, PRESETS["nvfp4"], "reference", sr_seed=5)
    module.eval()
    x = torch.randn(E * 8, H)
    want = module(x)
    torch.save(module, tmp_path / "experts.pt")
    loaded = torch.load(tmp_path / "experts.pt", weights_only=False)
    assert current_implementation(loaded) == IMPLEMENTATION
    assert torch.equal(loaded(x), want)
    twin = copy.deepcopy(module)
    with torch.no_grad():
        twin.down_proj.mul_(2)
    assert torch.equal(module(x), want) and not torch.equal(twin(x), want)

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    hooked = _llama4().model.layers[0].feed_forward.experts
    add_hook_to_module(hooked, Count())
    convert_experts_module(hooked, PRESETS["nvfp4"], "reference", sr_seed=5)
    hooked.load_state_dict(module.state_dict())
    hooked.eval()
    assert current_implementation(hooked) == IMPLEMENTATION
    assert torch.equal(hooked(x), want) and Count.calls == 1
    set_implementation(hooked, None)
    assert current_implementation(hooked) is None
    remove_hook_from_module(hooked)
    assert not torch.equal(hooked(x), want)  # the BF16 class forward again

    sub = type("FSDPLlama4TextExperts", (type(module),), {})
    module.__class__ = sub
    assert is_batched_experts(module) and current_implementation(module) == IMPLEMENTATION
    assert torch.equal(module(x), want)


JETMOE = dict(model_type="jetmoe", hidden_size=H, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, kv_channels=16,
              num_local_experts=E, num_experts_per_tok=TOP_K, vocab_size=128)


def _jetmoe() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**JETMOE))


def test_jetmoe_parallel_experts_equal_per_expert_quantized_linears():
    """JetMoeParallelExperts (one projection of every expert, [E, out, in], rows sorted by
    expert with a count each): forward and every gradient equal E separate quantized linears,
    each with its own key stream; an empty expert and counts off the 16-row grid included."""
    from hf_nvfp4.experts import (
        current_implementation,
        is_parallel_experts,
        set_implementation,
    )

    module = _jetmoe().model.layers[0].mlp.input_linear
    assert is_experts_module(module) and is_parallel_experts(module)
    assert expert_shapes(module) == [("weight", H, 64)]
    convert_experts_module(module, PRESETS["nvfp4"], "reference", sr_seed=7)
    assert current_implementation(module) == IMPLEMENTATION
    module.train()
    sizes = [20, 0, 13, 35]
    x = torch.randn(sum(sizes), H, requires_grad=True)
    dy = torch.randn(sum(sizes), 64)
    got = module(x, sizes)
    got.backward(dy)

    w = module.weight.detach().clone().requires_grad_(True)
    plan = LinearPlan(PRESETS["nvfp4"].role_specs(), "reference", share_input=False)
    keys = derive_keys(torch.tensor([7, 1]), torch.arange(E), 2).view(1, E, 2)
    x2 = x.detach().clone().requires_grad_(True)
    outs = [quantized_linear(rows, w[e], None, plan, keys[0, e])
            for e, rows in enumerate(x2.split(sizes)) if sizes[e]]
    want = torch.cat(outs)
    want.backward(dy)
    assert torch.equal(got, want)
    assert torch.equal(x.grad, x2.grad) and torch.equal(module.weight.grad, w.grad)
    assert int(module.sr_state[1]) == 1
    with pytest.raises(ValueError, match=r"expert_size \[1, 2, 3, 4\] does not split 11 rows"):
        module(torch.randn(11, H), [1, 2, 3, 4])
    set_implementation(module, None)
    assert current_implementation(module) is None and "forward" not in module.__dict__


def test_jetmoe_converts_trains_and_round_trips(tmp_path):
    """Every JetMoE block matmul but the routers (4 outputs) runs NVFP4: the MoE's and the
    mixture-of-attention's parallel experts too; training and save_pretrained keep them."""
    import hf_nvfp4

    model = _jetmoe()
    summary = hf_nvfp4.convert(model, {"first_bf16_blocks": 0, "last_bf16_blocks": 0,
                                       "backend": "reference"}, verbose=False)
    decisions = {d.name: d for d in summary.layers}
    for name in ("mlp.input_linear", "mlp.output_linear", "self_attention.experts.input_linear",
                 "self_attention.experts.output_linear"):
        assert decisions[f"model.layers.1.{name}"].quantized, name
    quantized, total = summary.block_matmul_share()
    assert total - quantized == 2 * 2 * H * E, summary.table()  # the 4 routers [E, H]
    assert not summary.other_matmuls

    _assert_trains_and_round_trips(_jetmoe, "model.layers.1.mlp.output_linear", "weight",
                                   tmp_path)


def test_instance_forward_experts_return_the_autocast_dtype():
    """Under autocast with FP32 inputs, batched (Llama 4) and parallel (JetMoE) experts return
    the autocast dtype, as their classes' bmm and F.linear do, with equal values."""
    batched = _llama4().model.layers[0].feed_forward.experts
    parallel = _jetmoe().model.layers[0].mlp.input_linear
    x = torch.randn(E * 16, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        upstream = batched(x), parallel(x, [16] * E)
    for module in (batched, parallel):
        convert_experts_module(module, PRESETS["nvfp4"], "reference", sr_seed=0)
        module.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = batched(x), parallel(x, [16] * E)
    plain = batched(x.bfloat16()), parallel(x.bfloat16(), [16] * E)
    for ref, out, bf16 in zip(upstream, got, plain, strict=True):
        assert ref.dtype == out.dtype == torch.bfloat16
        assert torch.equal(out, bf16)


def test_deepseek_v4_grouped_linear_equals_per_group_quantized_linears():
    """DeepSeek V4's grouped o_a_proj (an nn.Linear: weight [G * out, in], group g's rows for
    x[..., g, :]): forward and every gradient equal G separate quantized linears, one key
    stream each, and the output keeps the class's [..., G, out] layout."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4GroupedLinear

    from hf_nvfp4.experts import current_implementation, is_grouped_linear

    torch.manual_seed(0)
    module = DeepseekV4GroupedLinear(32, 3 * 48, 3)
    assert is_experts_module(module) and is_grouped_linear(module)
    assert expert_shapes(module) == [("weight", 32, 48)]
    x = torch.randn(2, 7, 3, 32)
    upstream = module(x)
    convert_experts_module(module, PRESETS["nvfp4"], "reference", sr_seed=3)
    assert current_implementation(module) == IMPLEMENTATION
    module.train()
    x.requires_grad_(True)
    dy = torch.randn(2, 7, 3, 48)
    got = module(x)
    got.backward(dy)
    assert got.shape == upstream.shape == (2, 7, 3, 48)

    w = module.weight.detach().clone().requires_grad_(True)
    plan = LinearPlan(PRESETS["nvfp4"].role_specs(), "reference", share_input=False)
    keys = derive_keys(torch.tensor([3, 1]), torch.arange(3), 2).view(1, 3, 2)
    x2 = x.detach().clone().requires_grad_(True)
    want = torch.stack([quantized_linear(x2[:, :, g].reshape(14, 32), w[48 * g:48 * (g + 1)],
                                         None, plan, keys[0, g]).view(2, 7, 48)
                        for g in range(3)], dim=2)
    want.backward(dy)
    assert torch.equal(got, want)
    assert torch.equal(x.grad, x2.grad) and torch.equal(module.weight.grad, w.grad)
    assert (got - upstream).abs().max() < 0.25 * upstream.abs().max()
    with pytest.raises(ValueError, match=r"does not hold 3 groups"):
        module(torch.randn(4, 2, 32))


INKLING = dict(model_type="inkling_text", hidden_size=H, intermediate_size=64,
               moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4,
               swa_num_key_value_heads=2, swa_head_dim=16, d_rel=16, rel_extent=64,
               n_routed_experts=E, num_experts_per_tok=TOP_K, n_shared_experts=2,
               vocab_size=128)


def _inkling() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**INKLING))


def test_inkling_shared_experts_equal_per_expert_quantized_linears():
    """InklingSharedExperts (E dense gated MLPs every token visits, gate/up/down [E, out, in],
    outputs scaled by the router's gammas and summed in FP32): forward and every gradient equal
    3 E separate quantized linears, one key stream each, the class's keyword call included."""
    from hf_nvfp4.experts import (
        current_implementation,
        is_shared_experts,
        set_implementation,
    )

    module = _inkling().model.layers[0].mlp.shared_experts
    assert is_experts_module(module) and is_shared_experts(module)
    assert expert_shapes(module) == [("gate_proj", H, 32), ("up_proj", H, 32),
                                     ("down_proj", 32, H)]
    n = module.n_shared_experts
    x = torch.randn(2, 9, H)  # 18 tokens: not a multiple of 16
    gammas = torch.rand(2, 9, n)
    upstream = module(x, gammas=gammas)
    convert_experts_module(module, PRESETS["nvfp4"], "reference", sr_seed=11)
    assert current_implementation(module) == IMPLEMENTATION
    module.train()
    x.requires_grad_(True)
    gammas.requires_grad_(True)
    dy = torch.randn(2, 9, H)
    got = module(x, gammas=gammas)
    got.backward(dy)
    assert got.shape == upstream.shape and got.dtype == upstream.dtype

    params = {p: getattr(module, p).detach().clone().requires_grad_(True)
              for p in ("gate_proj", "up_proj", "down_proj")}
    plan = LinearPlan(PRESETS["nvfp4"].role_specs(), "reference", share_input=False)
    keys = derive_keys(torch.tensor([11, 1]), torch.arange(3 * n), 2).view(3, n, 2)
    x2 = x.detach().clone().requires_grad_(True)
    g2 = gammas.detach().clone().requires_grad_(True)
    rows = x2.reshape(18, H)
    outs = []
    for e in range(n):
        gate = quantized_linear(rows, params["gate_proj"][e], None, plan, keys[0, e])
        up = quantized_linear(rows, params["up_proj"][e], None, plan, keys[1, e])
        act = module.act_fn(gate) * up * g2.reshape(18, n)[:, e:e + 1]
        outs.append(quantized_linear(act, params["down_proj"][e], None, plan, keys[2, e]))
    want = torch.stack(outs).float().sum(dim=0).view(2, 9, H)
    want.backward(dy)
    assert torch.equal(got, want)
    for p, ref in params.items():
        assert torch.equal(getattr(module, p).grad, ref.grad), p
    # x feeds 2 n linears: its gradient is the same sum, accumulated in another order
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gammas.grad, g2.grad, rtol=1e-6, atol=1e-6)
    assert int(module.sr_state[1]) == 1
    assert (got - upstream).abs().max() < 0.25 * upstream.abs().max()
    with pytest.raises(ValueError, match=r"do not hold one value per token \(18\) and expert"):
        module(x, gammas=torch.rand(2, 9, n + 1))
    assert module(torch.randn(0, H), gammas=torch.rand(0, n)).shape == (0, H)  # as upstream
    set_implementation(module, None)
    assert current_implementation(module) is None and "forward" not in module.__dict__


def test_inkling_converts_trains_and_round_trips(tmp_path):
    """Every Inkling MoE block's shared experts run NVFP4 next to its routed experts; training
    and save_pretrained keep them."""
    import hf_nvfp4

    summary = hf_nvfp4.convert(_inkling(), {"first_bf16_blocks": 0, "last_bf16_blocks": 0,
                                            "backend": "reference"}, verbose=False)
    decisions = {d.name: d for d in summary.layers}
    for layer in (0, 1):
        for name in ("experts", "shared_experts"):
            assert decisions[f"model.layers.{layer}.mlp.{name}"].quantized, (layer, name)
    assert not any("shared_experts" in d.name for d in summary.other_matmuls)
    _assert_trains_and_round_trips(_inkling, "model.layers.1.mlp.shared_experts", "down_proj",
                                   tmp_path)


def test_copies_that_would_run_the_original_are_refused():
    """A DataParallel replica of ExpertsInterface experts refuses to train (its rounding
    state would not advance); a shallow copy of instance-forward experts shares the original's
    forward, so an input elsewhere than the original's tensors is refused with that reason."""
    experts = _experts(_model("qwen3_moe"))[0]
    convert_experts_module(experts, PRESETS["nvfp4"], "reference", sr_seed=0)
    # as torch.nn.parallel.replicate builds a replica: its parameters are non-leaf copies
    replica = experts._replicate_for_data_parallel()
    for name, param in experts._parameters.items():
        setattr(replica, name, None if param is None else param * 1)
    idx, w = _routing(5)
    with pytest.raises(RuntimeError, match=r"does not run under torch\.nn\.DataParallel"):
        replica.train()(torch.randn(5, H), idx, w)
    shared = _inkling().model.layers[0].mlp.shared_experts
    convert_experts_module(shared, PRESETS["nvfp4"], "reference", sr_seed=0)
    twin = shared._replicate_for_data_parallel()
    with pytest.raises(RuntimeError, match=r"tensors on cpu but got an input on meta: a "
                                           "shallow copy"):
        twin(torch.randn(5, H, device="meta"), gammas=torch.rand(5, 2, device="meta"))
