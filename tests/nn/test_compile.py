"""torch.compile(fullgraph=True) of HF Llama decoder blocks with NVFP4 layers, in training.

The Triton backend runs its custom ops (the interpreter on a CPU machine, compiled kernels
on a GPU); ``aot_eager`` traces forward and backward exactly as inductor would receive them
but runs the same ops, so compiled and eager training are compared bit for bit.
"""

import copy

import pytest
import torch

import hf_nvfp4
from hf_nvfp4.kernels import is_triton_available
from hf_nvfp4.nn import NVFP4Linear
from hf_nvfp4.nn.packed import NVFP4PackedLinear

transformers = pytest.importorskip("transformers")
_OK, _WHY = is_triton_available()
pytestmark = [
    pytest.mark.skipif(not _OK, reason=_WHY),
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`"),
]


def _model(device: str, backend: str = "triton") -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device)
    hf_nvfp4.convert(model, {"first_bf16_blocks": 0, "last_bf16_blocks": 0,
                             "backend": backend}, verbose=False)
    return model


def _train(model, ids, steps: int):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiled_blocks_train_like_eager_fullgraph(backend):
    """Both backends trace whole; the reference's NaN/Inf check (a data-dependent branch)
    is left out while tracing, which propagates non-finite values as the kernels do."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eager = _model(device, backend)
    compiled = copy.deepcopy(eager)
    assert sum(isinstance(m, NVFP4Linear) for m in eager.modules()) == 14
    torch._dynamo.reset()
    for layer in compiled.model.layers:
        layer.compile(fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    want = _train(eager, ids, 2)
    got = _train(compiled, ids, 2)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert torch.equal(p, q), name
    steps = {m.sr_step for m in compiled.modules() if isinstance(m, NVFP4Linear)}
    assert steps == {2}


@pytest.mark.parametrize("preset", ["mxfp4", "fp8_block"])
def test_baseline_formats_compile_fullgraph(preset):
    """The FP8-block and MXFP4 baselines trace whole (their kernels are custom ops with fake
    implementations; bench/e2e.py's compiled columns need that) and train as in eager. The
    compiled layer runs first: its first trace meets the one-time checks (the FP8 GEMM's
    self-check on a GPU), which the layer's plan must have run eagerly."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    eager = NVFP4Linear(128, 64, recipe=preset, backend="triton", sr_seed=1, device=device)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    run = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)).to(device)
    for step in (run, eager):
        step(x).square().mean().backward()
    assert torch.equal(run(x), eager(x))
    assert torch.equal(compiled.weight.grad, eager.weight.grad)


def test_packed_layer_input_gradient_compiles_fullgraph():
    """A packed layer's gradient path (LoRA on a packed model) traces whole, for a layer
    packed from an NVFP4Linear and for one built empty and loaded, and gives the eager packed
    layer's output and input gradient, which are the frozen NVFP4Linear's, bit for bit, over
    two steps of stochastically rounded dgrad."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    lin = NVFP4Linear(128, 64, bias=True, backend="triton", sr_seed=4, device=device)
    lin.weight.requires_grad_(False)
    packed = NVFP4PackedLinear.from_linear(lin)
    twin = copy.deepcopy(packed)
    # built empty and loaded in place, as a packed checkpoint loads: compiles all the same
    loaded = NVFP4PackedLinear(128, 64, backend="triton", sr_seed=4, device=device)
    loaded.load_state_dict(packed.state_dict())
    torch._dynamo.reset()
    runs = [torch.compile(m, backend="aot_eager", fullgraph=True) for m in (twin, loaded)]
    gen = torch.Generator().manual_seed(2)
    for step in range(2):
        x = torch.randn(2, 32, 128, generator=gen).to(device, torch.bfloat16)
        dy = torch.randn(2, 32, 64, generator=gen).to(device, torch.bfloat16)
        grads = []
        for layer in (lin, packed, *runs):
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            y.backward(dy)
            grads.append((y, xi.grad))
        for y, dx in grads[1:]:
            assert torch.equal(y, grads[0][0]), step
            assert torch.equal(dx, grads[0][1]), step
        assert grads[0][1].abs().sum() > 0
    assert twin.grad_sr_state.tolist() == packed.grad_sr_state.tolist() == lin.sr_state.tolist()
    assert loaded.grad_sr_state.tolist() == lin.sr_state.tolist()
