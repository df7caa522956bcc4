"""Locks on outputs being written, so two processes never write one file at once.

A lock is a ``filelock`` lock file under ``$LMEVAL_REGIONS_CACHE/locks/``, named by a digest
of the output's absolute path (nothing is left beside the user's files). Commands take the
locks of all their outputs before any work and fail at once, with the name of the file, when
another process holds one; the embedded-model cache waits instead (the other process is
converting the same model, whose result it then reuses).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator

from filelock import FileLock, Timeout

from lmeval_regions.cache import cache_dir
from lmeval_regions.errors import RegionsError


def lock_file(path: str | os.PathLike) -> Path:
    """The lock file guarding ``path``."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    return cache_dir() / "locks" / f"{digest}.lock"


@contextlib.contextmanager
def locked(paths: Iterable[str | os.PathLike], wait: float = 0.0) -> Iterator[None]:
    """Hold the locks of ``paths`` (sorted, so two processes never deadlock) for the block.

    ``wait``: seconds to wait for a lock held elsewhere (-1: forever); then
    :class:`RegionsError` names the output and the lock file."""
    unique = sorted({str(Path(p).resolve()) for p in paths})
    with contextlib.ExitStack() as stack:
        for p in unique:
            lf = lock_file(p)
            lf.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(lf), timeout=wait)
            try:
                stack.enter_context(lock)
            except Timeout:
                raise RegionsError(f"'{p}' is being written by another lmeval-regions process "
                                   f"(lock {lf}); wait for it to finish or write elsewhere"
                                   ) from None
        yield
