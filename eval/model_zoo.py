"""Model-zoo coverage: which causal-LM architectures of the installed transformers train in NVFP4.

For every model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` this builds a tiny random model
on the CPU (FP32), checks that it trains in high precision, converts it with every block in
NVFP4 (``prepare_model``: the library's path that ``save_pretrained`` records), reports the
share of the blocks' matrix parameters that are NVFP4, trains two steps, saves, reloads with
``AutoModelForCausalLM.from_pretrained`` and compares the logits. Forwards run without a KV
cache (``use_cache=False``), as training does.

The share counts what :meth:`hf_nvfp4.ConversionSummary.block_matmul_share` counts: every
matmul weight of the blocks, MoE routers included (a router is a matmul weight that stays in
high precision by the usual rules: a bare parameter, or a Linear with ``num_experts`` outputs
that are not a multiple of 16), but not parameters used only elementwise (biases, Mamba's
``A_log``) nor convolutions. A converted layer whose weight the model uses outside the layer's
forward in the first training step (:mod:`hf_nvfp4.bypass`: Mamba's ``dt_proj.weight @ x``)
counts as high precision, as its matmul is.

Status per architecture:

* ``ok``: >= 99% of the block matrix parameters in NVFP4, finite losses, identical logits
  after the reload;
* ``partial``: trains and round-trips, but less than 99% in NVFP4 (the reasons are listed);
* ``fails``: convert, NVFP4 training or save/reload raised or went wrong (our problem);
* ``skipped``: encoder-decoder or multimodal, or the tiny model does not build or train even
  in high precision (not our problem).

Each architecture runs in its own subprocess with a timeout::

    python eval/model_zoo.py                  # all; writes eval/reports/model_zoo.{json,md}
    python eval/model_zoo.py --only llama,gpt2 --jobs 2 --output-dir /tmp/zoo
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REPORT_DIR = ROOT / "eval" / "reports"
OK_SHARE = 0.99
BATCH, SEQ, VOCAB, STEPS = 2, 16, 256, 2
NVFP4 = {"first_bf16_blocks": 0, "last_bf16_blocks": 0, "backend": "reference"}

# Size attributes shrunk wherever a config has them (set only when the defaults have them).
SHRINK: dict[str, Any] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "hidden_size_global"), 64),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"), 128),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("head_dim", "rotary_dim"), 16),
    "vocab_size": VOCAB,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx"), 128),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
                    4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk"), 2),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size",
                     "moe_shared_expert_intermediate_size", "expert_intermediate_size"), 32),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts"), 1),
    **dict.fromkeys(("first_k_dense_replace", "first_k_dense"), 0),
    **dict.fromkeys(("n_group", "topk_group"), 1),
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 32),
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"), 16),
    **dict.fromkeys(("sliding_window", "attention_window_size"), 8),
}
# Architectures the generic shrink cannot handle: extra config keyword arguments, each with
# its reason. Sizes that hidden_size 64 would make ragged are set so that the matmul
# dimensions are multiples of 16, as in the released checkpoints: the tiny model then
# measures what a real one gets, not an artifact of its size.
OVERRIDES: dict[str, dict[str, Any]] = {
    "bamba": {"attn_layer_indices": [1]},  # one Mamba and one attention block
    # DeepSeek V4's grouped o_a_proj takes heads * head_dim / o_groups features per group (8 at
    # 4 heads of 16 and the default 8 groups) into o_lora_rank (1024, not shrunk); released
    # models have 4096 -> 1024 per group.
    "deepseek_v4": {"o_groups": 2, "o_lora_rank": 32},
    # BLT: its byte-group hash embeddings default to 500,002 rows per group (3M x 64, minutes
    # per step on a CPU); the hash vocabulary size is no matmul dimension.
    "blt": {"encoder_hash_byte_group_vocab": 1024},
    # Mamba's dt rank is ceil(hidden / 16) ("auto"): 4 at hidden 64, so x_proj (d_inner ->
    # dt_rank + 2 * state) and dt_proj (dt_rank -> d_inner) are ragged; released checkpoints
    # have a rank that is a multiple of 16 (48 for hidden 768, 160 for 2560).
    "falcon_mamba": {"time_step_rank": 16},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "mamba_dt_rank": 16},  # as Mamba
    "mamba": {"time_step_rank": 16},
    "nemotron_h": {"layers_block_type": ["linear_attention", "full_attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "zamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    # Zamba2's in_proj emits d_inner + conv_dim + n_mamba_heads features: 8 heads (default)
    # make it ragged; the released Zamba2 models have 64, 80 or 112 heads (multiples of 16).
    "zamba2": {"hybrid_layer_ids": [1], "n_mamba_heads": 16},
}
# Composite configs whose sub-configs mean a multimodal model (the text model is listed too).
MULTIMODAL_SUB_CONFIGS = ("text_config", "vision_config", "audio_config", "vq_config",
                          "audio_encoder", "text_encoder", "audio_encoder_config")


def architectures() -> dict[str, str]:
    """``{model_type: causal-LM class name}`` of the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def not_decoder_only(model_type: str) -> str | None:
    """Why ``model_type`` is out of scope (encoder-decoder or multimodal), or None."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    if getattr(cls, "is_encoder_decoder", False):
        return "encoder-decoder model"
    subs = sorted(set(getattr(cls, "sub_configs", None) or {}) & set(MULTIMODAL_SUB_CONFIGS))
    if subs:
        return f"multimodal ({', '.join(subs)})"
    return None


def _shrunk(cls: Any, defaults: Any) -> dict[str, Any]:
    """Keyword arguments that shrink a config of class ``cls`` (defaults ``defaults``)."""
    derived = {k for k, v in vars(cls).items() if isinstance(v, property) and v.fset is None}
    kwargs = {k: v for k, v in SHRINK.items() if hasattr(defaults, k) and k not in derived}
    if hasattr(defaults, "kv_lora_rank"):  # multi-head latent attention: one K/V per head
        kwargs["num_key_value_heads"] = SHRINK["num_attention_heads"]
    layers = getattr(defaults, "num_hidden_layers", None)
    for key, value in vars(defaults).items():
        # Per-layer lists (layer_types, ...) follow the number of layers: the first entry and
        # the first one of another kind, so that hybrids keep e.g. one full-attention layer.
        if isinstance(value, list) and layers and len(value) == layers and key not in kwargs:
            kwargs[key] = [value[0], next((v for v in value if v != value[0]), value[-1])]
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(defaults, key, None)
        if isinstance(value, int) and value >= VOCAB:
            kwargs[key] = VOCAB - 1
        elif isinstance(value, list):
            kwargs[key] = [v for v in value if v < VOCAB] or None
    return kwargs


def tiny_config(model_type: str) -> Any:
    """The config class's defaults with every size attribute it has shrunk (see SHRINK).

    Sub-configs that are transformers of their own (BLT's patcher, local encoder, global
    transformer and local decoder) are shrunk the same way; then OVERRIDES apply.
    """
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    defaults = cls()
    kwargs = _shrunk(cls, defaults)
    for key, sub_cls in (getattr(cls, "sub_configs", None) or {}).items():
        sub_defaults = getattr(defaults, key, None)
        if hasattr(sub_defaults, "num_hidden_layers"):
            kwargs[key] = _shrunk(sub_cls, sub_defaults)
    kwargs.update(OVERRIDES.get(model_type, {}))
    return cls(**kwargs)


def _batch(seed: int) -> Any:
    import torch

    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _loss(model: Any, seed: int) -> float:
    """One forward/backward on random tokens (labels = inputs); the loss.

    Without a KV cache, as in training: some architectures cannot even build one (BLT's
    config has no ``num_hidden_layers`` for ``DynamicCache``).
    """
    ids = _batch(seed)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return float(loss.detach())


def _kept_reasons(summary: Any) -> dict[str, int]:
    """``{reason: parameters}`` of the block matrices that stayed in high precision."""
    kept: dict[str, int] = {}
    for d in [*summary.layers, *summary.other_matmuls]:
        if not d.quantized and not d.reason.startswith("outside the decoder blocks"):
            kept[d.reason] = kept.get(d.reason, 0) + d.params
    return dict(sorted(kept.items(), key=lambda kv: -kv[1]))


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _plain_round_trip_error(model_type: str) -> str | None:
    """The error of a high-precision save_pretrained/from_pretrained of the tiny model, if any."""
    from transformers import AutoModelForCausalLM

    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            AutoModelForCausalLM.from_config(tiny_config(model_type)).save_pretrained(tmp)
            AutoModelForCausalLM.from_pretrained(tmp)
    except Exception as exc:  # noqa: BLE001 - the architecture's own failure
        return _error(exc)
    return None


def _count_bypassed(model: Any, names: list[str], result: dict[str, Any]) -> None:
    """Move the layers whose weight the model used outside their forward (their matmul ran in
    high precision) from the NVFP4 share to the kept reasons."""
    if not names:
        return
    params = sum(p.numel() for n in names for p in model.get_submodule(n).parameters()
                 if p.dim() >= 2)
    result["quantized"] -= params
    result["share"] = result["quantized"] / result["total"]
    reason = f"weight used outside the layer's forward ({names[0].rpartition('.')[2]} ...)"
    result["kept"][reason] = params
    result["bypassed"] = names


def run_architecture(model_type: str) -> dict[str, Any]:
    """Build, train, convert, train, save and reload one architecture; its result record."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    import hf_nvfp4
    from hf_nvfp4.bypass import bypassed_layers, forward_counts

    transformers.logging.set_verbosity_error()
    logging.getLogger("hf_nvfp4").setLevel(logging.ERROR)
    model_class = architectures()[model_type]
    result: dict[str, Any] = {"model_type": model_type, "model_class": model_class,
                              "share": None, "quantized": None, "total": None, "reason": ""}

    def finish(status: str, reason: str = "") -> dict[str, Any]:
        return {**result, "status": status, "reason": reason}

    out_of_scope = not_decoder_only(model_type)
    if out_of_scope:
        return finish("skipped", out_of_scope)
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
        model.train()
        loss = _loss(model, 0)
        if not math.isfinite(loss):
            return finish("skipped", f"high-precision loss is {loss}")
    except Exception as exc:  # noqa: BLE001 - any failure here is the architecture's
        return finish("skipped", f"does not build/train tiny in FP32: {_error(exc)}")
    model.zero_grad(set_to_none=True)
    stage = "convert"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            hf_nvfp4.prepare_model(model, hf_nvfp4.NVFP4Config(**NVFP4))
        summary = model.hf_quantizer.summary
        quantized, total = summary.block_matmul_share()
        result.update(quantized=quantized, total=total, share=quantized / total if total else 0.0,
                      kept=_kept_reasons(summary))
        stage = "train"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        before = forward_counts(model)
        for step in range(STEPS):
            losses.append(_loss(model, 1 + step))
            if step == 0:
                _count_bypassed(model, bypassed_layers(model, before), result)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        result["losses"] = losses
        if not all(map(math.isfinite, losses)):
            return finish("fails", f"train: non-finite NVFP4 losses {losses}")
        stage = "reload"
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=_batch(9), use_cache=False).logits
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            model.save_pretrained(tmp)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
            with torch.no_grad():
                again = reloaded(input_ids=_batch(9), use_cache=False).logits
        if not torch.equal(logits, again):
            diff = float((logits - again).abs().max())
            return finish("fails", f"reload: logits differ after reload (max abs diff {diff:.3g})")
    except Exception as exc:  # noqa: BLE001 - recorded, with the stage
        plain = _plain_round_trip_error(model_type) if stage == "reload" else None
        if plain:
            return finish("skipped", f"does not save/reload even in FP32: {plain}")
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f" ({Path(frame.filename).name}:{frame.lineno})"
        return finish("fails", f"{stage}: {_error(exc)}{where}")
    if result["share"] >= OK_SHARE:
        return finish("ok")
    reasons = "; ".join(f"{r} ({n:,} params)" for r, n in result["kept"].items())
    return finish("partial", reasons or "no block matrix parameters found")


