"""Atomic folder writes: a folder appears complete at its final path, or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def check_new_path(path, *, overwrite: bool = False) -> Path:
    """``path`` as a Path; an existing one is an error unless ``overwrite``. Callers check early,
    before expensive work, and :func:`atomic_dir` checks again when it writes."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"out={str(path)!r} already exists: expected a new path "
                         "(or pass overwrite=True / --overwrite)")
    return path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_dir(path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it to ``path`` only if the block succeeds.

    On an exception the temporary folder is removed and ``path`` is left as it was. An existing
    ``path`` is an error unless ``overwrite``; then it is replaced (renamed aside, then deleted).
    """
    path = check_new_path(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_file(path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds,
    so a reader sees the old file or the whole new one, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(root, pattern: str = "**/*") -> str:
    """Hex sha256 over the relative paths and bytes of the files under ``root`` that match the
    glob ``pattern``, in sorted order: the identity of a saved folder's contents."""
    root = Path(root)
    h = hashlib.sha256()
    for file in sorted(p for p in root.glob(pattern) if p.is_file()):
        h.update(str(file.relative_to(root)).encode() + b"\0")
        h.update(file.read_bytes())
    return h.hexdigest()
