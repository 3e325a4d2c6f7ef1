"""convert(): which Linears of real (tiny) transformers models become NVFP4Linear, and why."""

import logging

import pytest
import torch
import transformers
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from hf_nvfp4 import NVFP4Config, NVFP4Linear, convert
from hf_nvfp4.convert import _is_elementwise, find_blocks
from hf_nvfp4.nn import NVFP4Conv1D

H, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 128, 4, 2, 16, 256
_DECODER = dict(
    vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=3,
    num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
)


def _llama_block_params(qkv_bias: bool = False) -> int:
    """Parameters of one Llama-style block's Linears: q, k, v, o and the gated MLP."""
    q = o = H * HEADS * HEAD_DIM
    kv = 2 * H * KV_HEADS * HEAD_DIM
    bias = (HEADS + 2 * KV_HEADS) * HEAD_DIM if qkv_bias else 0
    return q + kv + o + bias + 3 * H * INTER


# GPT-NeoX: fused qkv and dense (both with bias), h->4h and 4h->h (with bias).
_NEOX_BLOCK_PARAMS = (3 * H * H + 3 * H) + (H * H + H) + (H * INTER + INTER) + (INTER * H + H)

ARCHS = [
    pytest.param(LlamaConfig(**_DECODER), 7, _llama_block_params(), id="llama"),
    pytest.param(MistralConfig(**_DECODER), 7, _llama_block_params(), id="mistral"),
    pytest.param(Qwen2Config(**_DECODER), 7, _llama_block_params(qkv_bias=True), id="qwen2"),
    pytest.param(Qwen3Config(head_dim=HEAD_DIM, **_DECODER), 7, _llama_block_params(),
                 id="qwen3"),
    pytest.param(GemmaConfig(head_dim=HEAD_DIM, **_DECODER), 7, _llama_block_params(),
                 id="gemma"),
    pytest.param(
        GPTNeoXConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=3,
                      num_attention_heads=HEADS),
        4, _NEOX_BLOCK_PARAMS, id="gpt_neox",
    ),
]


def _llama(layers: int = 2, **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(_DECODER, num_hidden_layers=layers, **kw)
    return AutoModelForCausalLM.from_config(LlamaConfig(**cfg))


def _cfg(**kw) -> NVFP4Config:
    return NVFP4Config(backend="reference", **{"first_bf16_blocks": 0, "last_bf16_blocks": 0, **kw})


@pytest.mark.parametrize("config, linears_per_block, block_params", ARCHS)
def test_convert_quantizes_the_middle_blocks_of_each_architecture(
    config, linears_per_block, block_params
):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    [(prefix, n_blocks)] = find_blocks(model)
    assert n_blocks == 3
    blocks = model.get_submodule(prefix)
    weights_before = {n: m.weight for n, m in blocks[1].named_modules() if isinstance(m, nn.Linear)}

    summary = convert(model, _cfg(first_bf16_blocks=1, last_bf16_blocks=1), verbose=False)

    # Only block 1 of 3 is quantized; head, embeddings and blocks 0 and 2 are not.
    assert summary.bf16_blocks == (1, 1)
    assert len(summary.quantized_layers) == linears_per_block
    assert all(n.startswith(f"{prefix}.1.") for n in summary.quantized_layers)
    assert summary.quantized_params == block_params
    assert summary.total_params == sum(p.numel() for p in model.parameters())
    nvfp4 = {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Linear)}
    assert sorted(nvfp4) == sorted(summary.quantized_layers)
    # Parameters are shared, not copied: an optimizer built before convert still works.
    for name, weight in weights_before.items():
        assert nvfp4[f"{prefix}.1.{name}"].weight is weight
    kept = [d for d in summary.layers if not d.quantized]
    assert {d.reason for d in kept} == {
        "in the first 1 blocks (kept BF16)",
        "in the last 1 blocks (kept BF16)",
        "outside the decoder blocks (embeddings, head, projections)",
    }

    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.logits).all()
    assert 4.5 < out.loss.item() < 6.5  # ~ln(256) = 5.55 at initialization
    out.loss.backward()
    for mod in nvfp4.values():
        assert torch.isfinite(mod.weight.grad).all()
        assert mod.weight.grad.abs().sum() > 0


