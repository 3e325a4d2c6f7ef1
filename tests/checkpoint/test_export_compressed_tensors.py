"""compressed-tensors export: decompresses through compressed-tensors and loads in plain
transformers (no hf_nvfp4 import) with our dequantized weights and logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from hf_nvfp4.checkpoint import (
    calibrate_input_amax,
    calibration_batches,
    export_compressed_tensors,
)
from hf_nvfp4.checkpoint.layers import iter_packed_layers

from .conftest import VOCAB, tiny_llama

ct = pytest.importorskip("compressed_tensors")


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from .conftest import nvfp4_llama

    model = nvfp4_llama()
    root = tmp_path_factory.mktemp("ct")
    amax = calibrate_input_amax(model, calibration_batches(vocab_size=VOCAB))
    export_compressed_tensors(model, root / "w4a4", input_amax=amax, fuse_global_scales=False)
    export_compressed_tensors(model, root / "w4a16", weight_only=True, fuse_global_scales=False)
    export_compressed_tensors(model, root / "fused", input_amax=amax)
    return model, root, amax


def test_config_is_what_compressed_tensors_parses(exports):
    from compressed_tensors.quantization import QuantizationConfig

    model, root, _ = exports
    qc = json.loads((root / "w4a4" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "nvfp4-pack-quantized"
    assert parsed.quantization_status == "compressed"
    group = parsed.config_groups["group_0"]
    assert group.weights.strategy == "tensor_group" and group.weights.group_size == 16
    assert group.input_activations.dynamic == "local"
    assert "lm_head" in qc["ignore"] and "model.layers.2.mlp.up_proj" in qc["ignore"]
    assert "model.layers.0.mlp.up_proj" not in qc["ignore"]
    qc16 = json.loads((root / "w4a16" / "config.json").read_text())["quantization_config"]
    assert qc16["config_groups"]["group_0"]["input_activations"] is None


def test_tensors_and_decompression_match_ours(exports):
    from compressed_tensors.compressors import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model, root, amax = exports
    t = _tensors(root / "w4a4")
    qc = json.loads((root / "w4a4" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    layers = list(iter_packed_layers(model))
    for layer in layers:
        n, q = layer.name, layer.weight
        assert torch.equal(t[f"{n}.weight_packed"], q.data)
        assert t[f"{n}.weight_scale"].dtype == torch.float8_e4m3fn
        assert t[f"{n}.weight_global_scale"].shape == (1,)
        # ENCODE scale: the reciprocal of our decode scale.
        torch.testing.assert_close(t[f"{n}.weight_global_scale"] * q.global_scale,
                                   torch.ones(1), rtol=1e-6, atol=0)
        torch.testing.assert_close(t[f"{n}.input_global_scale"],
                                   torch.tensor([2688.0 / amax[n]]), rtol=1e-6, atol=0)
        local = {k.rpartition(".")[2]: v for k, v in t.items() if k.rpartition(".")[0] == n}
        dense = NVFP4PackedCompressor.decompress(local, scheme)["weight"]
        torch.testing.assert_close(dense.float(), q.dequantize(), rtol=2**-8, atol=0)


def test_fused_groups_share_one_global_scale(exports):
    _, root, _ = exports
    t = _tensors(root / "fused")
    for block in (0, 1):
        p = f"model.layers.{block}"
        qkv = [t[f"{p}.self_attn.{x}_proj.weight_global_scale"] for x in "qkv"]
        assert all(torch.equal(qkv[0], g) for g in qkv)
        gu = [t[f"{p}.mlp.{x}_proj.weight_global_scale"] for x in ("gate", "up")]
        assert torch.equal(gu[0], gu[1])


CHILD = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    root, x = sys.argv[1], torch.load(sys.argv[2])
    out = {}
    for name in ("w4a16", "w4a4"):
        m = AutoModelForCausalLM.from_pretrained(f"{root}/{name}")
        with torch.no_grad():
            out[name] = m(x).logits.float()
    dense = AutoModelForCausalLM.from_pretrained(
        f"{root}/w4a16", quantization_config=CompressedTensorsConfig(dequantize=True))
    out["weights"] = {k: v.float() for k, v in dense.state_dict().items()}
    out["hf_nvfp4_imported"] = "hf_nvfp4" in sys.modules
    torch.save(out, sys.argv[3])
""")


def test_loads_in_plain_transformers_without_hf_nvfp4(exports, tokens, tmp_path):
    model, root, _ = exports
    torch.save(tokens, tmp_path / "x.pt")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(tmp_path / "x.pt"), str(tmp_path / "o.pt")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "o.pt")
    assert out["hf_nvfp4_imported"] is False
    # Weights: our dequantized values, in the BF16 of the export.
    ours = {layer.name: layer.weight.dequantize() for layer in iter_packed_layers(model)}
    for name, w in ours.items():
        torch.testing.assert_close(out["weights"][f"{name}.weight"], w, rtol=2**-8, atol=0)
    # NVFP4A16 logits: a BF16 Llama holding our dequantized weights.
    ref = tiny_llama().to(torch.bfloat16)
    with torch.no_grad():
        for name, w in ours.items():
            ref.get_submodule(name).weight.copy_(w)
        ref_logits = ref(tokens).logits.float()
    rel = (out["w4a16"] - ref_logits).norm() / ref_logits.norm()
    assert rel < 2e-2, rel
    # W4A4 (static calibrated input scales there, dynamic ones here): close to ours.
    with torch.no_grad():
        ours_logits = model(tokens).logits
    rel4 = (out["w4a4"] - ours_logits).norm() / ours_logits.norm()
    assert torch.isfinite(out["w4a4"]).all() and rel4 < 0.3, rel4
