"""Bad checkpoints fail loudly, naming the tensor and the file; never random weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_nvfp4.checkpoint import CheckpointError, export_compressed_tensors, load_packed, save_packed
from hf_nvfp4.checkpoint.checksums import checksum_verification

LAYER = "model.layers.0.mlp.up_proj"


@pytest.fixture
def ckpt(model, tmp_path):
    path = tmp_path / "ckpt"
    save_packed(model, path)
    return path


def _edit(path, fn) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _load_fails(path, *patterns: str) -> str:
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(path)
    msg = str(err.value)
    for p in patterns:
        assert p in msg, msg
    return msg


def test_missing_scale(ckpt):
    _edit(ckpt, lambda t: t.pop(f"{LAYER}.weight_scale"))
    _load_fails(ckpt, f"{LAYER}.weight_scale", "missing", "model.safetensors")


def test_missing_global_scale(ckpt):
    _edit(ckpt, lambda t: t.pop(f"{LAYER}.weight_global_scale"))
    _load_fails(ckpt, f"{LAYER}.weight_global_scale", "missing")


def test_misshapen_scale(ckpt):
    def cut(t):
        t[f"{LAYER}.weight_scale"] = t[f"{LAYER}.weight_scale"][:, :2].contiguous()

    _edit(ckpt, cut)
    _load_fails(ckpt, f"{LAYER}.weight_scale", "shape [128, 2]", "expected [128, 4]",
                "model.safetensors")


def test_wrong_scale_dtype(ckpt):
    def widen(t):
        t[f"{LAYER}.weight_scale"] = t[f"{LAYER}.weight_scale"].to(torch.bfloat16)

    _edit(ckpt, widen)
    _load_fails(ckpt, f"{LAYER}.weight_scale", "dtype BF16", "expected F8_E4M3")


def test_wrong_packed_dtype(ckpt):
    def widen(t):
        t[f"{LAYER}.weight_packed"] = t[f"{LAYER}.weight_packed"].to(torch.int32)

    _edit(ckpt, widen)
    _load_fails(ckpt, f"{LAYER}.weight_packed", "U8", "I32")


def test_packed_shape_disagrees_with_model(ckpt):
    def grow(t):
        t[f"{LAYER}.weight_packed"] = torch.zeros(128, 64, dtype=torch.uint8)
        t[f"{LAYER}.weight_scale"] = torch.zeros(128, 8, dtype=torch.float8_e4m3fn)

    _edit(ckpt, grow)
    _load_fails(ckpt, f"{LAYER}.weight_packed", "[128, 128] weight", LAYER)


def test_truncated_file(ckpt):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    _load_fails(ckpt, "truncated", "model.safetensors")
    with pytest.raises(CheckpointError, match="truncated"):
        load_packed(ckpt)


def test_missing_high_precision_tensor(ckpt):
    _edit(ckpt, lambda t: t.pop("model.norm.weight"))
    _load_fails(ckpt, "model.norm.weight", "missing", "randomly initialized")


def test_stray_scale_without_codes(ckpt):
    _edit(ckpt, lambda t: t.update({"lm_head.weight_scale": torch.zeros(256, 4).to(
        torch.float8_e4m3fn)}))
    _load_fails(ckpt, "lm_head.weight_scale", "no matching lm_head.weight_packed")


def test_tensors_of_another_format(ckpt):
    _edit(ckpt, lambda t: t.update({f"{LAYER}.weight_scale_2": torch.ones(())}))
    _load_fails(ckpt, f"{LAYER}.weight_scale_2", "ModelOpt")


def test_checkpoint_of_another_method(model, tmp_path):
    export_compressed_tensors(model, tmp_path / "ct", weight_only=True)
    with pytest.raises(CheckpointError, match="'compressed-tensors', not 'hf_nvfp4'"):
        load_packed(tmp_path / "ct")
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["quantization_config"]
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load_packed(plain)


def test_master_config_over_packed_tensors(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "master"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _load_fails(ckpt, ".weight_packed", "checkpoint_format 'master'")


def test_master_checkpoint_missing_weight(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(file))
    tensors.pop(f"{LAYER}.weight")
    save_file(tensors, str(file), metadata={"format": "pt"})
    _load_fails(tmp_path / "m", f"{LAYER}.weight", "missing")


def test_flipped_bytes_in_codes_fail_the_checksum(ckpt):
    from hf_nvfp4.checkpoint.shards import read_header

    info = read_header(ckpt / "model.safetensors")[f"{LAYER}.weight_packed"]
    file = ckpt / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[info.offsets[0] + 10] ^= 0xFF
    file.write_bytes(bytes(data))
    _load_fails(ckpt, f"{LAYER}.weight_packed", f"layer {LAYER!r}", "checksum", "corrupted")
    with pytest.raises(CheckpointError, match="checksum"):
        load_packed(ckpt)
    # either switch skips the hashing: load_packed's argument, or the context around it
    load_packed(ckpt, verify_checksums=False)
    with checksum_verification(False):
        load_packed(ckpt)
        AutoModelForCausalLM.from_pretrained(ckpt)
    with checksum_verification(False), pytest.raises(CheckpointError, match="checksum"):
        load_packed(ckpt, verify_checksums=True)


def test_nan_block_scale_is_refused_naming_layer_and_tensor(ckpt):
    def poison(t):
        scale = t[f"{LAYER}.weight_scale"].view(torch.uint8).clone()
        scale[3, 1] = 0x7F
        t[f"{LAYER}.weight_scale"] = scale.view(torch.float8_e4m3fn)

    _edit(ckpt, poison)
    _load_fails(ckpt, f"{LAYER}.weight_scale", "checksum")  # the manifest catches it first
    with pytest.raises(CheckpointError) as err:
        load_packed(ckpt, verify_checksums=False)  # and the value check without it
    msg = str(err.value)
    assert f"layer {LAYER!r}" in msg and f"{LAYER}.weight_scale" in msg and "1 NaN" in msg
    assert "[3, 1]" in msg and "model.safetensors" in msg


def test_nan_global_scale_is_refused(ckpt):
    _edit(ckpt, lambda t: t.update({f"{LAYER}.weight_global_scale": torch.tensor(float("nan"))}))
    with pytest.raises(CheckpointError, match=rf"'{LAYER}.weight_global_scale'.* is nan"):
        load_packed(ckpt, verify_checksums=False)


def test_checkpoint_without_manifest_loads_with_a_warning(ckpt, caplog):
    (ckpt / "hf_nvfp4_checksums.json").unlink()
    with caplog.at_level("WARNING", logger="hf_nvfp4.checkpoint.checksums"):
        load_packed(ckpt)
    assert "not verified" in caplog.text


def test_save_packed_says_when_it_rounds_to_bf16(model, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="hf_nvfp4.checkpoint.packed"):
        save_packed(model, tmp_path / "bf16")
    assert "(float32) are stored as bfloat16" in caplog.text and "dtype=None" in caplog.text
    assert "--dtype float32" in caplog.text  # the CLI spelling too
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_nvfp4.checkpoint.packed"):
        save_packed(model, tmp_path / "exact", dtype=None)
    assert "stored as" not in caplog.text