def _run_subprocess(model_type: str, timeout: float, threads: int) -> dict[str, Any]:
    """:func:`run_architecture` in a fresh interpreter, killed after ``timeout`` seconds."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model_type,
               "--worker-output", str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                                  cwd=ROOT)
            if out.exists():
                result = json.loads(out.read_text())
            else:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                result = {"model_type": model_type, "status": "fails", "share": None,
                          "reason": f"worker exited with {proc.returncode}: {tail}"}
        except subprocess.TimeoutExpired:
            result = {"model_type": model_type, "status": "fails", "share": None,
                      "reason": f"timed out after {timeout:.0f} s"}
    result.setdefault("model_class", architectures()[model_type])
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def run_zoo(
    names: Iterable[str], jobs: int = 1, timeout: float = 120.0,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Results of ``names`` (each in its own subprocess, ``jobs`` at a time), sorted by name."""
    names = sorted(names)
    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))

    def one(name: str) -> dict[str, Any]:
        result = _run_subprocess(name, timeout, threads)
        if progress is not None:
            progress(result)
        return result

    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        return sorted(pool.map(one, names), key=lambda r: r["model_type"])


def headline(results: list[dict[str, Any]]) -> str:
    """X of Y architectures that build and train have >= 99% in NVFP4 and train."""
    tried = [r for r in results if r["status"] != "skipped"]
    ok = sum(r["status"] == "ok" for r in tried)
    counts = {s: sum(r["status"] == s for r in results) for s in ("partial", "fails", "skipped")}
    return (f"{ok} of {len(tried)} architectures that build and train have >= "
            f"{100 * OK_SHARE:.0f}% of their block matmul weights in NVFP4, train and reload "
            f"(partial {counts['partial']}, fails {counts['fails']}; "
            f"skipped {counts['skipped']} of {len(results)})")


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__}


