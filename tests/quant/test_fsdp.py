"""Quantized FSDP2 all-gather (hf_nvfp4.quant.fsdp): the hooks, the wrapped master weight and the
gathered codes, in one process. Two ranks under fully_shard: tests/integration/test_fsdp2.py."""

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from hf_nvfp4 import (
    LateSwitchCallback,
    NVFP4Config,
    NVFP4Linear,
    PrecisionSchedule,
    convert,
    quantization_disabled,
    switch_to_high_precision,
)
from hf_nvfp4.backends.base import BlockValues
from hf_nvfp4.kernels import is_triton_available
from hf_nvfp4.numerics.quantize import quantize, transpose_tiles
from hf_nvfp4.numerics.testing import assert_qtensor_equal
from hf_nvfp4.quant.fsdp import (
    GatheredWeight,
    ShardedWeight,
    _splits_into_tiles,
    gathered_weight,
    gathers_codes,
    wrap_weight,
)
from hf_nvfp4.recipe import get_recipe
from hf_nvfp4.telemetry import QuantProbe

NO_SR = {"preset": "nvfp4", "stochastic_rounding": False}
# the Triton path where Triton runs (compiled on a GPU, else the interpreter)
BACKENDS = ["reference", "triton"] if is_triton_available()[0] else ["reference"]


@pytest.mark.parametrize("fmt, tile, shape", [
    ("nvfp4", 16, (48, 80)), ("nvfp4", 16, (40, 24)), ("mxfp4", 32, (64, 96)),
    ("fp8_block", 128, (256, 384)),
])
def test_transpose_tiles_is_quantizing_the_transpose(fmt, tile, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 5
    w[:tile, :tile] = 0  # a zero tile
    got = transpose_tiles(quantize(w, fmt, tile=(tile, tile)))
    assert_qtensor_equal(got, quantize(w.t().contiguous(), fmt, tile=(tile, tile)))


def test_transpose_tiles_refuses_what_it_cannot_transpose():
    with pytest.raises(ValueError, match="square tiles"):
        transpose_tiles(quantize(torch.randn(32, 32), "nvfp4"))


def test_gathers_codes_only_for_square_round_to_nearest_tiles():
    specs = get_recipe(NO_SR).role_specs()
    assert gathers_codes(specs.w, specs.w_dgrad)
    one_d = get_recipe({**NO_SR, "weight_2d": False}).role_specs()
    assert not gathers_codes(one_d.w, one_d.w_dgrad)
    assert not gathers_codes(specs.w, None)


def _layers(seed=0, backend="reference"):
    torch.manual_seed(seed)
    plain = NVFP4Linear(64, 48, recipe=NO_SR, backend=backend, sr_seed=3)
    wrapped = copy.deepcopy(plain)
    assert wrapped.gather_quantized()
    return plain, wrapped


def test_wrapped_layer_trains_and_saves_like_the_plain_one(tmp_path):
    """Outside FSDP the wrapped master weight behaves as the weight: same forward, backward,
    optimizer steps; checkpoints hold a plain tensor that loads back into the wrapper."""
    plain, wrapped = _layers()
    assert isinstance(wrapped.weight, ShardedWeight) and wrapped.weight.shape == (48, 64)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, wrapped)]
    x = torch.randn(8, 64)
    for _ in range(3):
        outs = []
        for m, opt in zip((plain, wrapped), opts, strict=True):
            y = m(x)
            y.square().mean().backward()
            opt.step()
            opt.zero_grad()
            outs.append(y.detach())
        assert torch.equal(outs[0], outs[1])
    assert torch.equal(plain.weight.detach(), wrapped.weight.master)
    sd = wrapped.state_dict()
    assert type(sd["weight"]) is torch.Tensor
    save_file(sd, tmp_path / "w.safetensors")
    fresh = _layers(seed=1)[1]
    fresh.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert isinstance(fresh.weight, ShardedWeight)
    assert torch.equal(fresh.weight.master, plain.weight.detach())


