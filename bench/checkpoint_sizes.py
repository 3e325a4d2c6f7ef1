"""Checkpoint sizes of a ~100M-parameter Llama: BF16 vs packed NVFP4 formats, plus interop.

Builds a random-init Llama (hidden 768, 12 layers, intermediate 2048, vocab 32000), converts it
with every block quantized and with the default NVFP4Config split, and saves it as plain BF16,
native packed, compressed-tensors (W4A4, calibrated) and ModelOpt. The compressed-tensors
exports are then loaded by plain transformers in a subprocess that never imports hf_nvfp4.

    python -m bench.checkpoint_sizes [--out bench/results/checkpoint_sizes.json]

(run as a module from the repository root, not as a script: bench/ on sys.path would put the
benchmark scripts ahead of installed packages; this is also why the kernel benchmark is
bench/kernel_speed.py, not bench/kernels.py, which would shadow the ``kernels`` package that
transformers imports)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_nvfp4
from hf_nvfp4 import NVFP4Config
from hf_nvfp4.checkpoint import (
    calibrate_input_amax,
    calibration_batches,
    export_compressed_tensors,
    export_modelopt,
    save_packed,
)
from hf_nvfp4.checkpoint.fusion import share_global_scales
from hf_nvfp4.checkpoint.layers import iter_packed_layers

CHILD = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    x = torch.load(sys.argv[2])
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    with torch.no_grad():
        logits = m(x).logits.float()
    torch.save({"logits": logits, "hf_nvfp4": "hf_nvfp4" in sys.modules}, sys.argv[3])
""")


def dir_bytes(path: Path) -> int:
    """Bytes of the weight files (safetensors) of a checkpoint directory."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def plain_load_logits(path: Path, tokens: torch.Tensor, work: Path) -> tuple[bool, torch.Tensor]:
    """Logits of ``path`` loaded by plain transformers in a subprocess (no hf_nvfp4)."""
    torch.save(tokens, work / "x.pt")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(work / "x.pt"),
                           str(work / "o.pt")], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return False, torch.empty(0)
    out = torch.load(work / "o.pt")
    return not out["hf_nvfp4"], out["logits"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/checkpoint_sizes.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                      max_position_embeddings=512)
    base = LlamaForCausalLM(cfg).eval()
    n_params = sum(p.numel() for p in base.parameters())
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    results: dict = {
        "model": {"params": n_params, **{k: getattr(cfg, k) for k in (
            "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")}},
        "device": "CPU", "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "splits": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        copy.deepcopy(base).to(torch.bfloat16).save_pretrained(root / "bf16")
        bf16 = dir_bytes(root / "bf16")
        results["bf16_bytes"] = bf16
        splits = {"all_blocks": NVFP4Config(first_bf16_blocks=0, last_bf16_blocks=0),
                  "default_split": NVFP4Config()}
        for split, config in splits.items():
            model = _prepared(base, config)
            summary = model.hf_quantizer.summary
            amax = calibrate_input_amax(model, calibration_batches(vocab_size=cfg.vocab_size))
            entry = {"quantized_layers": len(summary.quantized_layers),
                     "bf16_blocks": list(summary.bf16_blocks), "formats": {}}
            writers = {
                "native": lambda p, m=model: save_packed(m, p),
                "native+masters": lambda p, m=model: save_packed(m, p, masters=True),
                "compressed-tensors": lambda p, m=model, a=amax: export_compressed_tensors(
                    m, p, input_amax=a),
                "compressed-tensors-w4a16": lambda p, m=model: export_compressed_tensors(
                    m, p, weight_only=True),
                "modelopt": lambda p, m=model, a=amax: export_modelopt(m, p, input_amax=a),
            }
            for name, write in writers.items():
                path = root / split / name
                write(path)
                size = dir_bytes(path)
                entry["formats"][name] = {"bytes": size, "ratio_vs_bf16": round(size / bf16, 4)}
            entry["interop"] = _interop(model, root / split, tokens, cfg)
            results["splits"][split] = entry
            print(json.dumps({split: entry}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def _prepared(base: LlamaForCausalLM, config: NVFP4Config) -> LlamaForCausalLM:
    model = copy.deepcopy(base)
    hf_nvfp4.prepare_model(model, config)
    return model.eval()


def _interop(model, root: Path, tokens: torch.Tensor, cfg: LlamaConfig) -> dict:
    """compressed-tensors exports in plain transformers vs our logits."""
    with torch.no_grad():
        ours = model(tokens).logits.float()
        ref16 = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        ref16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()
                               if not k.endswith("sr_state")})
        for layer in share_global_scales(list(iter_packed_layers(model))):
            ref16.get_submodule(layer.name).weight.copy_(layer.weight.dequantize())
        ours_w4a16 = ref16(tokens).logits.float()
    out = {}
    for name, ref in (("compressed-tensors", ours), ("compressed-tensors-w4a16", ours_w4a16)):
        ok, logits = plain_load_logits(root / name, tokens, root)
        entry = {"loads_without_hf_nvfp4": ok}
        if ok:
            entry["logits_max_abs_diff"] = float((logits - ref).abs().max())
            entry["logits_rel_l2_diff"] = float((logits - ref).norm() / ref.norm())
            entry["ref_logits_max_abs"] = float(ref.abs().max())
        out[name] = entry
    out["reference"] = {
        "compressed-tensors": "our W4A4 model (FP32, dynamic activation global scale)",
        "compressed-tensors-w4a16": "BF16 Llama holding our dequantized NVFP4 weights "
        "(as exported: q/k/v and gate/up with a shared global scale)",
    }
    return out


if __name__ == "__main__":
    main()
