"""Figures without pyplot: no global state, no backend switch.

``matplotlib.use("Agg")`` at import would change a notebook user's backend, and pyplot keeps
every figure alive until closed. Here each figure is a :class:`matplotlib.figure.Figure` of
its own (rendered by Agg when saved) and :func:`save_figure` writes it atomically.

Every figure we write is readable at its default size: :func:`save_figure` raises tick labels
to :data:`MIN_FONT` points and thins any tick labels that would overlap (measured on the
renderer, not guessed), and :func:`title` puts what was plotted, the model and the settings
on top.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

from lmeval_regions.artefacts import atomic_path

MIN_FONT = 7.0
"""Smallest font (points) of a tick label: smaller is unreadable in a PNG at 110-120 dpi."""


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.4, 4.8),
             **kwargs: Any):
    """``(figure, axes)`` like ``pyplot.subplots``, on a figure pyplot does not track (with
    an Agg canvas, so text can be measured before saving)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def title(fig, what: str, context: str = "") -> None:
    """The figure's title: ``what`` is plotted, then (smaller, wrapped) the model and the
    settings it was made with."""
    width = max(40, int(fig.get_figwidth() * 14))  # ~characters per line at 9-10 pt
    text = what if not context else what + "\n" + textwrap.fill(context, width)
    fig.suptitle(text, fontsize=10)


def _overlap(boxes) -> bool:
    return any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))


def readable_ticks(fig) -> None:
    """Raise every tick label to at least :data:`MIN_FONT` points and keep every k-th major
    tick (smallest k) of an axis whose labels would overlap, measured on the Agg renderer."""
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for axis, get, set_ in (("x", ax.get_xticklabels, ax.set_xticks),
                                ("y", ax.get_yticklabels, ax.set_yticks)):
            for t in get():
                if t.get_fontsize() < MIN_FONT:
                    t.set_fontsize(MIN_FONT)
            fig.draw_without_rendering()
            labels = [t for t in get() if t.get_visible() and t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in labels]
            if not _overlap(boxes):
                continue
            ticks = list(ax.get_xticks() if axis == "x" else ax.get_yticks())
            texts = [t.get_text() for t in get()]
            style = {"fontsize": max(MIN_FONT, get()[0].get_fontsize()),
                     "rotation": get()[0].get_rotation()}
            for k in range(2, len(ticks) + 1):
                set_(ticks[::k], texts[::k], **style)
                fig.draw_without_rendering()
                boxes = [t.get_window_extent(renderer) for t in get()
                         if t.get_visible() and t.get_text()]
                if not _overlap(boxes):
                    break


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, PNG by default), atomically, with
    readable ticks (:func:`readable_ticks`); the file and any folder made for it get the
    permissions the umask gives."""
    path = Path(path)
    if fig.canvas.__class__.__name__ != "FigureCanvasAgg":
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    readable_ticks(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    return path