def test_replacing_the_data_replaces_the_master():
    """Accelerate's FSDP2 upcast, ``param.data = param.data.to(torch.float32)``, upcasts
    the wrapped master too (fully_shard refuses a wrapper and master of different dtypes)."""
    torch.manual_seed(0)
    layer = NVFP4Linear(64, 48, recipe=NO_SR, backend="reference", dtype=torch.bfloat16)
    bf16 = layer.weight.detach().clone()
    assert layer.gather_quantized()
    p = layer.weight
    p.data = p.data.to(torch.float32)
    assert layer.weight is p and isinstance(p, ShardedWeight)
    assert p.dtype == p.master.dtype == torch.float32
    assert p.spec == layer.plan().specs.w and p.backend == "reference"
    assert torch.equal(p.master, bf16.float())
    sd = layer.state_dict()
    assert type(sd["weight"]) is torch.Tensor and sd["weight"].dtype == torch.float32
    assert torch.equal(sd["weight"], bf16.float())
    # A plain tensor assigned to the data of a bare wrapped Parameter is wrapped too.
    q = wrap_weight(torch.nn.Parameter(bf16.clone()), p.spec, "reference")
    q.data = torch.ones(48, 64)
    assert isinstance(q.data, ShardedWeight) and q.master.dtype == torch.float32
    assert torch.equal(q.master, torch.ones(48, 64))


def test_assign_load_keeps_the_weight_wrapped():
    """``load_state_dict(sd, assign=True)`` (Accelerate's cpu_ram_efficient_loading, meta
    loads) installs the loaded tensor wrapped again: same values, same spec, same forward."""
    plain, wrapped = _layers()
    spec = wrapped.weight.spec
    sd = {k: v.clone() for k, v in plain.state_dict().items()}
    sd["weight"] = torch.randn(48, 64, generator=torch.Generator().manual_seed(5))
    wrapped.load_state_dict(sd, assign=True)
    w = wrapped.weight
    assert isinstance(w, ShardedWeight) and isinstance(w, torch.nn.Parameter)
    assert w.requires_grad and w.spec == spec and w.backend == "reference"
    assert w.master.data_ptr() == sd["weight"].data_ptr()  # assigned, not copied
    assert torch.equal(w.master, sd["weight"])
    plain.load_state_dict(sd)
    x = torch.randn(8, 64)
    assert torch.equal(wrapped(x), plain(x))
    assert type(wrapped.state_dict()["weight"]) is torch.Tensor
    # a meta-device layer (DCP's and Accelerate's loads) gets its real weight wrapped
    with torch.device("meta"):
        meta = NVFP4Linear(64, 48, recipe=NO_SR, backend="reference", sr_seed=3)
    assert meta.gather_quantized()
    meta.load_state_dict(sd, assign=True)
    assert isinstance(meta.weight, ShardedWeight) and not meta.weight.is_meta
    assert torch.equal(meta(x), plain(x))


def test_assign_load_under_fully_shard_keeps_the_shard_wrapped(mesh):
    """Under fully_shard the assigned DTensor's shard is wrapped again (FSDP2 reads its
    all-gather hooks from the shard), and those hooks gather the loaded weight's codes."""
    plain, wrapped = _layers()
    fully_shard(wrapped, mesh=mesh)
    sd = wrapped.state_dict()
    new = torch.randn(48, 64, generator=torch.Generator().manual_seed(5))
    sd["weight"] = DTensor.from_local(new, mesh, sd["weight"].placements)
    wrapped.load_state_dict(sd, assign=True)
    w = wrapped.weight
    assert isinstance(w, DTensor) and isinstance(w, torch.nn.Parameter) and w.requires_grad
    local = w.to_local()
    assert isinstance(local, ShardedWeight) and torch.equal(local.master, new)
    inputs, meta = _hooks(local, mesh)
    gathered = local.fsdp_post_all_gather(inputs, meta, torch.float32)[0]
    specs = plain.plan().specs
    assert_qtensor_equal(gathered_weight(gathered, specs.w, specs.w_dgrad),
                         quantize(new, "nvfp4", tile=(16, 16)))
    assert type(wrapped.state_dict()["weight"].to_local()) is torch.Tensor


