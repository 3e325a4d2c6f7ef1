"""Development benchmark: one NVFP4Linear training step with the forward's W as BF16 block
values (the default since the twenty-first session) against packed W plus a dequantize
launch (the path before), side by side in one process.

    python bench/dev_linear.py                    # Llama 124M and 953M shapes, on CUDA
    OUT=dir python bench/dev_linear.py            # also writes dir/linear_weight_values.json
    python bench/dev_linear.py --eager            # host launches included
    TRITON_INTERPRET=1 python bench/dev_linear.py --device cpu --shapes 32x64x48 --iters 1

A step is ``y = layer(x); y.backward(dy)`` of a layer with BF16 parameters (the default
recipe: 16x16 weight tiles, RHT and stochastic rounding). On CUDA each side's step is
captured in a CUDA graph, as compiled training with ``mode="reduce-overhead"`` runs it, and
replayed ``--iters`` times per round (``--eager``: eager steps, host launches included,
written to ``linear_weight_values_eager.json``); the sides alternate for ``--rounds`` rounds
and each reports its median. Before timing, the two sides' outputs and gradients must be
equal bit for bit (the same codes reach the same GEMM either way; both start from the same
stochastic rounding keys). The packed side is the same code with the weight quantizer's
``values`` flag off.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_nvfp4.nn import NVFP4Linear, functional  # noqa: E402

# (tokens M, in K, out N): the Llama 124M (batch 32 x 1024) and 953M (8 x 2048) projections
SHAPES = ((32768, 768, 768), (32768, 768, 2048), (32768, 2048, 768),
          (16384, 2048, 2048), (16384, 2048, 5632), (16384, 5632, 2048))


@contextlib.contextmanager
def packed_weight() -> Iterator[None]:
    """Layers built inside quantize their forward W packed (dequantized by the GEMM)."""
    real = functional.Quantizer

    def quantizer(role: str, *args, values: tuple[bool, bool] = (False, False), **kwargs):
        return real(role, *args, values=(False, False) if role == "weight" else values, **kwargs)

    functional.Quantizer = quantizer
    try:
        yield
    finally:
        functional.Quantizer = real


def eager_step(layer: NVFP4Linear, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    """One step's output and gradients (dx, dW)."""
    xr = x.clone().requires_grad_()
    layer.weight.grad = None
    y = layer(xr)
    y.backward(dy)
    return [y.detach(), xr.grad, layer.weight.grad]


def graphed_step(layer: NVFP4Linear, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """The step as a CUDA graph's replay (after warm-up steps outside the graph)."""
    xr = x.clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # tuning picks and compiled kernels, outside the graph
            eager_step(layer, x, dy)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    layer.weight.grad = None
    with torch.cuda.graph(graph):
        layer(xr).backward(dy)
    return graph.replay


def time_ms(step: Callable[[], None], iters: int, device: torch.device) -> float:
    """Mean ms per step over ``iters`` back-to-back steps."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) * 1e3 / iters


def measure(shape: tuple[int, int, int], args: argparse.Namespace) -> dict:
    """Both sides of one shape: equality check, then the alternating timed rounds."""
    m, k, n = shape
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    dy = torch.randn(m, n, generator=g).to(device, torch.bfloat16)
    layers = {}
    for side in ("values", "packed"):
        with packed_weight() if side == "packed" else contextlib.nullcontext():
            torch.manual_seed(1)
            layers[side] = NVFP4Linear(k, n, bias=False, backend=args.backend, sr_seed=7,
                                       device=device, dtype=torch.bfloat16)
    outs = {side: eager_step(layer, x, dy) for side, layer in layers.items()}
    for name, a, b in zip(("y", "dx", "dw"), outs["values"], outs["packed"], strict=True):
        if not torch.equal(a, b):
            raise AssertionError(f"{shape}: {name} differs between the two sides")
    steps = {side: (graphed_step(layer, x, dy) if device.type == "cuda" and not args.eager else
                    lambda layer=layer: eager_step(layer, x, dy))
             for side, layer in layers.items()}
    times: dict[str, list[float]] = {side: [] for side in steps}
    for r in range(args.rounds):
        for side in (("values", "packed") if r % 2 == 0 else ("packed", "values")):
            times[side].append(time_ms(steps[side], args.iters, device))
    med = {side: statistics.median(t) for side, t in times.items()}
    row = {"shape": list(shape), "ms": med, "rounds": times,
           "packed_over_values": med["packed"] / med["values"]}
    print(f"M={m} K={k} N={n}: values {med['values']:.3f} ms, packed {med['packed']:.3f} ms, "
          f"packed/values {row['packed_over_values']:.3f}", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    """Run every shape and print (and with OUT, write) the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="triton")
    p.add_argument("--shapes", default=None, help="comma list of MxKxN (default: SHAPES)")
    p.add_argument("--iters", type=int, default=20, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--eager", action="store_true",
                   help="time eager steps (host launches included) instead of CUDA graphs")
    args = p.parse_args(argv)
    shapes = SHAPES if args.shapes is None else [
        tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "command": " ".join(sys.argv), "iters": args.iters, "rounds": args.rounds,
        "timing": "eager" if args.eager or args.device != "cuda" else "cuda graph",
        "results": [],
    }
    for shape in shapes:  # written after each shape: a run cut off keeps what it measured
        report["results"].append(measure(shape, args))
        if os.environ.get("OUT"):
            name = "linear_weight_values" + ("_eager" if args.eager else "")
            path = Path(os.environ["OUT"]) / f"{name}.json"
            path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
