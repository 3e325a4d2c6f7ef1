"""Atomic saves: a crash mid-save leaves the previous checkpoint intact."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_nvfp4.checkpoint import atomic_directory, packed, save_packed
from hf_nvfp4.checkpoint.shards import write_sharded


def test_failure_mid_save_keeps_previous_checkpoint(model, tokens, tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    save_packed(model, path, dtype=None)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2.0)

    def crash_after_first_shard(*args, **kwargs):
        def on_shard(_path):
            raise OSError("disk full (injected)")

        return write_sharded(*args, **{**kwargs, "on_shard": on_shard})

    monkeypatch.setattr(packed, "write_sharded", crash_after_first_shard)
    with pytest.raises(OSError, match="injected"):
        save_packed(model, path, dtype=None, max_shard_size="30KB")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    AutoModelForCausalLM.from_pretrained(path)(tokens)


def test_success_replaces_directory_as_a_whole(tmp_path):
    path = tmp_path / "d"
    with atomic_directory(path) as tmp:
        (tmp / "a.txt").write_text("old")
        (tmp / "stale.txt").write_text("x")
    with atomic_directory(path) as tmp:
        assert not (tmp / "a.txt").exists()
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in path.iterdir()) == ["a.txt"]
    assert (path / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_refuses_a_file_path(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"), atomic_directory(tmp_path / "f"):
        pass


def test_checkpoint_directory_follows_the_umask(model, tmp_path):
    old = os.umask(0o022)
    try:
        save_packed(model, tmp_path / "a")
        os.umask(0o027)
        save_packed(model, tmp_path / "b")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "a" / "model.safetensors").stat().st_mode & 0o777 == 0o644
