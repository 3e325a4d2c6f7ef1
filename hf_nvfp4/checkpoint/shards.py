"""Safetensors files on disk: sharded writing with an index, and header-only reading.

Shards follow transformers' naming (``model-00001-of-00003.safetensors`` plus
``model.safetensors.index.json`` with ``metadata.total_size`` and ``weight_map``); a
checkpoint that fits in one shard is a single ``model.safetensors``. Headers are read without
touching the tensor data, which lets every integrity check run before anything loads.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import CheckpointError

DEFAULT_MAX_SHARD_SIZE = 5 * 1000**3
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
               "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
# safetensors dtype names -> bytes per element.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"200MB"`` or ``"1GiB"``."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive; got {size}")
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"max_shard_size must be bytes or like '5GB'/'200MiB'; got {size!r}")
    return parse_size(int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry: dtype (safetensors name), shape, the file holding it and
    its data's byte range in that file (``[begin, end)``, from the start of the file)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offsets: tuple[int, int] = (0, 0)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor data."""
        n = DTYPE_SIZES.get(self.dtype, 0)
        for s in self.shape:
            n *= s
        return n


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its header; checks the file is complete."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(
                f"{path} is truncated: header claims {n} bytes but the file has {size}"
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from e
    header.pop("__metadata__", None)
    infos, end = {}, 0
    for name, entry in header.items():
        begin, stop = entry["data_offsets"]
        infos[name] = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), path,
                                 (8 + n + begin, 8 + n + stop))
        end = max(end, entry["data_offsets"][1])
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {8 + n + end} bytes but the file has "
            f"{size} (an interrupted copy or download?)"
        )
    return infos


def checkpoint_files(directory: str | os.PathLike, prefix: str = "model") -> list[Path]:
    """The safetensors files of the checkpoint ``prefix`` in ``directory`` (index or single)."""
    directory = Path(directory)
    index = directory / f"{prefix}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        return [directory / f for f in sorted(set(weight_map.values()))]
    single = directory / f"{prefix}.safetensors"
    if single.is_file():
        return [single]
    return []


def read_headers(files: Iterable[str | os.PathLike]) -> dict[str, TensorInfo]:
    """Merged headers of several files; a tensor stored twice is an error."""
    infos: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in infos:
                raise CheckpointError(
                    f"tensor {name!r} is stored twice: in {infos[name].file} and {info.file}"
                )
            infos[name] = info
    return infos


def write_sharded(
    tensors: dict[str, torch.Tensor],
    directory: str | os.PathLike,
    *,
    prefix: str = "model",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    metadata: dict[str, str] | None = None,
    on_shard: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write ``tensors`` as safetensors shards of at most ``max_shard_size`` bytes each.

    A tensor larger than the limit gets a shard of its own. With more than one shard an
    index ``<prefix>.safetensors.index.json`` is written. ``on_shard`` is called after each
    file (progress reporting). Returns the written files.
    """
    limit = parse_size(max_shard_size)
    directory = Path(directory)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        used += nbytes
    meta = {"format": "pt", **(metadata or {})}
    n = len(shards)
    names = (
        [f"{prefix}.safetensors"]
        if n == 1
        else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    written = []
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, str(directory / fname), metadata=meta)
        written.append(directory / fname)
        if on_shard is not None:
            on_shard(directory / fname)
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: f for f, s in zip(names, shards, strict=True) for k in s},
        }
        (directory / f"{prefix}.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )
    return written


__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "TensorInfo",
    "checkpoint_files",
    "parse_size",
    "read_header",
    "read_headers",
    "write_sharded",
]
