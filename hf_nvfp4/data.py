"""Built-in demo data: text every machine already has (the Python standard library's sources).

Deterministic for a given Python installation; no download, no third-party text in the repo.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__",
              "lib2to3", "turtledemo", "tkinter", "ensurepip"}


def stdlib_corpus(max_bytes: int = 4_000_000) -> str:
    """Concatenated ``.py`` sources of the standard library, in sorted path order.

    Test suites and vendored packages are skipped; files are joined with a separator line
    until ``max_bytes`` characters are collected.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive; got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"Python standard library not found at {root}")
    parts: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in _SKIP_DIRS for p in rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chunk = f"# ---- {rel.as_posix()} ----\n{text}\n"
        parts.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    return "".join(parts)[:max_bytes]


def train_tokenizer(text: str, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``text``, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 100_000] for i in range(0, len(text), 100_000)],
                            trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def byte_tokens(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as int64 token ids (vocabulary 256)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def split_blocks(
    ids: torch.Tensor, seq_len: int, val_fraction: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a token stream into ``[n, seq_len]`` blocks and hold out every k-th block.

    Validation blocks are spread evenly over the stream (``k = round(1 / val_fraction)``),
    so they sample every part of the corpus rather than only its last files.
    """
    if seq_len <= 1:
        raise ValueError(f"seq_len must be > 1; got {seq_len}")
    n = ids.numel() // seq_len
    if n < 2:
        raise ValueError(f"need at least 2 blocks of {seq_len} tokens; got {ids.numel()} tokens")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    blocks = ids[: n * seq_len].reshape(n, seq_len)
    k = max(2, int(round(1 / val_fraction)))
    is_val = torch.arange(n) % k == k - 1
    if not bool(is_val.any()):
        is_val[-1] = True
    return blocks[~is_val], blocks[is_val]


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks ``[n, seq]`` as causal-LM examples (labels = inputs)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.dim() != 2:
            raise ValueError(f"blocks must be [n, seq_len]; got shape {tuple(blocks.shape)}")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def load_text(
    dataset: str | None = None,
    dataset_config: str | None = None,
    text_column: str = "text",
    max_docs: int = 100_000,
    text_files: list[str] | None = None,
    corpus_bytes: int = 2_000_000,
) -> str:
    """Training text: a Hub dataset's text column, local files, or the stdlib sources."""
    if dataset:
        from datasets import load_dataset

        ds = load_dataset(dataset, dataset_config, split="train")
        return "\n\n".join(ds[text_column][:max_docs])
    if text_files:
        return "\n\n".join(Path(p).read_text(encoding="utf-8") for p in text_files)
    return stdlib_corpus(corpus_bytes)