def _gpt2(n_embd: int = H) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=128, n_embd=n_embd, n_layer=2, n_head=HEADS, n_positions=64,
                   bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0)
    )


# Conv1D weights [in, out] with biases: c_attn [64, 192], attn.c_proj [64, 64], c_fc [64, 256]
# and mlp.c_proj [256, 64] (GPT-2's inner size is 4 * n_embd).
_GPT2_C_FC_PARAMS = H * 4 * H + 4 * H
_GPT2_BLOCK_PARAMS = (H * 3 * H + 3 * H) + (H * H + H) + _GPT2_C_FC_PARAMS + (4 * H * H + H)


def test_gpt2_conv1d_layers_train_in_nvfp4(caplog):
    model = _gpt2()
    convs = {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    assert len(convs) == 8
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # built before convert
    with caplog.at_level(logging.WARNING, logger="hf_nvfp4.convert"):
        summary = convert(model, _cfg(), verbose=False)

    assert summary.num_blocks == 2
    assert sorted(summary.quantized_layers) == sorted(convs)
    assert summary.quantized_params == 2 * _GPT2_BLOCK_PARAMS
    assert summary.block_matmul_share() == (2 * _GPT2_BLOCK_PARAMS, 2 * _GPT2_BLOCK_PARAMS)
    assert "matrix parameters of the NVFP4 blocks in NVFP4: 99,456 of 99,456 (100.0%)" in (
        summary.table()
    )
    assert [d.reason for d in summary.layers if not d.quantized] == [
        "outside the decoder blocks (embeddings, head, projections)"  # lm_head
    ]
    assert not caplog.records
    for name, conv in convs.items():
        new = model.get_submodule(name)
        assert isinstance(new, NVFP4Conv1D) and isinstance(new, NVFP4Linear)
        assert new.weight is conv.weight and new.bias is conv.bias  # shared, [in, out]
        assert (new.in_features, new.out_features) == tuple(conv.weight.shape)

    model.train()
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    before = {n: convs[n].weight.detach().clone() for n in convs}
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(4.0 < v < 5.5 for v in losses)  # ~ln(128) = 4.85 at initialization
    assert losses[1] < losses[0]
    for name, conv in convs.items():
        mod = model.get_submodule(name)
        assert mod.sr_step == 2
        assert torch.isfinite(conv.weight).all()
        assert not torch.equal(conv.weight, before[name])


def test_gpt2_conv1d_follows_the_linear_rules():
    model = _gpt2()
    summary = convert(model, _cfg(first_bf16_blocks=1, exclude=[r"mlp\.c_fc"]), verbose=False)
    assert summary.quantized_layers == [
        "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj",
    ]
    reasons = {d.name: d.reason for d in summary.layers}
    assert reasons["transformer.h.0.attn.c_attn"] == "in the first 1 blocks (kept BF16)"
    assert reasons["transformer.h.1.mlp.c_fc"] == "matched an exclude pattern"
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    # Block 1 minus the excluded c_fc: the user's choice, not counted as left out.
    block1 = _GPT2_BLOCK_PARAMS - _GPT2_C_FC_PARAMS
    assert summary.block_matmul_share() == (block1, block1)

    ragged = _gpt2(n_embd=72)  # Conv1D [72, 216] etc.: not multiples of 16
    summary = convert(ragged, _cfg(), verbose=False)
    assert summary.quantized_layers == []
    kept = [d.reason for d in summary.layers if d.name.startswith("transformer.h.")]
    assert kept == ["dimensions not multiples of 16"] * 8


def test_model_without_blocks_raises():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    assert find_blocks(model) == []
    with pytest.raises(ValueError, match="could not find the decoder blocks of Sequential"):
        convert(model, _cfg(), verbose=False)


@pytest.mark.parametrize(
    "first, last, num_blocks, expected",
    [
        (2 / 62, 8 / 62, 62, (2, 8)),  # the paper's 12B split
        (2 / 62, 8 / 62, 16, (1, 2)),
        (2 / 62, 8 / 62, 4, (0, 1)),
        (3, 1, 10, (3, 1)),  # counts
        (0.25, 0.5, 8, (2, 4)),  # fractions
        (0, 1.0, 6, (0, 6)),
    ],
)
def test_block_split(first, last, num_blocks, expected):
    assert NVFP4Config(first_bf16_blocks=first, last_bf16_blocks=last).block_split(
        num_blocks
    ) == expected


def test_default_config_keeps_last_block_of_four_in_bf16():
    model = _llama(layers=4)
    summary = convert(model, NVFP4Config(backend="reference"), verbose=False)
    assert summary.bf16_blocks == (0, 1)
    assert len(summary.quantized_layers) == 3 * 7
    assert not any(n.startswith("model.layers.3.") for n in summary.quantized_layers)
    assert "in the last 1 blocks (kept BF16)" in summary.table()


@pytest.mark.parametrize(
    "kw, expected, reason",
    [
        (dict(include=[r"mlp\."]), 6, "not matched by include patterns"),
        (dict(include=r"mlp\."), 6, "not matched by include patterns"),  # a lone pattern
        (dict(exclude=[r"down_proj$"]), 12, "matched an exclude pattern"),
        (dict(include=[r"mlp\."], exclude=["down_proj"]), 4, "matched an exclude pattern"),
        (dict(modules_to_not_convert=["model.layers.0"]), 7, "listed in modules_to_not_convert"),
        (dict(modules_to_not_convert=["model.layers.1.mlp.up_proj"]), 13,
         "listed in modules_to_not_convert"),
    ],
)
def test_include_exclude_and_modules_to_not_convert(kw, expected, reason):
    summary = convert(_llama(), _cfg(**kw), verbose=False)
    assert len(summary.quantized_layers) == expected
    kept_in_blocks = [d for d in summary.layers if not d.quantized and d.name != "lm_head"]
    assert len(kept_in_blocks) == 14 - expected
    assert any(d.reason == reason for d in kept_in_blocks)


def test_modules_to_not_convert_matches_whole_name_components(caplog):
    # "model.layers.0.mlp.up" is not a prefix of the module "model.layers.0.mlp.up_proj".
    with caplog.at_level("WARNING", logger="hf_nvfp4.convert"):
        summary = convert(_llama(), _cfg(modules_to_not_convert=["model.layers.0.mlp.up"]),
                          verbose=False)
    assert "model.layers.0.mlp.up_proj" in summary.quantized_layers
    assert "entry 'model.layers.0.mlp.up' names no module of LlamaForCausalLM" in caplog.text


def test_a_short_name_in_modules_to_not_convert_is_warned_about_with_the_fix(caplog):
    """transformers' field of the same name matches suffixes; ours does not: say so."""
    with caplog.at_level("WARNING", logger="hf_nvfp4.convert"):
        summary = convert(_llama(), _cfg(modules_to_not_convert=["o_proj", "model.layers.1"]),
                          verbose=False)
    assert "model.layers.0.self_attn.o_proj" in summary.quantized_layers
    assert ("entry 'o_proj' names no module of LlamaForCausalLM (entries are exact module "
            "names or name prefixes); 2 module names end with it (e.g. "
            "'model.layers.0.self_attn.o_proj'): list them, or use exclude=[r'\\.o_proj$']"
            ) in caplog.text
    assert "'model.layers.1'" not in caplog.text  # a prefix that matches: no warning
    fixed = convert(_llama(), _cfg(exclude=[r"\.o_proj$"]), verbose=False)
    assert not any(n.endswith("o_proj") for n in fixed.quantized_layers)


def test_dims_not_multiple_of_16_are_skipped_with_reason(caplog):
    with caplog.at_level("WARNING", logger="hf_nvfp4.convert"):
        summary = convert(_llama(intermediate_size=72), _cfg(), verbose=False)
    assert "6 of 15 linear layers stay in HIGH PRECISION" in caplog.text
    assert "model.layers.0.mlp.down_proj" in caplog.text and "not multiples of 16" in caplog.text
    skipped = sorted(d.name for d in summary.layers if d.reason == "dimensions not multiples of 16")
    assert skipped == [f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("down", "gate",
                                                                                  "up")]
    assert len(summary.quantized_layers) == 8  # q, k, v, o of both blocks
    assert all("self_attn" in n for n in summary.quantized_layers)


def test_layers_get_consecutive_sr_seeds_and_convert_is_idempotent():
    model = _llama()
    first = convert(model, _cfg(sr_seed=100), verbose=False)
    seeds = [int(model.get_submodule(n).sr_state[0]) for n in first.quantized_layers]
    assert seeds == list(range(100, 114))
    assert all(int(model.get_submodule(n).sr_state[1]) == 0 for n in first.quantized_layers)

    again = convert(model, _cfg(), verbose=False)
    assert again.quantized_layers == []
    assert sum(d.reason == "already NVFP4Linear" for d in again.layers) == 14


def test_summary_table(capsys):
    summary = convert(_llama(), _cfg(), verbose=True)
    table = capsys.readouterr().out
    assert table.strip() == summary.table()
    assert "14 of 15 linear layers quantized (2 blocks; first 0 and last 0 kept in BF16)" in table
    q = 2 * _llama_block_params()
    assert f"parameters in quantized layers: {q:,}" in table


def test_summary_counts_every_block_matrix_and_warns_when_much_stays_high_precision(caplog):
    """MoE experts that cannot run in NVFP4 (ragged expert FFN) are listed, counted, warned."""
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, head_dim=16,
    )
    model = transformers.Qwen3MoeForCausalLM(cfg)
    with caplog.at_level(logging.WARNING, logger="hf_nvfp4.convert"):
        summary = convert(model, {"first_bf16_blocks": 0, "last_bf16_blocks": 0},
                          verbose=False)
    experts = [d for d in summary.layers if d.name.endswith("experts")]
    assert [d.name for d in experts] == [f"model.layers.{i}.mlp.experts" for i in (0, 1)]
    assert {d.reason for d in experts} == {
        "expert down_proj dimensions (64 x 24) not multiples of 16"}
    assert not any(d.quantized for d in experts)
    assert sum(d.params for d in experts) == 2 * 4 * (64 * 48 + 64 * 24)
    routers = summary.other_matmuls
    assert [d.name for d in routers] == [f"model.layers.{i}.mlp.gate.weight" for i in (0, 1)]
    quantized, total = summary.block_matmul_share()
    assert quantized == summary.quantized_params == 2 * (64 * 64 * 2 + 32 * 64 * 2)
    assert total == quantized + sum(d.params for d in [*experts, *routers])
    assert "stay in high precision" in caplog.text and "not multiples of 16" in caplog.text
    assert "matrix parameters of the NVFP4 blocks in NVFP4" in summary.table()


