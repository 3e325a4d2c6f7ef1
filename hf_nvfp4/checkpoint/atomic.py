"""Atomic checkpoint directories: a crash mid-save leaves the previous checkpoint intact.

Everything is written into a temporary sibling directory (same parent, so same filesystem),
each file and the directory are fsync'ed, and only then is the temporary directory renamed
onto the target. Replacing an existing checkpoint takes two renames (old -> ``.<name>.old-*``,
new -> name); a crash between them leaves the previous checkpoint complete under the
``.old`` name, never a half-written one under the real name. Directories and files get the
permissions of ``mkdir`` and ``open`` under the user's umask (as ``save_pretrained``'s), not
the owner-only modes of a temporary directory or of safetensors' writer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: best effort, not every OS allows it)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    """The process umask (reading it means setting it; it is restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Give ``root``'s directories mode 0o777 and its files 0o666, less the umask."""
    mask = _current_umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o666 & ~mask)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then the directories bottom-up."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds.

    On an exception the temporary directory is removed and ``path`` is left untouched.
    ``path`` must not be an existing file.
    """
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"checkpoint path {target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["atomic_directory", "fsync_tree"]
