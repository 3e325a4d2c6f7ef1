"""ModelOpt NVFP4 export: exactly what vLLM's ModelOpt NVFP4 loader checks.

From vllm/model_executor/layers/quantization/modelopt.py (ModelOptQuantConfigBase.from_config,
ModelOptNvFp4Config._from_config, ModelOptNvFp4LinearMethod / W4A16 create_weights and
process_weights_after_loading) and vllm/config/model.py (_normalize_quantization_config).
"""

from __future__ import annotations

import fnmatch
import json

import pytest
import torch
from safetensors import safe_open

from hf_nvfp4.checkpoint import calibrate_input_amax, calibration_batches, export_modelopt
from hf_nvfp4.checkpoint.fusion import fused_groups, share_global_scales
from hf_nvfp4.checkpoint.layers import iter_packed_layers
from hf_nvfp4.numerics import e2m1

from .conftest import VOCAB, nvfp4_llama

VLLM_QUANT_ALGOS = {"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4",
                    "MXFP8", "MIXED_PRECISION"}
VLLM_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = nvfp4_llama()
    root = tmp_path_factory.mktemp("mo")
    amax = calibrate_input_amax(model, calibration_batches(vocab_size=VOCAB))
    export_modelopt(model, root / "w4a4", input_amax=amax)
    export_modelopt(model, root / "w4a16", weight_only=True)
    export_modelopt(model, root / "exact", input_amax=amax, fuse_global_scales=False)
    return model, root, amax


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _excluded(prefix: str, exclude: list[str]) -> bool:
    """vLLM's is_layer_excluded (exact, fused shards, substring, wildcard)."""
    head, _, leaf = prefix.rpartition(".")
    if leaf in VLLM_FUSED:
        shards = [f"{head}.{s}" in exclude for s in VLLM_FUSED[leaf]]
        if len(set(shards)) != 1:
            raise ValueError(f"fused {prefix}: shards disagree on exclusion {shards}")
        if shards[0]:
            return True
    elif prefix in exclude:
        return True
    return any(e in prefix or fnmatch.fnmatch(prefix, e) for e in exclude)


@pytest.mark.parametrize("variant,algo", [("w4a4", "NVFP4"), ("w4a16", "W4A16_NVFP4")])
def test_hf_quant_config(exported, variant, algo):
    _, root, _ = exported
    hq = json.loads((root / variant / "hf_quant_config.json").read_text())
    assert hq["producer"]["name"] == "modelopt" and "version" in hq["producer"]
    q = hq["quantization"]
    for key in ("group_size", "kv_cache_quant_algo", "exclude_modules"):
        assert key in q, key
    assert q["quant_algo"].upper() == algo and q["quant_algo"].upper() in VLLM_QUANT_ALGOS
    assert q["kv_cache_quant_algo"] is None and q["group_size"] == 16
    assert isinstance(q["exclude_modules"], list)
    qc = json.loads((root / variant / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"].lower().startswith("modelopt")
    assert "FP4" in str(qc["quantization"]["quant_algo"]).upper()  # -> "modelopt_fp4"


@pytest.mark.parametrize("variant", ["w4a4", "w4a16"])
def test_tensors_match_vllm_create_weights(exported, variant):
    model, root, _ = exported
    t = _tensors(root / variant)
    exclude = json.loads((root / variant / "hf_quant_config.json").read_text())[
        "quantization"]["exclude_modules"]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    n_quantized = 0
    for name, mod in linears.items():
        head, _, leaf = name.rpartition(".")
        fused = next((f for f, s in VLLM_FUSED.items() if leaf in s), None)
        prefix = f"{head}.{fused}" if fused else name
        if _excluded(prefix, exclude):
            assert t[f"{name}.weight"].dtype == torch.bfloat16
            assert f"{name}.weight_scale" not in t
            continue
        n_quantized += 1
        out_f, in_f = mod.out_features, mod.in_features
        assert in_f % 16 == 0
        assert t[f"{name}.weight"].dtype == torch.uint8
        assert t[f"{name}.weight"].shape == (out_f, in_f // 2)
        assert t[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
        assert t[f"{name}.weight_scale"].shape == (out_f, in_f // 16)
        assert t[f"{name}.weight_scale_2"].dtype == torch.float32
        assert t[f"{name}.weight_scale_2"].numel() == 1
        if variant == "w4a4":
            assert t[f"{name}.input_scale"].dtype == torch.float32
            assert t[f"{name}.input_scale"].numel() == 1
        else:
            assert f"{name}.input_scale" not in t
    assert n_quantized == 14


def test_fused_shards_share_scales(exported):
    _, root, _ = exported
    t = _tensors(root / "w4a4")
    names = [k[: -len(".weight_scale_2")] for k in t if k.endswith(".weight_scale_2")]
    groups = fused_groups(names)
    assert len(groups) == 4
    for members in groups:
        for suffix in ("weight_scale_2", "input_scale"):
            values = {float(t[f"{m}.{suffix}"]) for m in members}
            assert len(values) == 1, (members, suffix, values)


def test_values_are_ours(exported):
    model, root, amax = exported
    t = _tensors(root / "exact")
    fused = _tensors(root / "w4a4")
    shared = {x.name: x.weight for x in share_global_scales(list(iter_packed_layers(model)))}
    for layer in iter_packed_layers(model):
        n, q = layer.name, layer.weight
        deq = (e2m1.decode(e2m1.unpack(t[f"{n}.weight"]))
               * t[f"{n}.weight_scale"].float().repeat_interleave(16, -1)
               * t[f"{n}.weight_scale_2"])
        assert torch.equal(deq, q.dequantize())
        # weight_scale_2: our decode scale 1 / S_enc, S_enc = 2688 / amax (TE), bit for bit.
        s_enc = torch.tensor(2688.0) / layer.module.weight.detach().float().abs().amax()
        assert t[f"{n}.weight_scale_2"].shape == () and torch.equal(
            t[f"{n}.weight_scale_2"], torch.tensor(1.0) / s_enc)
        # input_scale: ModelOpt's decode scale fp32(amax / 2688), bit for bit.
        assert torch.equal(t[f"{n}.input_scale"],
                           torch.tensor(amax[n], dtype=torch.float32) / 2688.0)
        assert torch.equal(fused[f"{n}.weight"], shared[n].data)


def test_fusion_keeps_the_leader_exact(exported):
    _, root, _ = exported
    exact, fused = _tensors(root / "exact"), _tensors(root / "w4a4")
    names = [k[: -len(".weight_scale_2")] for k in exact if k.endswith(".weight_scale_2")]
    for members in fused_groups(names):
        leader = max(members, key=lambda m: float(exact[f"{m}.weight_scale_2"]))
        assert torch.equal(fused[f"{leader}.weight"], exact[f"{leader}.weight"])
        assert torch.equal(fused[f"{leader}.weight_scale_2"], exact[f"{leader}.weight_scale_2"])
