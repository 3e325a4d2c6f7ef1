"""Deterministic offline corpus for the replication study (issue 8).

Text already on the machine: the ``.py``, ``.rst``, ``.md`` and ``.txt`` files of the Python
standard library and site-packages (sorted paths, identical files kept once), optionally the
benchmark JSONL files of ``--shared-data``. A byte-level BPE tokenizer is trained on it and
the token stream is written as ``train.npy`` / ``val.npy`` (every 50th block of 1024 tokens
held out) with a ``manifest.json``. Same inputs, same bytes.

    python bench/corpus.py --out /tmp/corpus --max-bytes 300_000_000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import site
import sysconfig
from pathlib import Path

import numpy as np

SUFFIXES = (".py", ".rst", ".md", ".txt")
MAX_FILE_BYTES = 2_000_000
BLOCK = 1024
VAL_EVERY = 50


def source_files(roots: list[Path]) -> list[Path]:
    """Text files under ``roots`` in sorted order (no __pycache__, no huge files)."""
    files = []
    for root in roots:
        if root.is_dir():
            files += [
                p for p in root.rglob("*")
                if p.suffix in SUFFIXES and "__pycache__" not in p.parts and p.is_file()
                and p.stat().st_size <= MAX_FILE_BYTES
            ]
    return sorted(set(files))


def collect_text(roots: list[Path], max_bytes: int, shared_data: Path | None = None):
    """The corpus text and the list of (path, sha256) it was built from."""
    parts, used, seen, total = [], [], set(), 0
    extra = sorted(shared_data.rglob("*.jsonl")) if shared_data else []
    for path in [*source_files(roots), *extra]:
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        parts.append(text)
        used.append((str(path), digest))
        total += len(raw)
        if total >= max_bytes:
            break
    return "\n<|endoftext|>\n".join(parts), used


def build(out: Path, max_bytes: int, vocab_size: int, shared_data: Path | None = None,
          roots: list[Path] | None = None) -> dict:
    """Build the corpus under ``out``; returns the manifest."""
    from hf_nvfp4.data import train_tokenizer

    if roots is None:
        roots = [Path(sysconfig.get_paths()["stdlib"]), *map(Path, site.getsitepackages())]
    text, used = collect_text(roots, max_bytes, shared_data)
    tok = train_tokenizer(text, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out / "tokenizer"))
    chunks = [text[i : i + 1_000_000] for i in range(0, len(text), 1_000_000)]
    ids = np.concatenate([np.asarray(c, dtype=np.int64) for c in tok(chunks)["input_ids"]])
    dtype = np.uint16 if len(tok) <= 65535 else np.uint32
    blocks = ids[: len(ids) // BLOCK * BLOCK].reshape(-1, BLOCK).astype(dtype)
    is_val = np.arange(len(blocks)) % VAL_EVERY == VAL_EVERY - 1
    is_val[-1] |= not is_val.any()
    np.save(out / "train.npy", blocks[~is_val])
    np.save(out / "val.npy", blocks[is_val])
    manifest = {
        "files": len(used),
        "files_sha256": hashlib.sha256("\n".join(d for _, d in used).encode()).hexdigest(),
        "text_bytes": len(text.encode("utf-8")),
        "tokens": int(blocks.size),
        "train_blocks": int((~is_val).sum()),
        "val_blocks": int(is_val.sum()),
        "block": BLOCK,
        "vocab_size": len(tok),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--max-bytes", type=int, default=300_000_000)
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--shared-data", default=None)
    args = p.parse_args()
    shared = Path(args.shared_data) if args.shared_data else None
    print(json.dumps(build(Path(args.out), args.max_bytes, args.vocab_size, shared), indent=2))


if __name__ == "__main__":
    main()
