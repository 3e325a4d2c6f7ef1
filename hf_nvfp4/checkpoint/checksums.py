"""A checksum manifest of a packed checkpoint: written at save, checked at load.

``save_packed`` writes ``hf_nvfp4_checksums.json`` (SHA-256 of every tensor's bytes, by
file and tensor name); loading hashes the same byte ranges of the files and refuses a tensor whose
digest differs, naming the tensor, its layer and the file. Flipped bits in 4-bit codes are
otherwise undetectable (every byte is a valid pair of codes). Checking reads every byte once;
:func:`checksum_verification` turns it off for a block of code (``load_packed`` takes
``verify_checksums=False``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import CheckpointError
from .shards import TensorInfo, read_header

MANIFEST = "hf_nvfp4_checksums.json"
ALGORITHM = "sha256"
_CHUNK = 16 << 20
_VERIFY = contextvars.ContextVar("hf_nvfp4_verify_checksums", default=True)
logger = logging.getLogger(__name__)


@contextlib.contextmanager
def checksum_verification(enabled: bool) -> Iterator[None]:
    """Turn checksum verification of packed checkpoints on or off inside the block.

    Example: ``with checksum_verification(False): AutoModelForCausalLM.from_pretrained(p)``.
    """
    token = _VERIFY.set(enabled)
    try:
        yield
    finally:
        _VERIFY.reset(token)


def tensor_digest(info: TensorInfo) -> str:
    """SHA-256 of the bytes of one tensor, read from its file."""
    begin, end = info.offsets
    h = hashlib.new(ALGORITHM)
    with open(info.file, "rb") as f:
        f.seek(begin)
        left = end - begin
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise CheckpointError(f"tensor {info.name!r} in {info.file} is truncated")
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike, files: Iterable[Path]) -> Path:
    """Hash every tensor of ``files`` into ``directory``/hf_nvfp4_checksums.json."""
    digests = {
        Path(f).name: {name: tensor_digest(info) for name, info in sorted(read_header(f).items())}
        for f in files
    }
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps({"algorithm": ALGORITHM, "files": digests}, indent=1) + "\n")
    return path


def _layer(name: str) -> str:
    return name.rpartition(".")[0] or name


def verify_manifest(directory: str | os.PathLike, infos: dict[str, TensorInfo]) -> None:
    """Check ``infos``' tensors against the manifest of ``directory`` (when verification is on).

    A checkpoint without a manifest (saved before manifests existed) loads with a warning.
    """
    if not _VERIFY.get():
        return
    path = Path(directory) / MANIFEST
    if not path.is_file():
        logger.warning("hf_nvfp4: %s has no %s; its tensors are not verified", directory,
                       MANIFEST)
        return
    try:
        manifest = json.loads(path.read_text())
        algorithm, digests = manifest["algorithm"], manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid checksum manifest: {e}") from e
    if algorithm != ALGORITHM:
        raise CheckpointError(f"{path}: algorithm must be {ALGORITHM!r}; got {algorithm!r}")
    for name, info in infos.items():
        expected = digests.get(info.file.name, {}).get(name)
        if expected is None:
            raise CheckpointError(
                f"tensor {name!r} (layer {_layer(name)!r}) in {info.file} is not in {path}; "
                "the checkpoint was changed after it was saved"
            )
        if tensor_digest(info) != expected:
            raise CheckpointError(
                f"tensor {name!r} (layer {_layer(name)!r}) in {info.file} fails its {ALGORITHM} "
                f"checksum from {path}: the file is corrupted (a bad copy or disk?); "
                "re-download or re-save it"
            )


__all__ = [
    "MANIFEST",
    "checksum_verification",
    "tensor_digest",
    "verify_manifest",
    "write_manifest",
]
