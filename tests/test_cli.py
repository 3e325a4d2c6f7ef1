"""The hf-nvfp4 CLI end to end: quantize, export, inspect, errors, eval registration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_nvfp4.cli import build_parser, main


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("cli") / "plain"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def native(plain) -> Path:
    out = plain.parent / "native"
    rc = main(["quantize", str(plain), str(out), "--first-bf16-blocks", "0",
               "--last-bf16-blocks", "1", "--masters"])
    assert rc == 0
    return out


def test_quantize_native(native):
    qc = json.loads((native / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "hf_nvfp4" and qc["checkpoint_format"] == "packed"
    assert (native / "masters.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(native)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "NVFP4PackedLinear"


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
@pytest.mark.parametrize("weight_only", [False, True])
def test_export_formats(native, fmt, weight_only, tmp_path):
    out = tmp_path / fmt
    argv = ["export", str(native), str(out), "--format", fmt]
    assert main(argv + (["--weight-only"] if weight_only else [])) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == ("modelopt" if fmt == "modelopt" else "compressed-tensors")
    assert (out / "hf_quant_config.json").is_file() == (fmt == "modelopt")


def test_quantize_straight_to_an_export(plain, tmp_path):
    out = tmp_path / "ct"
    assert main(["quantize", str(plain), str(out), "--format", "compressed-tensors",
                 "--first-bf16-blocks", "0", "--last-bf16-blocks", "0",
                 "--max-shard-size", "50KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file()


def test_inspect_table_and_json(native, capsys):
    assert main(["inspect", str(native)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.0.mlp.up_proj" in table and "nvfp4" in table and "vs" in table
    assert "for an NVFP4 row, the packed weight against its FP32 master, '-' when" in table
    assert main(["inspect", str(native), "--json", "--no-snr"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "hf_nvfp4-packed"
    layer = next(r for r in report["layers"] if r["name"] == "model.layers.0.mlp.up_proj")
    assert layer["shape"] == [128, 64] and layer["format"] == "nvfp4"
    assert layer["nbytes"] == 128 * 32 + 128 * 4 + 4
    assert layer["snr_db"] > 10  # against the saved FP32 master
    assert report["total_bytes"] < report["bf16_bytes"]


def test_errors_exit_nonzero(plain, tmp_path, capsys):
    assert main(["export", str(plain), str(tmp_path / "x")]) == 2
    assert "no quantization_config" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 2


def test_masters_only_for_native(native, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # refused before anything is loaded
        main(["export", str(native), str(tmp_path / "m"), "--format", "modelopt", "--masters"])
    assert exit_info.value.code == 2
    assert "--masters applies to --format native only" in capsys.readouterr().err


def test_export_native_with_masters_from_a_packed_source_keeps_them(native, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "again"
    assert main(["export", str(native), str(out), "--format", "native", "--masters"]) == 0
    before = load_file(native / "masters.safetensors")
    after = load_file(out / "masters.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_eval_commands_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"export", "inspect", "quantize", "eval", "compare"} <= set(sub.choices)


def test_module_entry_point(native):
    proc = subprocess.run([sys.executable, "-m", "hf_nvfp4.cli", "inspect", str(native),
                           "--no-snr"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NVFP4 layers" in proc.stdout
