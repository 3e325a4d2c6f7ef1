"""Built-in demo data: the standard-library corpus, byte tokens, blocks, a BPE tokenizer."""

import pytest
import torch

from hf_nvfp4.data import byte_tokens, split_blocks, stdlib_corpus, train_tokenizer


@pytest.fixture(scope="module")
def corpus() -> str:
    return stdlib_corpus(max_bytes=100_000)


def test_stdlib_corpus_is_deterministic_and_bounded(corpus):
    assert len(corpus) == 100_000
    assert corpus == stdlib_corpus(max_bytes=100_000)
    assert corpus.startswith("# ---- ")
    headers = [line for line in corpus.splitlines() if line.startswith("# ---- ")]
    paths = [h.removeprefix("# ---- ").removesuffix(" ----") for h in headers]
    assert len(paths) >= 2 and paths == sorted(paths)
    assert all(p.endswith(".py") for p in paths)
    assert not any(part in {"test", "tests", "site-packages"} for p in paths
                   for part in p.split("/")[:-1])
    assert "def " in corpus and "import " in corpus


def test_stdlib_corpus_rejects_non_positive_size():
    with pytest.raises(ValueError, match="max_bytes must be positive; got 0"):
        stdlib_corpus(max_bytes=0)


def test_byte_tokens():
    ids = byte_tokens("aé\n")
    assert ids.dtype == torch.int64
    assert ids.tolist() == [97, 0xC3, 0xA9, 10]


def test_byte_tokens_of_corpus_round_trip(corpus):
    ids = byte_tokens(corpus)
    assert int(ids.min()) >= 0 and int(ids.max()) < 256
    assert bytes(ids.to(torch.uint8).tolist()).decode("utf-8") == corpus


def test_split_blocks():
    ids = torch.arange(1000)
    train, val = split_blocks(ids, seq_len=10, val_fraction=0.1)
    assert train.shape == (90, 10) and val.shape == (10, 10)
    # Every 10th block is held out, so validation samples the whole stream.
    assert val[:, 0].tolist() == list(range(90, 1000, 100))
    assert sorted(torch.cat([train, val]).flatten().tolist()) == ids.tolist()
    # At least one block is held out even for a tiny fraction.
    train, val = split_blocks(torch.arange(105), seq_len=50, val_fraction=0.01)
    assert train.shape == (1, 50) and val.tolist() == [list(range(50, 100))]


@pytest.mark.parametrize(
    "n, seq_len, match",
    [(100, 1, "seq_len must be > 1; got 1"), (15, 8, "need at least 2 blocks of 8 tokens; got 15")],
)
def test_split_blocks_errors(n, seq_len, match):
    with pytest.raises(ValueError, match=match):
        split_blocks(torch.arange(n), seq_len)


def test_train_tokenizer_round_trips_text(corpus):
    tok = train_tokenizer(corpus[:50_000], vocab_size=400)
    assert len(tok) == 400
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    sample = corpus[60_000:61_000]
    ids = tok(sample)["input_ids"]
    assert tok.decode(ids) == sample
    # Merges learned on Python source compress it well below one token per byte.
    assert len(ids) < 0.6 * len(sample.encode("utf-8"))