def test_no_share_warning_when_the_blocks_are_fully_nvfp4(caplog):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        vocab_size=128))
    with caplog.at_level(logging.WARNING, logger="hf_nvfp4.convert"):
        summary = convert(model, {"first_bf16_blocks": 1, "last_bf16_blocks": 1}, verbose=False)
    assert summary.block_matmul_share() == (summary.quantized_params,) * 2
    assert "stay in high precision" not in caplog.text


def test_stacks_of_blocks_that_run_in_turn_are_all_blocks():
    """HRM: two stacks (low and high level) of num_layers_per_stack blocks run in turn; its
    num_hidden_layers counts cache slots (2 x 2 x 4 = 16), so no ModuleList matches it."""
    cfg = transformers.HrmTextConfig(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=2,
        num_attention_heads=HEADS, head_dim=HEAD_DIM)
    model = AutoModelForCausalLM.from_config(cfg)
    assert cfg.num_hidden_layers == 16
    stacks = [("model.L_module.layers", 2), ("model.H_module.layers", 2)]
    assert find_blocks(model) == stacks

    summary = convert(model, _cfg(first_bf16_blocks=1, last_bf16_blocks=1), verbose=False)

    assert summary.num_blocks == 4  # numbered L0, L1, H0, H1
    in_nvfp4 = {".".join(n.split(".")[:4]) for n in summary.quantized_layers}
    assert in_nvfp4 == {"model.L_module.layers.1", "model.H_module.layers.0"}
    split = {d.reason for d in summary.layers if d.name.startswith(
        ("model.L_module.layers.0.", "model.H_module.layers.1."))}
    assert split == {"in the first 1 blocks (kept BF16)", "in the last 1 blocks (kept BF16)"}


