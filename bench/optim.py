"""Optimizer-state benchmark: FP32 AdamW vs QuantizedAdamW (NVFP4 / FP8 block / MXFP8 moments)
vs torchao's and bitsandbytes' low-bit AdamW, on one device.

For each optimizer: bytes of optimizer state per parameter (from the stored tensors), optimizer
step time per parameter (CUDA events after warmup; perf_counter on CPU) and the loss of a small
Llama (transformers LlamaConfig, byte-level) pretrained on the Python standard library's source
for the same steps, batches and initial weights. Plus a study of second-moment storage
(``v`` vs ``sqrt(v)`` in NVFP4). Writes JSON to ``--out``.

    python bench/optim.py --tiny --out /tmp/optim_tiny.json           # CPU check, ~1 min
    python bench/optim.py --device cuda --out optim_h100.json          # H100, < 4 min
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_nvfp4.optim import MomentCodec, QuantizedAdamW, param_groups  # noqa: E402

SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=2, inter=256, seq=64, batch=8, steps=40, data=400_000),
    "real": dict(
        hidden=256, layers=4, heads=4, inter=1024, seq=256, batch=32, steps=400, data=16_000_000
    ),
}


def stdlib_bytes(limit: int) -> bytes:
    """The first ``limit`` bytes of the standard library's .py files, in sorted path order."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    out, total = [], 0
    for path in files:
        if "site-packages" in path or "dist-packages" in path:
            continue
        with open(path, "rb") as fh:
            chunk = fh.read()
        out.append(chunk)
        total += len(chunk)
        if total >= limit:
            break
    return b"".join(out)[:limit]


def make_batches(cfg: dict, seed: int, device: torch.device) -> tuple[list, list]:
    data = torch.frombuffer(bytearray(stdlib_bytes(cfg["data"])), dtype=torch.uint8).long()
    split = int(len(data) * 0.95)
    train, val = data[:split], data[split:]
    gen = torch.Generator().manual_seed(seed)
    seq, bsz = cfg["seq"] + 1, cfg["batch"]

    def sample(src: torch.Tensor, n: int) -> list[torch.Tensor]:
        starts = torch.randint(0, len(src) - seq, (n, bsz), generator=gen)
        return [torch.stack([src[s : s + seq] for s in row]).to(device) for row in starts]

    return sample(train, cfg["steps"]), sample(val, 8)