def test_only_square_tile_linears_gather_codes():
    layer = NVFP4Linear(32, 32, recipe={**NO_SR, "weight_2d": False})
    assert not layer.gather_quantized() and type(layer.weight) is torch.nn.Parameter


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """A one-rank gloo group and its device mesh (the hooks' all-reduce runs in it)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _hooks(weight: ShardedWeight, mesh, param_dtype=None):
    """What the pre-all-gather hook gives on a mesh of more ranks, computed on this one
    (the one-rank mesh itself gathers values: test_one_rank_gathers_values)."""
    if not _splits_into_tiles(weight.shape, 1, weight.spec.tile[0]):
        policy = MixedPrecisionPolicy(param_dtype=param_dtype)
        return weight.fsdp_pre_all_gather(mesh, weight.shape, weight.stride(), None, policy)
    local = weight.master.to(param_dtype or weight.dtype)
    return weight.shard_codes(local, weight.shape, mesh.get_group())


def test_one_rank_gathers_values_and_trains_like_the_plain_layer(mesh):
    """On one rank the hook hands FSDP2 the values (its one-rank path copies one input),
    and a fully_shard-ed wrapped layer trains exactly like the plain one."""
    plain, wrapped = _layers()
    policy = MixedPrecisionPolicy()
    w = wrapped.weight
    inputs, meta = w.fsdp_pre_all_gather(mesh, w.shape, w.stride(), None, policy)
    assert meta is None and torch.equal(inputs[0], w.master)
    fully_shard(wrapped, mesh=mesh)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    for step in range(2):
        ys = [m(x) for m in (plain, wrapped)]
        assert torch.equal(ys[0], ys[1].full_tensor() if isinstance(ys[1], DTensor) else ys[1])
        for y in ys:
            y.square().mean().backward()
        assert torch.equal(plain.weight.grad, wrapped.weight.grad.full_tensor()), step
        for m in (plain, wrapped):
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_gather_the_codes_the_layer_would_quantize(mesh, backend):
    plain, wrapped = _layers(backend=backend)
    w = wrapped.weight
    inputs, meta = _hooks(w, mesh)
    assert [t.dtype for t in inputs] == [torch.uint8, torch.float8_e4m3fn]
    assert sum(t.numel() * t.element_size() for t in inputs) == 48 * 64 * 0.5625
    gathered = w.fsdp_post_all_gather(inputs, meta, torch.float32)[0]
    assert isinstance(gathered, GatheredWeight) and gathered.shape == w.shape
    plan = plain.plan()
    want = plan.weight(plain.weight.detach())
    got = gathered_weight(gathered, plan.specs.w, plan.specs.w_dgrad)
    assert_qtensor_equal(transpose_tiles(got), want.col)  # the backward's W^T
    # the forward's W: block values on the triton backend, packed on the reference
    if isinstance(want.row, BlockValues):
        assert torch.equal(got.block_values()[:48], want.row.values.float())
        assert torch.equal(got.global_scale.reshape(()), want.row.global_scale.reshape(()))
    else:
        assert_qtensor_equal(got, want.row)
    # Later steps refill the same buffers; only the global scale is new.
    new_scale = torch.tensor(0.5)
    assert w.fsdp_post_all_gather(inputs, (new_scale, *meta[1:]), torch.float32,
                                  out=gathered) is None
    new = gathered_weight(gathered, plan.specs.w, plan.specs.w_dgrad)
    assert new.global_scale is new_scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_gathered_weight_in_a_layer_is_the_weight(mesh, backend):
    """A layer whose weight is the gathered codes computes what the plain layer computes,
    and its weight gradient is the plain layer's."""
    plain, wrapped = _layers(backend=backend)
    inputs, meta = _hooks(wrapped.weight, mesh)
    gathered = wrapped.weight.fsdp_post_all_gather(inputs, meta, torch.float32)[0]
    wrapped.weight = torch.nn.Parameter(gathered)
    x = torch.randn(8, 64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ys = [m(x) for m in (plain, wrapped)]
    assert torch.equal(ys[0], ys[1])
    # the plain layer saves W^T's codes [K, N/2]; the gathered one saves the gathered codes
    # buffer itself (FSDP2 refills it for the backward) and transposes its tiles there
    w_t_codes = [t for t in saved if t.dtype == torch.uint8 and tuple(t.shape) == (64, 24)]
    assert len(w_t_codes) == 1 and any(t is gathered._data for t in saved)
    assert not any(isinstance(t, GatheredWeight) for t in saved)  # hooks may copy what is saved
    for y in ys:
        y.square().mean().backward()
    assert torch.equal(plain.weight.grad, wrapped.weight.grad)
    # saved-tensor hooks that copy (activation offloading) see plain tensors only
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        ys = [m(x) for m in (plain, wrapped)]
    for m, y in zip((plain, wrapped), ys, strict=True):
        m.weight.grad = None
        y.square().mean().backward()
    assert torch.equal(ys[0], ys[1]) and torch.equal(plain.weight.grad, wrapped.weight.grad)
    with pytest.raises(NotImplementedError, match="fsdp_quantized_all_gather"):
        wrapped.weight + 1
    for other_first in (lambda w: torch.ones(48, 64) + w, lambda w: torch.cat([x[:1], w])):
        with pytest.raises(NotImplementedError, match="all-gathered as nvfp4 codes"):
            other_first(wrapped.weight.detach())


@pytest.mark.skipif(not is_triton_available()[0], reason="Triton is not installed")
def test_gathered_weight_compiles(mesh):
    """torch.compile(fullgraph=True) traces a layer whose weight is the gathered codes (the
    Triton backend; the interpreter on the CPU), with its gradient delivered."""
    torch.manual_seed(0)
    plain = NVFP4Linear(64, 48, recipe=NO_SR, backend="triton", sr_seed=3)
    wrapped = copy.deepcopy(plain)
    wrapped.gather_quantized()
    inputs, meta = _hooks(wrapped.weight, mesh)
    wrapped.weight = torch.nn.Parameter(
        wrapped.weight.fsdp_post_all_gather(inputs, meta, torch.float32)[0])
    x = torch.randn(8, 64)
    compiled = torch.compile(wrapped, backend="aot_eager", fullgraph=True)
    ys = [compiled(x), plain(x)]
    for y in ys:
        y.square().mean().backward()
    assert torch.equal(ys[0], ys[1])
    assert torch.equal(wrapped.weight.grad, plain.weight.grad)


def test_hooks_follow_the_mixed_precision_dtype(mesh):
    plain, wrapped = _layers()
    inputs, meta = _hooks(wrapped.weight, mesh, torch.bfloat16)
    gathered = wrapped.weight.fsdp_post_all_gather(inputs, meta, torch.bfloat16)[0]
    assert gathered.dtype == torch.bfloat16
    specs = plain.plan().specs
    want = quantize(plain.weight.detach().bfloat16(), "nvfp4", tile=(16, 16))
    assert_qtensor_equal(gathered_weight(gathered, specs.w, specs.w_dgrad), want)


def test_weights_that_do_not_split_into_tiles_gather_values(mesh):
    layer = NVFP4Linear(64, 40, recipe=NO_SR, backend="reference")  # 40 rows: not 16-aligned
    assert layer.gather_quantized()
    inputs, meta = _hooks(layer.weight, mesh)
    assert meta is None and torch.equal(inputs[0], layer.weight.master)
    values, free = layer.weight.fsdp_post_all_gather(inputs, meta, torch.float32)
    assert values is inputs[0] and free == ()


def test_config_and_convert():
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4))
    summary = convert(model, NVFP4Config(first_bf16_blocks=0, last_bf16_blocks=0,
                                         fsdp_quantized_all_gather=True), verbose=False)
    assert len(summary.gathered_quantized) == 14
    assert "FSDP2 all-gathers 14 weights as quantized codes" in summary.table()
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, ShardedWeight)
    assert type(model.state_dict()["model.layers.0.mlp.up_proj.weight"]) is torch.Tensor
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128))
    summary = convert(gpt2, NVFP4Config(first_bf16_blocks=0, last_bf16_blocks=0,
                                        fsdp_quantized_all_gather=True), verbose=False)
    assert summary.gathered_quantized == []
    with pytest.raises(ValueError, match="switch_to_bf16_at"):
        NVFP4Config(fsdp_quantized_all_gather=True, switch_to_bf16_at=0.8)
    with pytest.raises(ValueError, match="switched"):
        NVFP4Config(fsdp_quantized_all_gather=True, switched="all")
    with pytest.raises(TypeError, match="fsdp_quantized_all_gather must be a bool"):
        NVFP4Config(fsdp_quantized_all_gather="yes")