def write_report(results: list[dict[str, Any]], out_dir: Path, seconds: float) -> None:
    """Write ``model_zoo.json`` and ``model_zoo.md`` to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**versions(), "date": datetime.date.today().isoformat(),
            "headline": headline(results), "seconds": round(seconds, 1),
            "architectures": sorted(architectures())}
    (out_dir / "model_zoo.json").write_text(
        json.dumps({**meta, "results": results}, indent=1) + "\n")
    lines = [
        "# Model zoo: NVFP4 coverage of transformers' causal LMs",
        "",
        f"transformers {meta['transformers']}, torch {meta['torch']}, {meta['date']}; "
        f"`python eval/model_zoo.py` ({meta['seconds']:.0f} s). Tiny random models on the CPU "
        f"(FP32, hidden 64, 2 blocks, batch {BATCH} x {SEQ}), every block NVFP4 (reference "
        "backend), no KV cache; share = NVFP4 parameters / matmul weight parameters in the "
        "blocks (routers included; biases, Mamba's `A_log` and convolutions are no matmul "
        "weights).",
        "",
        f"**{meta['headline']}**",
        "",
        "| architecture | model class | block matmul params in NVFP4 | status |",
        "|---|---|---:|---|",
    ]
    for r in results:
        share = "" if r.get("share") is None else f"{100 * r['share']:.1f}%"
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        status = status.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['model_type']} | {r.get('model_class', '')} | {share} | {status} |")
    (out_dir / "model_zoo.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Command line: run the zoo (or one worker) and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model types (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="architectures run in parallel")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per architecture")
    parser.add_argument("--output-dir", type=Path, default=REPORT_DIR)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.worker_output.write_text(json.dumps(run_architecture(args.worker)))
        return
    known = architectures()
    names = args.only.split(",") if args.only else list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown model types: {', '.join(unknown)}")
    start = time.perf_counter()
    done = 0

    def progress(r: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        share = "" if r.get("share") is None else f" {100 * r['share']:.1f}%"
        print(f"[{done}/{len(names)}] {r['model_type']}: {r['status']}{share} "
              f"{r.get('reason', '')[:120]} ({r['seconds']} s)", flush=True)

    results = run_zoo(names, args.jobs, args.timeout, progress)
    write_report(results, args.output_dir, time.perf_counter() - start)
    print(headline(results))


if __name__ == "__main__":
    main()
