"""compressed-tensors export: decompresses through compressed-tensors and loads in plain
transformers (no hf_nvfp4 import) with our dequantized weights and logits.

Conventions checked against compressed-tensors 0.20.1 (``ModelCompressor.update_config``,
``NVFP4PackedCompressor``, ``generate_gparam``) and Transformer Engine's S_enc = 2688 / amax.
"""

from __future__ import annotations

import json
import logging
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
    load_packed,
    save_packed,
)
from hf_nvfp4.checkpoint.export_compressed_tensors import compressed_tensors_config, encode_scale
from hf_nvfp4.checkpoint.fusion import fuse_global_scales, fused_groups
from hf_nvfp4.checkpoint.layers import iter_packed_layers

from .conftest import VOCAB, tiny_llama

ct = pytest.importorskip("compressed_tensors")

FP4_FP8 = torch.tensor(448.0 * 6.0)


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


@pytest.mark.parametrize("weight_only", [False, True])
def test_config_is_what_the_library_writes(exports, tmp_path, weight_only):
    """config.json's entry equals ModelCompressor.update_config's for the preset scheme."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    _, root, _ = exports
    ours = json.loads((root / ("w4a16" if weight_only else "w4a4") / "config.json")
                      .read_text())["quantization_config"]
    scheme = preset_name_to_scheme("NVFP4A16" if weight_only else "NVFP4", ["Linear"])
    scheme.format = "nvfp4-pack-quantized"
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=scheme.format,
                                quantization_status="compressed", ignore=ours["ignore"])
    (tmp_path / "config.json").write_text("{}")
    ModelCompressor(quantization_config=config).update_config(str(tmp_path))
    theirs = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert ours == theirs
    for old in ("actorder", "block_structure", "observer_kwargs"):
        assert old not in json.dumps(ours)
    assert "transform_config" in ours and "moe_sparsity_config" in ours
    # The fallback written without compressed-tensors is the same (but for the version).
    fallback = compressed_tensors_config(ours["ignore"], weight_only, use_library=False)
    assert {**fallback, "version": ours["version"]} == ours


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
        # ENCODE scales as TE computes them: one FP32 division 2688 / amax (a tensor
        # quotient: ``2688.0 / tensor`` is reciprocal-then-multiply in torch), bit for bit;
        # the weight's decodes to our S_dec exactly (vLLM's 1 / weight_global_scale).
        w_amax = layer.module.weight.detach().float().abs().amax()
        assert torch.equal(t[f"{n}.weight_global_scale"], (FP4_FP8 / w_amax).reshape(1))
        assert torch.equal(1.0 / t[f"{n}.weight_global_scale"], q.global_scale.reshape(1))
        x_amax = torch.tensor([amax[n]], dtype=torch.float32)
        assert torch.equal(t[f"{n}.input_global_scale"], FP4_FP8 / x_amax)
        local = {k.rpartition(".")[2]: v for k, v in t.items() if k.rpartition(".")[0] == n}
        dense = NVFP4PackedCompressor.decompress(local, scheme)["weight"]
        torch.testing.assert_close(dense.float(), q.dequantize(), rtol=2**-8, atol=0)


def test_model_compressor_reads_our_bytes(exports):
    """compressed-tensors' own load path: apply the config to a fresh model, compress it,
    load our tensors (names, dtypes and shapes must be the ones it creates), decompress."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from transformers import CompressedTensorsConfig

    model, root, _ = exports
    qc = json.loads((root / "w4a16" / "config.json").read_text())["quantization_config"]
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(qc))
    ref = tiny_llama().to(torch.bfloat16)
    apply_quantization_config(ref, compressor.quantization_config)
    compressor.compress_model(ref)
    expected = ref.state_dict()
    ours = _tensors(root / "w4a16")
    assert set(expected) == set(ours)
    for key, value in ours.items():
        assert (value.dtype, value.shape) == (expected[key].dtype, expected[key].shape), key
    ref.load_state_dict(ours)
    for key, value in ref.state_dict().items():  # the bytes as loaded are ours
        assert torch.equal(value.view(torch.uint8), ours[key].view(torch.uint8)), key
    compressor.decompress_model(ref)
    for layer in iter_packed_layers(model):
        dense = ref.get_submodule(layer.name).weight
        torch.testing.assert_close(dense.float(), layer.weight.dequantize(), rtol=2**-8, atol=0)


def test_packed_model_encode_scale_inverts_exactly(model, tmp_path):
    """A packed checkpoint keeps S_dec only: the exported S_enc decodes to it bit for bit,
    and is TE's own value wherever fp32(1 / S_dec) is (most layers)."""
    save_packed(model, tmp_path / "packed", dtype=None)
    packed = load_packed(tmp_path / "packed")
    export_compressed_tensors(packed, tmp_path / "ct", weight_only=True,
                              fuse_global_scales=False)
    t = _tensors(tmp_path / "ct")
    for layer in iter_packed_layers(model):
        n, s_dec = layer.name, layer.weight.global_scale.reshape(1)
        assert torch.equal(1.0 / t[f"{n}.weight_global_scale"], s_dec)
        te = encode_scale(s_dec, float(layer.module.weight.detach().abs().amax()))
        if torch.equal(1.0 / s_dec, te):
            assert torch.equal(t[f"{n}.weight_global_scale"], te)


def test_encode_scale_refuses_an_amax_it_did_not_come_from():
    s_enc = torch.tensor(2688.0) / torch.tensor(0.5)
    assert torch.equal(encode_scale(1.0 / s_enc, 0.5), s_enc.reshape(1))
    with pytest.raises(ValueError, match="does not invert"):
        encode_scale(1.0 / s_enc, 0.25)


def test_fusion_reports_each_weight_change(exports, caplog):
    model, root, _ = exports
    layers = list(iter_packed_layers(model))
    own = {layer.name: layer.weight for layer in layers}
    fusion = fuse_global_scales(layers)
    groups = fused_groups([layer.name for layer in layers])
    assert {c.name for c in fusion.changes} == {n for g in groups for n in g}
    t = _tensors(root / "fused")
    for change in fusion.changes:
        # The figure is the largest change of the exported weight against the trained one.
        n = change.name
        new = next(x.weight for x in fusion.layers if x.name == n)
        assert torch.equal(t[f"{n}.weight_packed"], new.data)
        assert torch.equal(t[f"{n}.weight_scale"].view(torch.uint8), new.scale.view(torch.uint8))
        diff = (new.dequantize() - own[n].dequantize()).abs()
        assert change.max_abs_diff == float(diff.max())
        assert change.changed == int((diff != 0).sum()) and change.numel == diff.numel()
        assert change.shared_decode == float(new.global_scale)
        # The member holding the group's amax keeps its weights exactly; the others change.
        assert (change.max_abs_diff == 0) == (change.own_decode == change.shared_decode)
    assert max(c.max_abs_diff for c in fusion.changes) > 0
    with caplog.at_level(logging.INFO, logger="hf_nvfp4.checkpoint.fusion"):
        export_compressed_tensors(model, root / "again", weight_only=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_nvfp4.checkpoint.fusion"]
    assert lines[:-1] == [c.line() for c in fusion.changes]
    assert lines[-1].startswith("fused global scales:") and "max |dW|" in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_nvfp4.checkpoint.fusion"):
        export_compressed_tensors(model, root / "unfused", weight_only=True,
                                  fuse_global_scales=False)
    assert not [r for r in caplog.records if r.name == "hf_nvfp4.checkpoint.fusion"]


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