def build_model(cfg: dict, seed: int, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["inter"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["heads"],
        max_position_embeddings=cfg["seq"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device)


def tensor_nbytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor, looking inside tensor subclasses (torchao, DTensor)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    total = 0
    for p in params:
        for v in opt.state.get(p, {}).values():
            if torch.is_tensor(v):
                total += tensor_nbytes(v)
    return total


def optimizers(cuda: bool) -> dict[str, Callable | str]:
    """Name -> factory(groups, lr) or the reason it is skipped."""
    kw = dict(betas=(0.9, 0.95), weight_decay=0.1)
    out: dict[str, Callable | str] = {
        "adamw_fp32": lambda g, lr: torch.optim.AdamW(g, lr=lr, fused=cuda, **kw),
        # Same algorithm, other summation order: with ours_fp32_states, the noise floor.
        "adamw_fp32_foreach": lambda g, lr: torch.optim.AdamW(g, lr=lr, foreach=True, **kw),
    }
    ours = (
        ("ours_fp32_states", None, {}),
        ("ours_nvfp4", "nvfp4", {}),  # the fused Triton step on CUDA
        ("ours_nvfp4_sr_seed1", "nvfp4", {"seed": 1}),
        ("ours_nvfp4_sr_seed2", "nvfp4", {"seed": 2}),
        ("ours_nvfp4_unfused", "nvfp4", {"fused": False}),
        ("ours_nvfp4_square_tiles", "nvfp4", {"square_tiles": True}),
        ("ours_fp8_block", "fp8_block", {}),
        ("ours_mxfp8", "mxfp8", {}),
    )
    for name, fmt, extra in ours[:4]:
        out[name] = _ours(fmt, extra, kw)
    try:
        try:
            from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8
        except ImportError:
            from torchao.prototype.low_bit_optim import AdamW4bit, AdamW8bit, AdamWFp8
        for name, cls in (
            ("torchao_adamw8bit", AdamW8bit),
            ("torchao_adamw4bit", AdamW4bit),
            ("torchao_adamwfp8", AdamWFp8),
        ):
            out[name] = lambda g, lr, cls=cls: cls(_plain(g), lr=lr, **kw)
    except Exception as exc:  # torchao absent or incompatible with this torch
        out["torchao"] = f"skipped: {type(exc).__name__}: {exc}"
    try:
        import bitsandbytes as bnb

        out["bnb_adamw8bit"] = lambda g, lr: bnb.optim.AdamW8bit(_plain(g), lr=lr, **kw)
    except Exception as exc:
        out["bitsandbytes"] = f"skipped: {type(exc).__name__}: {exc}"
    for name, fmt, extra in ours[4:]:  # the unfused (slow) steps last
        out[name] = _ours(fmt, extra, kw)
    return out


def _ours(fmt: str | None, extra: dict, kw: dict) -> Callable:
    return lambda g, lr: QuantizedAdamW(g, lr=lr, exp_avg_format=fmt, exp_avg_sq_format=fmt,
                                        **extra, **kw)


def _plain(groups: list[dict]) -> list[dict]:
    """Groups without our ``quantize`` key, for other libraries' optimizers."""
    return [{k: v for k, v in g.items() if k != "quantize"} for g in groups]


def lr_at(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 10)
    if step < warm:
        return peak * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def profile_step(opt: torch.optim.Optimizer) -> dict:
    """One ``opt.step()`` under torch.profiler: GPU kernel time and launches against wall
    time, i.e. how much of the step is the device working and how much the host."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    # Device-side events minus the user-annotation ranges (``Optimizer.step#...`` spans the
    # whole step on the GPU timeline too and would count the host's gaps as kernel time).
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)
               and not e.name.startswith("Optimizer.")]
    return {"profiled_step_wall_ms": wall * 1e3,
            "profiled_step_kernel_ms": sum(e.time_range.elapsed_us() for e in kernels) / 1e3,
            "profiled_step_kernels": len(kernels)}


def train_one(name, factory, cfg, init_state, batches, val, device, seed) -> dict:
    cuda = device.type == "cuda"
    model = build_model(cfg, seed, device)
    model.load_state_dict(init_state)
    groups = param_groups(model, weight_decay=0.1)
    quantized = groups[0]["params"]
    n_params = sum(p.numel() for p in model.parameters())
    n_quant = sum(p.numel() for p in quantized)
    peak = 2e-3
    opt = factory(groups, peak)
    warmup = min(10, cfg["steps"] // 4)
    step_times, losses, profile = [], [], {}
    for step, batch in enumerate(batches):
        for g in opt.param_groups:
            if torch.is_tensor(g["lr"]):  # torchao keeps lr as a tensor
                g["lr"].fill_(lr_at(step, len(batches), peak))
            else:
                g["lr"] = lr_at(step, len(batches), peak)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=batch[:, :-1], labels=batch[:, 1:].clone()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if cuda and step == len(batches) - 1:
            profile, dt = profile_step(opt), None
        elif cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t0
        opt.zero_grad(set_to_none=True)
        if step >= warmup and dt is not None:
            step_times.append(dt)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        val_loss = sum(
            model(input_ids=b[:, :-1], labels=b[:, 1:].clone()).loss.item() for b in val
        ) / len(val)
    step_s = sum(step_times) / max(1, len(step_times))
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "state_bytes_per_param": state_bytes(opt, list(model.parameters())) / n_params,
        "state_bytes_per_param_quantized_set": state_bytes(opt, quantized) / n_quant,
        "step_ms": step_s * 1e3,
        "step_ns_per_param": step_s * 1e9 / n_params,
        "train_loss_last10pct": sum(tail) / len(tail),
        "val_loss": val_loss,
        "steps_done": len(losses),
        "n_params": n_params,
        "n_params_quantized_set": n_quant,
        **profile,
    }


def second_moment_study(device: torch.device, seed: int) -> dict:
    """NVFP4 storage of v vs sqrt(v) on heavy-tailed squared gradients (2^20 elements)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    g = torch.randn(1 << 20, generator=gen, device=device)
    g = g * torch.exp(1.5 * torch.randn(1 << 20, generator=gen, device=device))
    v = g * g
    out = {}
    for label, sqrt in (("v", False), ("sqrt_v", True)):
        for rounding in ("nearest", "stochastic"):
            codec = MomentCodec("nvfp4", rounding, sqrt=sqrt)
            gen.manual_seed(seed + 1)
            v_hat = codec.decode(codec.encode(v, gen), v.numel())
            ratio = v_hat.sqrt() / v.sqrt()  # the error in the update's denominator
            out[f"{label}_{rounding}"] = {
                "underflow_fraction": (v_hat == 0).float().mean().item(),
                "mean_denominator_ratio_nonzero": ratio[v_hat > 0].mean().item(),
                "median_abs_log2_denominator_ratio_nonzero": ratio[v_hat > 0]
                .log2()
                .abs()
                .median()
                .item(),
            }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="path of the JSON result")
    ap.add_argument("--tiny", action="store_true", help="tiny model and few steps (CPU check)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="override the number of steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated optimizer names to run")
    args = ap.parse_args(argv)
    cfg = dict(SIZES["tiny" if args.tiny else "real"])
    if args.steps is not None:
        cfg["steps"] = args.steps
    device = torch.device(args.device)
    t_start = time.time()
    batches, val = make_batches(cfg, args.seed, device)
    init_state = {k: v.clone() for k, v in build_model(cfg, args.seed, device).state_dict().items()}
    results: dict = {}
    for name, factory in optimizers(device.type == "cuda").items():
        if args.only and name not in args.only.split(","):
            continue
        if isinstance(factory, str):
            results[name] = {"skipped": factory}
            print(f"{name}: {factory}", flush=True)
            continue
        t0 = time.time()
        try:
            r = train_one(name, factory, cfg, init_state, batches, val, device, args.seed)
        except Exception as exc:  # a third-party optimizer failing on this platform
            results[name] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
            print(f"{name}: failed: {exc}", flush=True)
            continue
        r["wall_s"] = time.time() - t0
        results[name] = r
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()), flush=True)
        with open(args.out, "w") as fh:  # partial results survive a time limit
            json.dump({"config": cfg, "partial": True, "results": results}, fh, indent=2)
    base = results.get("adamw_fp32", {}).get("val_loss")
    for r in results.values():
        if base and "val_loss" in r:
            r["val_loss_rel_gap_vs_fp32"] = r["val_loss"] / base - 1
    report = {
        "config": cfg,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "targets": {
            "nvfp4_state_bytes_per_param": 1.1,
            "fp32_state_bytes_per_param": 8.0,
            "val_loss_rel_gap": 0.005,
        },
        "results": results,
        "second_moment_study": second_moment_study(device, args.seed),
        "total_wall_s": time.time() - t_start,
    }
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {args.out} in {report['total_wall_s']:.0f}s")
    return report


if __name__ == "__main__":
    main()
