"""hf_nvfp4.compile_blocks and hf_nvfp4.Trainer(compile_blocks=...): decoder blocks compiled in
place train bit for bit as eager, and under CUDA graphs every forward starts a graph step.

On the CPU ``aot_eager`` traces without generating code; the CUDA-graph speed is measured by
bench/e2e.py and bench/trainer_speed.py on the GPU.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_nvfp4
from hf_nvfp4 import NVFP4Trainer, NVFP4TrainingArguments, compile_blocks
from hf_nvfp4.compile import compiled_blocks_mode, uses_cuda_graphs
from hf_nvfp4.data import BlockDataset, byte_tokens, split_blocks, stdlib_corpus
from hf_nvfp4.kernels import is_triton_available

_OK, _WHY = is_triton_available()
# the Trainer tests run the reference backend: eager NVFP4 in milliseconds on the CPU (the
# Triton interpreter takes seconds)
RECIPE = {"first_bf16_blocks": 0, "last_bf16_blocks": 0, "backend": "reference"}


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))


def _compiled(block: torch.nn.Module) -> bool:
    return block._compiled_call_impl is not None


@pytest.mark.skipif(not _OK, reason=_WHY)
def test_compiled_blocks_train_as_eager():
    """Bit for bit, parameters included, on the triton backend (in the interpreter here),
    whose quantized GEMMs are custom ops that tracing leaves as they are."""
    eager, compiled = _model(), _model()
    for m in (eager, compiled):
        hf_nvfp4.convert(m, {**RECIPE, "backend": "triton"}, verbose=False)
    torch._dynamo.reset()
    assert compile_blocks(compiled, "default", backend="aot_eager", fullgraph=True) == 2
    assert all(_compiled(b) for b in compiled.model.layers) and not _compiled(compiled.model)
    assert compiled_blocks_mode(compiled) == "default" and not uses_cuda_graphs(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # names unchanged
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, compiled)]
    for _ in range(2):
        losses = []
        for model, opt in zip((eager, compiled), opts, strict=True):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        assert torch.equal(*losses)
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        assert torch.equal(a, b)


def test_compile_blocks_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        compile_blocks(_model(), "fast")
    with pytest.raises(ValueError, match="no decoder blocks found in Linear"):
        compile_blocks(torch.nn.Linear(4, 4))


@pytest.fixture(scope="module")
def data():
    train, val = split_blocks(byte_tokens(stdlib_corpus(30_000)), 32)
    return BlockDataset(train[:16]), BlockDataset(val[:8])


def _args(tmp_path, **kw) -> NVFP4TrainingArguments:
    return NVFP4TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=4,
        max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        data_seed=0, save_strategy="no", disable_tqdm=True, **kw)


def test_trainer_starts_a_graph_step_before_every_forward(tmp_path, data):
    """A model whose blocks run in CUDA graphs trains in the Trainer as eager, loss for loss
    (evaluation included), and the Trainer marks a new graph step before each training and
    evaluation step."""
    from torch._inductor.cudagraph_trees import MarkStepBox

    runs = {}
    for name in ("eager", "graphs"):
        model = _model()
        if name == "graphs":
            torch._dynamo.reset()
            compile_blocks(model, "reduce-overhead", backend="aot_eager")
        trainer = NVFP4Trainer(model=model, args=_args(tmp_path / name),
                               nvfp4=RECIPE,
                               train_dataset=data[0], eval_dataset=data[1])
        before = MarkStepBox.mark_step_counter
        trainer.train()
        metrics = trainer.evaluate()
        runs[name] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                      metrics["eval_loss"], before - MarkStepBox.mark_step_counter)
    assert runs["graphs"][:2] == runs["eager"][:2] and len(runs["eager"][0]) == 2
    assert runs["eager"][2] == 0 and runs["graphs"][2] == 2 + 2  # 2 train + 2 eval batches


def test_trainer_compile_blocks_option_and_its_conflicts(tmp_path):
    model = _model()
    trainer = NVFP4Trainer(model=model, args=_args(tmp_path, nvfp4_compile_blocks="default"),
                           nvfp4=RECIPE)
    assert all(_compiled(b) for b in trainer.model.model.layers)
    assert compiled_blocks_mode(model) == "default"
    with pytest.raises(ValueError, match="torch_compile both compile the model"):
        NVFP4Trainer(model=_model(), args=_args(tmp_path, torch_compile=True), nvfp4=RECIPE,
                     compile_blocks="default")
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        NVFP4Trainer(model=_model(), args=_args(tmp_path, gradient_checkpointing=True),
                     nvfp4=RECIPE, compile_blocks="reduce-overhead")
