"""A torch-only core: what each import pulls in, lazy public names, and the quantizer
registration with transformers whichever package is imported first.

Imports are checked in fresh interpreters (``sys.modules`` of this process already holds
everything). Import times are measured in bench/README.md, not asserted here.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_nvfp4
from hf_nvfp4 import NVFP4Config

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("transformers", "accelerate")
QCFG = dict(first_bf16_blocks=0, last_bf16_blocks=0, backend="reference")


def _python(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter; its stdout (the test fails on a non-zero exit)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _imported(cmd: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``cmd`` (a Python program) with -X importtime; the top-level packages it imported."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    names = {line.rsplit("|", 1)[1].strip().split(".")[0]
             for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "hf_nvfp4" in names, proc.stderr[-3000:]
    return proc, names


@pytest.mark.parametrize("module", ["hf_nvfp4", "hf_nvfp4.numerics", "hf_nvfp4.kernels",
                                    "hf_nvfp4.quant", "hf_nvfp4.backends", "hf_nvfp4.nn",
                                    "hf_nvfp4.recipe"])
def test_core_imports_without_transformers(module):
    out = _python(f"""
        import json, sys
        import {module}
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
    """)
    assert json.loads(out) == []


def test_package_import_needs_no_torch():
    out = _python("import sys, hf_nvfp4; print('torch' in sys.modules)")
    assert out.strip() == "False"


def test_submodules_are_reachable_as_attributes():
    out = _python("""
        import sys, hf_nvfp4
        print(sorted(hf_nvfp4.recipe.PRESETS) == sorted(hf_nvfp4.PRESETS))
        print(hasattr(hf_nvfp4, "no_such_module"), "transformers" in sys.modules)
    """)
    assert out.split() == ["True", "False", "False"]


@pytest.mark.parametrize("cmd", [
    pytest.param([str(Path(sys.executable).with_name("hf-nvfp4")), "--help"], id="script"),
    pytest.param([sys.executable, "-m", "hf_nvfp4.cli", "--help"], id="module"),
    pytest.param([sys.executable, "-m", "hf_nvfp4.cli", "eval", "--help"], id="eval-help"),
])
def test_cli_help_imports_neither_transformers_nor_torch(cmd):
    if not Path(cmd[0]).is_file():
        pytest.skip("the hf-nvfp4 console script is not installed")
    proc, names = _imported(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: hf-nvfp4")
    assert names.isdisjoint({*HEAVY, "torch"})


def test_lazy_names_resolve_and_are_listed():
    assert set(hf_nvfp4.__all__) == {*hf_nvfp4._LAZY, "__version__"}
    assert set(hf_nvfp4.__all__) <= set(dir(hf_nvfp4))
    for name, module in hf_nvfp4._LAZY.items():
        assert getattr(hf_nvfp4, name) is getattr(sys.modules[f"hf_nvfp4.{module}"], name)
    assert hf_nvfp4.convert.__name__ == "convert"  # the function, not the submodule
    with pytest.raises(AttributeError, match="no_such_name"):
        hf_nvfp4.no_such_name  # noqa: B018


def test_type_checking_imports_match_the_lazy_table():
    """The ``if TYPE_CHECKING`` imports (for IDEs, type checkers) name what ``_LAZY`` does."""
    tree = ast.parse(Path(hf_nvfp4.__file__).read_text())
    block = next(node for node in tree.body
                 if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    static = {alias.name: node.module for node in block.body for alias in node.names}
    assert static == hf_nvfp4._LAZY


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny plain Llama and the same model saved as an hf_nvfp4 checkpoint."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    root = tmp_path_factory.mktemp("imports")
    LlamaForCausalLM(cfg).save_pretrained(root / "plain")
    model = AutoModelForCausalLM.from_pretrained(root / "plain",
                                                 quantization_config=NVFP4Config(**QCFG))
    model.save_pretrained(root / "nvfp4")
    assert json.loads((root / "nvfp4" / "config.json").read_text())[
        "quantization_config"]["quant_method"] == "hf_nvfp4"
    return root / "plain", root / "nvfp4"


@pytest.mark.parametrize("first", ["hf_nvfp4", "transformers"])
def test_registration_in_either_import_order(checkpoints, first):
    """``import hf_nvfp4`` registers the method whether transformers comes before or after.

    The saved checkpoint loads first, before anything touches ``hf_nvfp4.NVFP4Config``: its
    config.json alone names the method.
    """
    plain, saved = checkpoints
    imports = ["import hf_nvfp4",
               "from transformers import AutoModelForCausalLM"]
    if first == "transformers":
        imports.reverse()
    out = _python("\n".join(imports) + textwrap.dedent(f"""
        import json, sys
        from types import ModuleType

        before = "transformers.quantizers.auto" in sys.modules
        counts = {{}}
        model = AutoModelForCausalLM.from_pretrained(sys.argv[2])
        counts["saved"] = sum(isinstance(m, hf_nvfp4.NVFP4Linear) for m in model.modules())
        model = AutoModelForCausalLM.from_pretrained(
            sys.argv[1], quantization_config=hf_nvfp4.NVFP4Config(**{QCFG!r}))
        counts["plain"] = sum(isinstance(m, hf_nvfp4.NVFP4Linear) for m in model.modules())
        from hf_nvfp4._registration import _Finder
        print(json.dumps({{
            "before": before,
            "counts": counts,
            "hook_left": any(isinstance(f, _Finder) for f in sys.meta_path),
            "convert_is_function": not isinstance(hf_nvfp4.convert, ModuleType),
        }}))
    """), str(plain), str(saved))
    result = json.loads(out.strip().splitlines()[-1])
    # transformers 5 imports its quantizer registry lazily, after `import transformers`: the
    # hook, not the immediate registration, is what these two orders exercise.
    assert result["before"] is False
    assert result["counts"] == {"saved": 14, "plain": 14}
    assert result["hook_left"] is False
    assert result["convert_is_function"] is True


def test_registers_at_once_when_transformers_registry_is_loaded():
    out = _python("""
        import sys
        import transformers.quantizers.auto as auto
        import hf_nvfp4
        from hf_nvfp4.hf_quantizer import NVFP4HfQuantizer
        print(auto.AUTO_QUANTIZER_MAPPING["hf_nvfp4"] is NVFP4HfQuantizer)
        print(auto.AUTO_QUANTIZATION_CONFIG_MAPPING["hf_nvfp4"] is hf_nvfp4.NVFP4Config)
    """)
    assert out.split() == ["True", "True"]


def test_everything_but_the_triton_backend_works_without_triton(checkpoints):
    """Triton is an optional extra (macOS, CPU-only installs): without it, ``import hf_nvfp4``
    must not break transformers' quantizer registry, NVFP4 models load, convert (MoE experts
    too) and train on the reference backend that ``auto`` resolves to, and asking for the
    triton backend names the missing package."""
    plain, saved = checkpoints
    out = _python("""
        import json, sys
        sys.modules["triton"] = None  # import triton raises ModuleNotFoundError
        import torch
        import hf_nvfp4
        from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            sys.argv[1], quantization_config=hf_nvfp4.NVFP4Config(
                first_bf16_blocks=0, last_bf16_blocks=0, backend="auto"))
        ids = torch.randint(0, 128, (2, 32))
        model(input_ids=ids, labels=ids).loss.backward()
        lin = next(m for m in model.modules() if isinstance(m, hf_nvfp4.NVFP4Linear))
        saved = AutoModelForCausalLM.from_pretrained(sys.argv[2])
        moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_experts=4,
            num_experts_per_tok=2))
        summary = hf_nvfp4.convert(moe, {"first_bf16_blocks": 0, "last_bf16_blocks": 0},
                                   verbose=False)
        moe(input_ids=ids, labels=ids).loss.backward()
        try:
            hf_nvfp4.NVFP4Linear(32, 32, backend="triton")(torch.randn(2, 32))
            error = None
        except RuntimeError as exc:
            error = str(exc)
        print(json.dumps({
            "backend": lin.plan().backend,
            "grad": lin.weight.grad is not None and bool(lin.weight.grad.abs().sum() > 0),
            "saved": sum(isinstance(m, hf_nvfp4.NVFP4Linear) for m in saved.modules()),
            "experts": len(list(hf_nvfp4.experts.iter_nvfp4_experts(moe))),
            "error": error,
            "triton": sys.modules["triton"] is None,
        }))
    """, str(plain), str(saved))
    result = json.loads(out.strip().splitlines()[-1])
    assert result["backend"] == "reference" and result["grad"] and result["saved"] == 14
    assert result["experts"] == 1 and result["triton"]
    assert "triton is not installed" in result["error"], result["error"]
