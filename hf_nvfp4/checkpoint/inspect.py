"""``inspect``: a per-layer report of a checkpoint in any of our formats, read from disk.

Recognized: native packed and master hf_nvfp4 checkpoints, compressed-tensors
``nvfp4-pack-quantized`` and ModelOpt NVFP4 exports, plain checkpoints. Per 2D weight: shape,
format, bytes, block-scale statistics, the decode global scale, and the quantization SNR
(``10 log10(|w|^2 / |w - q(w)|^2)``): of the packed weight against its FP32 master when the
checkpoint saved masters (transposed for GPT-2's ``Conv1D``, whose master is ``[in, out]``),
or, for a high-precision weight, of the NVFP4 quantization it would get (16x16 tiles). Totals
compare the checkpoint's bytes with the same model in BF16.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..numerics import e2m1
from ..numerics.quantize import quantize
from .errors import CheckpointError
from .integrity import read_quantization_config
from .packed import MASTERS_PREFIX
from .shards import TensorInfo, checkpoint_files, read_headers

# format -> (packed weight suffix, global scale suffix, global scale is ENCODE)
_PACKED_NAMES = {
    "hf_nvfp4-packed": ("weight_packed", "weight_global_scale", False),
    "compressed-tensors": ("weight_packed", "weight_global_scale", True),
    "modelopt": ("weight", "weight_scale_2", False),
}


@dataclass
class LayerReport:
    """One 2D weight of the checkpoint."""

    name: str
    shape: tuple[int, int]
    format: str
    nbytes: int
    scale_min: float | None = None
    scale_max: float | None = None
    scale_mean: float | None = None
    global_decode_scale: float | None = None
    snr_db: float | None = None


@dataclass
class CheckpointReport:
    """The whole checkpoint: its format, per-layer rows and totals."""

    path: str
    format: str
    layers: list[LayerReport] = field(default_factory=list)
    total_bytes: int = 0
    bf16_bytes: int = 0

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

    def table(self) -> str:
        """A fixed-width text table with totals."""
        head = (f"{'layer':<44} {'shape':>13} {'format':>8} {'bytes':>11} {'scale min':>10} "
                f"{'scale max':>10} {'scale mean':>10} {'global':>10} {'SNR dB':>7}")
        lines = [f"{self.path}  [{self.format}]", head, "-" * len(head)]

        def num(v: float | None, fmt: str = ".3g") -> str:
            return "-" if v is None else format(v, fmt)

        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            lines.append(
                f"{r.name[-44:]:<44} {shape:>13} {r.format:>8} {r.nbytes:>11,} "
                f"{num(r.scale_min):>10} {num(r.scale_max):>10} {num(r.scale_mean):>10} "
                f"{num(r.global_decode_scale):>10} {num(r.snr_db, '.1f'):>7}"
            )
        ratio = self.total_bytes / self.bf16_bytes if self.bf16_bytes else float("nan")
        lines.append("-" * len(head))
        lines.append(
            f"total {self.total_bytes:,} bytes vs {self.bf16_bytes:,} in BF16 "
            f"({ratio:.3f}x); {sum(r.format == 'nvfp4' for r in self.layers)} NVFP4 layers"
        )
        lines.append(SNR_NOTE)
        return "\n".join(lines)


SNR_NOTE = (
    "SNR dB: for a high-precision row, the SNR NVFP4 quantization (16x16 tiles) would give it; "
    "for an NVFP4 row, the packed weight against its FP32 master, '-' when the checkpoint "
    "saved no masters (save_packed(..., masters=True), --masters)"
)


def detect_format(directory: Path) -> str:
    """``hf_nvfp4-packed`` | ``hf_nvfp4-master`` | ``compressed-tensors`` | ``modelopt`` |
    ``plain``."""
    qc = read_quantization_config(directory) or {}
    method = qc.get("quant_method")
    if method == "hf_nvfp4":
        return f"hf_nvfp4-{qc.get('checkpoint_format', 'master')}"
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method == "modelopt" or (directory / "hf_quant_config.json").is_file():
        return "modelopt"
    if method:
        raise CheckpointError(f"{directory}/config.json: unsupported quant_method {method!r}")
    return "plain"


def _load(info: TensorInfo) -> torch.Tensor:
    with safe_open(str(info.file), framework="pt") as f:
        return f.get_tensor(info.name)


def _snr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.float(), approx.float()
    noise = (ref - approx).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal else 0.0


def _packed_row(module: str, fmt: str, infos: dict[str, TensorInfo],
                masters: dict[str, TensorInfo]) -> LayerReport:
    wsuf, gsuf, encode = _PACKED_NAMES[fmt]
    packed = _load(infos[f"{module}.{wsuf}"])
    scale = _load(infos[f"{module}.weight_scale"]).float()
    g = float(_load(infos[f"{module}.{gsuf}"]).float().reshape(-1)[0])
    decode = 1.0 / g if encode else g
    nbytes = sum(i.nbytes for k, i in infos.items() if k.rpartition(".")[0] == module)
    row = LayerReport(module, (packed.shape[0], packed.shape[1] * 2), "nvfp4", nbytes,
                      scale.min().item(), scale.max().item(), scale.mean().item(), decode)
    master = masters.get(f"{module}.weight")
    if master is not None:
        deq = e2m1.decode(e2m1.unpack(packed)) * scale.repeat_interleave(16, -1) * decode
        ref = _load(master)
        # A GPT-2 Conv1D master is [in, out], the transpose of its packed weight; a square one
        # is compared in the orientation it was packed from (the far better fit of the two).
        row.snr_db = max((_snr(w, deq) for w in (ref, ref.t()) if w.shape == deq.shape),
                         default=None)
    return row


def inspect_checkpoint(path: str | os.PathLike, *, snr: bool = True) -> CheckpointReport:
    """Read ``path`` (a checkpoint directory) and report every 2D weight.

    ``snr=False`` skips the (slower) quantization of high-precision weights.
    """
    directory = Path(path)
    fmt = detect_format(directory)
    files = checkpoint_files(directory)
    if not files:
        raise CheckpointError(f"no model.safetensors[.index.json] in {directory}")
    infos = read_headers(files)
    master_files = checkpoint_files(directory, MASTERS_PREFIX)
    masters = read_headers(master_files) if master_files else {}
    report = CheckpointReport(str(directory), fmt)
    report.total_bytes = sum(f.stat().st_size for f in files)
    packed_fmt = fmt if fmt in _PACKED_NAMES else None
    modules = sorted({k.rpartition(".")[0] for k in infos}, key=_natural)
    for module in modules:
        w = infos.get(f"{module}.weight")
        codes = infos.get(f"{module}.{_PACKED_NAMES[packed_fmt][0]}") if packed_fmt else None
        # a 3D ``weight_packed`` is packed experts' (JetMoE's, a DeepSeek V4 grouped linear)
        is_packed = (codes is not None and len(codes.shape) == 2
                     and f"{module}.weight_scale" in infos)
        if is_packed:
            row = _packed_row(module, packed_fmt, infos, masters)
        elif w is not None and len(w.shape) == 2:
            nbytes = sum(i.nbytes for k, i in infos.items() if k.rpartition(".")[0] == module)
            row = LayerReport(module, w.shape, w.dtype.lower(), nbytes)
            if snr and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0:
                t = _load(w).float()
                row.snr_db = _snr(t, quantize(t, "nvfp4", tile=(16, 16)).dequantize())
        else:
            continue
        report.layers.append(row)
    for module_row in report.layers:
        report.bf16_bytes += 2 * module_row.shape[0] * module_row.shape[1]
    rows = {r.name: r.format == "nvfp4" and packed_fmt is not None for r in report.layers}
    experts = {k[: -len("_packed")] for k, i in infos.items()
               if packed_fmt and k.endswith("_packed") and len(i.shape) == 3}
    report.bf16_bytes += sum(
        _bf16_bytes(k, i, experts) for k, i in infos.items() if not _row_weight(k, rows)
    )
    return report


def _row_weight(key: str, rows: dict[str, bool]) -> bool:
    """Whether ``key`` is the weight of a reported layer (``rows``: name -> packed), or, for a
    packed one, a tensor of its quantized form (``weight_*``, ``input_*`` scales): counted
    with the layer, where its other tensors (a bias, a router's scale) are not."""
    module, _, leaf = key.rpartition(".")
    if module not in rows:
        return False
    return leaf == "weight" or rows[module] and leaf.startswith(("weight_", "input_"))


def _bf16_bytes(key: str, info: TensorInfo, experts: set[str]) -> int:
    """Bytes of tensor ``key`` (not a packed linear's) in the BF16 model; ``experts`` are the
    packed experts parameters: their codes hold two weights a byte, their scales are not in
    that model, and neither is the stochastic-rounding state (``sr_state``)."""
    if key.rpartition(".")[2] == "sr_state":
        return 0
    if key.endswith("_packed") and key[: -len("_packed")] in experts:
        return 4 * math.prod(info.shape)
    if any(key.endswith(s) and key[: -len(s)] in experts for s in ("_scale", "_global_scale")):
        return 0
    return 2 * math.prod(info.shape)


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.replace(".", " ").split()]


def report_json(report: CheckpointReport) -> str:
    """The report as JSON (``inf`` SNRs become strings)."""
    return json.dumps(report.to_dict(), indent=2, default=str)


__all__ = ["CheckpointReport", "LayerReport", "detect_format", "inspect_checkpoint", "report_json"]
