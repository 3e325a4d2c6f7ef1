"""Which backend ``auto`` runs, said in words (the convert summary), and the warning when a GPU
gets the pure-PyTorch reference backend because Triton cannot run."""

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_nvfp4
import hf_nvfp4.backends.native
import hf_nvfp4.kernels
from hf_nvfp4 import backends


def test_the_convert_summary_says_which_backend_runs():
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2))
    summary = hf_nvfp4.convert(model, {"first_bf16_blocks": 0, "last_bf16_blocks": 0},
                               verbose=False)
    line = summary.table().splitlines()[-1]
    if torch.cuda.is_available():
        assert line == "  backend: auto: triton on CUDA devices, reference on the CPU"
    else:
        assert line == ("  backend: auto: reference (pure PyTorch; no CUDA device, the "
                        "Triton kernels need one)")
    assert backends.describe_backend("reference") == "reference"


def test_auto_on_a_gpu_without_triton_warns_once_with_the_reason(monkeypatch):
    why = "triton is not installed; pip install 'triton>=3.2'"
    monkeypatch.setattr(hf_nvfp4.kernels, "is_triton_available", lambda: (False, why))
    # cuda:3 need not exist: the hardware probe answers as on a Hopper GPU
    monkeypatch.setattr(hf_nvfp4.backends.native, "is_native_fp4_available",
                        lambda device: (False, "compute capability 9.0 < 10.0"))
    monkeypatch.setattr(backends, "_RESOLVED", {})
    with pytest.warns(UserWarning, match="runs the reference backend on cuda:3") as caught:
        assert backends.resolve_backend("auto", "cuda:3") == "reference"
    assert why in str(caught[0].message) and "many times slower" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resolved once per device: no second warning
        assert backends.resolve_backend("auto", "cuda:3") == "reference"
    assert backends.resolve_backend("auto", "cpu") == "reference"


@pytest.mark.parametrize("value, wanted", [
    ("1", True), ("true", True), ("ON", True), ("yes", True), (" 1 ", True),
    ("0", False), ("", False), ("false", False), ("off", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, wanted):
    """``TRITON_INTERPRET=true`` makes Triton interpret; the availability check must agree
    (it used to accept only ``1`` and then asked for a CUDA device)."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert hf_nvfp4.kernels.interpret_requested() is wanted
    if wanted:
        ok, reason = hf_nvfp4.kernels.is_triton_available()
        assert ok and f"TRITON_INTERPRET={value}" in reason