def test_from_pretrained_wraps_the_loaded_weights(tmp_path):
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=NVFP4Config(
        first_bf16_blocks=0, last_bf16_blocks=0, fsdp_quantized_all_gather=True))
    w = model.model.layers[1].self_attn.o_proj.weight
    assert isinstance(w, ShardedWeight)
    assert torch.equal(w.master, saved["model.layers.1.self_attn.o_proj.weight"])


def test_the_accelerate_recipe_turns_it_on():
    root = Path(__file__).resolve().parents[2]
    config = NVFP4Config.load(root / "integrations" / "accelerate" / "nvfp4_fsdp2_recipe.yaml")
    assert config.fsdp_quantized_all_gather and config.get_recipe().weight_2d


def test_telemetry_skips_the_weight_stats_of_gathered_codes(mesh):
    _, wrapped = _layers()
    inputs, meta = _hooks(wrapped.weight, mesh)
    wrapped.weight = torch.nn.Parameter(
        wrapped.weight.fsdp_post_all_gather(inputs, meta, torch.float32)[0])
    probe = QuantProbe()
    probe.start(wrapped)
    wrapped(torch.randn(8, 64)).sum().backward()
    stats = probe.finish(wrapped)
    assert "nvfp4/x_snr_db" in stats and "nvfp4/wgrad_noise_ratio" in stats
    assert "nvfp4/w_snr_db" not in stats