class _MatmulOperands(TorchDispatchMode):
    """Records the storages of the tensors that reach a matrix product as a factor."""

    FACTORS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2)}

    def __init__(self):
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for i in self.FACTORS.get(func.overloadpacket.__name__, ()):
            self.storages.add(args[i].untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def test_parameters_used_elementwise_are_not_counted_as_matmul_weights():
    """Jamba: the Mamba mixer's A_log [d_inner, d_state] never reaches a matrix product (the
    scan uses exp(A_log) elementwise) and is not counted; the router's bare weight does and is
    (a matmul weight kept in high precision)."""
    cfg = transformers.JambaConfig(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_experts=4,
        attn_layer_period=2, attn_layer_offset=1, mamba_dt_rank=16, use_mamba_kernels=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    params = dict(model.named_parameters())
    a_logs = sorted(n for n in params if n.endswith(".A_log"))
    routers = sorted(n for n in params if n.endswith(".router.weight"))
    assert a_logs and routers and all(params[n].dim() == 2 for n in a_logs)
    with torch.no_grad(), _MatmulOperands() as seen:
        model(input_ids=torch.randint(0, VOCAB, (1, 8)), use_cache=False)
    assert not {params[n].untyped_storage().data_ptr() for n in a_logs} & seen.storages
    assert {params[n].untyped_storage().data_ptr() for n in routers} <= seen.storages

    summary = convert(model, _cfg(), verbose=False)

    assert sorted(d.name for d in summary.other_matmuls) == routers
    quantized, total = summary.block_matmul_share()
    assert total - quantized == sum(params[n].numel() for n in routers)


@pytest.mark.parametrize("name, elementwise", [
    ("A_log", True), ("bias", True), ("input_gate_bias", True), ("position_bias", True),
    ("e_score_correction_bias", True), ("bias_u", True), ("attention_biases", True),
    ("weight", False), ("fn", False), ("proj", False), ("biased_weight", False), ("A", False),
])
def test_elementwise_parameter_names(name, elementwise):
    assert _is_elementwise(name) is elementwise


def test_linear_subclasses_with_their_own_forward_keep_it():
    """An nn.Linear subclass with a forward of its own (Llama 4's router returns scores and
    logits) stays as it is, with the reason, so the model still runs; a subclass whose forward
    is the Linear's (Falcon's) converts."""
    from transformers.models.falcon.modeling_falcon import FalconLinear

    cfg = transformers.AutoConfig.for_model(
        model_type="llama4_text", hidden_size=64, intermediate_size=32,
        intermediate_size_mlp=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=16, num_experts_per_tok=1,
        vocab_size=128, interleave_moe_layer_step=1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    summary = convert(model, {"first_bf16_blocks": 0, "last_bf16_blocks": 0,
                              "backend": "reference"}, verbose=False)
    router = {d.name: d for d in summary.layers}["model.layers.1.feed_forward.router"]
    assert not router.quantized
    assert router.reason == ("an nn.Linear subclass with its own forward (Llama4Router), which "
                             "NVFP4Linear would replace")
    assert type(model.model.layers[1].feed_forward.router).__name__ == "Llama4Router"
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(
                nn.ModuleDict({"a": FalconLinear(32, 32), "b": ScaledLinear(32, 32),
                               "c": type("FSDPFalconLinear", (FalconLinear,), {})(32, 32)})
                for _ in range(2))

    class ScaledLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    stack = Stack()
    decisions = {d.name: d for d in convert(stack, {"first_bf16_blocks": 0,
                                                    "last_bf16_blocks": 0}, verbose=False).layers}
    assert decisions["layers.0.a"].quantized and isinstance(stack.layers[0]["a"], NVFP4Linear)
    assert decisions["layers.0.c"].quantized  # FSDP2's subclass of it
    assert not decisions["layers.0.b"].quantized
    assert isinstance(stack.layers[0]["b"], ScaledLinear)
