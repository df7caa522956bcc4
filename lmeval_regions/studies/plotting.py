"""Figures without pyplot: no global state, no backend switch.

``matplotlib.use("Agg")`` at import would change a notebook user's backend, and pyplot keeps
every figure alive until closed. Here each figure is a :class:`matplotlib.figure.Figure` of
its own (rendered by Agg when saved) and :func:`save_figure` writes it atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmeval_regions.artefacts import atomic_path


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.4, 4.8),
             **kwargs: Any):
    """``(figure, axes)`` like ``pyplot.subplots``, on a figure pyplot does not track."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, PNG by default), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    return path