def _tiny_llama(gather: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4))
    convert(model, NVFP4Config(first_bf16_blocks=0, last_bf16_blocks=0, backend="reference",
                               fsdp_quantized_all_gather=gather), verbose=False)
    return model


def _recipes(model):
    return [m.recipe for m in model.modules() if isinstance(m, NVFP4Linear)]


def test_late_switch_is_refused_when_weights_gather_as_codes():
    """Every route to the BF16 switch (a manual call, the schedule, the Trainer callback,
    quantization_disabled) refuses up front, naming the layers, and switches nothing."""
    model = _tiny_llama(gather=True)
    before = _recipes(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*"
                       r"fsdp_quantized_all_gather off"):
        switch_to_high_precision(model)
    with pytest.raises(ValueError, match="14 layer"):
        switch_to_high_precision(model, "forward")
    schedule = PrecisionSchedule(0.5, 10)
    with pytest.raises(ValueError, match="fsdp_quantized_all_gather"):
        schedule.update(model, 5)
    assert not schedule.switched
    callback = LateSwitchCallback(0.5)
    state = TrainerState(max_steps=10, global_step=4)
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    state.global_step = 5
    with pytest.raises(ValueError, match="fsdp_quantized_all_gather"):
        callback.on_step_end(args, state, TrainerControl(), model=model)
    with pytest.raises(ValueError, match="fsdp_quantized_all_gather"), quantization_disabled(model):
        pass
    assert _recipes(model) == before
    plain = _tiny_llama(gather=False)
    assert switch_to_high_precision(plain) == 14
    assert all(r.is_high_precision for r in _recipes(plain))


def test_late_switch_is_refused_under_fully_shard(mesh):
    """Under fully_shard (a DTensor of the wrapped shard, or the gathered codes between
    all-gather and reshard) the switch is refused before the next forward would fail."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        NVFP4Linear(64, 64, recipe=NO_SR, backend="reference"), torch.nn.ReLU(),
        NVFP4Linear(64, 48, recipe=NO_SR, backend="reference"))
    assert model[2].gather_quantized()
    fully_shard(model, mesh=mesh)
    assert isinstance(model[2].weight, DTensor)
    with pytest.raises(ValueError, match=r"1 layer\(s\).*\(2\)"):
        switch_to_high_precision(model)
    _, wrapped = _layers()
    inputs, meta = _hooks(wrapped.weight, mesh)
    wrapped.weight = torch.nn.Parameter(
        wrapped.weight.fsdp_post_all_gather(inputs, meta, torch.float32)[0])
    with pytest.raises(ValueError, match=r"\(<model>\)"):
        switch_to_high_precision(wrapped)
    assert not wrapped.recipe.is_high_precision


def test_gather_quantized_before_and_after_fully_shard(mesh):
    """After fully_shard a wrapped layer stays wrapped once (no wrapper around the DTensor);
    a plain layer already sharded is refused with the order to follow."""
    _, wrapped = _layers()
    fully_shard(wrapped, mesh=mesh)
    assert wrapped.gather_quantized()
    assert type(wrapped.weight.to_local()) is ShardedWeight
    plain = NVFP4Linear(64, 48, recipe=NO_SR, backend="reference")
    fully_shard(plain, mesh=mesh)
    with pytest.raises(ValueError, match="before fully_shard"):
        plain.gather_quantized()

