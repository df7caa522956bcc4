"""Where lmeval-regions keeps what it builds once: converted models, fetched data.

``$LMEVAL_REGIONS_CACHE``, default ``~/.cache/lmeval_regions``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root (not created here)."""
    return Path(os.environ.get("LMEVAL_REGIONS_CACHE", Path.home() / ".cache" / "lmeval_regions"))
