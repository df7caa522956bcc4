"""Atomic file writes: a file appears whole at its path, or not at all.

Everything lmeval-regions writes (artefacts, reports, configs, plots) goes through
:func:`atomic_path`: the content is written to a temporary file in the target's folder and
renamed over the target only when the writer finished without an exception, so a crash or a
Ctrl-C leaves any previous file intact and never a half-written one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_path(path: str | os.PathLike) -> "AtomicPath":
    """Context manager yielding a temporary path that replaces ``path`` only on success.

    A crash (or exception) before the end leaves any previous file at ``path`` intact.
    """
    return AtomicPath(Path(path))


class AtomicPath:
    """Context manager behind :func:`atomic_path`."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                   dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            # mkstemp makes the file private (0600), and some writers (safetensors) replace
            # the file they are given: set the permissions a plain open() would, at the end
            umask_permissions(self.tmp)
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def umask_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything under it) the permissions a plain
    ``open()`` / ``mkdir()`` would under the current umask: temporary files and folders
    (``mkstemp``, ``TemporaryDirectory``) are private, and renaming them keeps that."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in items:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (JSON reports, Markdown, configs)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
