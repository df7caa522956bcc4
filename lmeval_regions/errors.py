"""Errors raised on bad user input; each names the bad value and what was expected."""

from __future__ import annotations

import difflib
from typing import Iterable


class RegionsError(ValueError):
    """Base class for every user-facing error of lmeval-regions."""


class ArtefactError(RegionsError):
    """An artefact file is missing, truncated, corrupt, of the wrong kind or for another model."""


class ModelMismatchError(ArtefactError):
    """An artefact was made for a model whose parameters differ from the loaded one."""


def close_names(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates most similar to ``name`` (for "did you mean" messages)."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    if not found:
        # Globs such as "layers.*.mlp" are far from any single name by edit distance:
        # fall back to the names sharing the longest literal piece of the pattern.
        pieces = [p for p in name.replace("[", "*").replace("?", "*").split("*") if p]
        if pieces:
            longest = max(pieces, key=len)
            found = [c for c in candidates if longest in c][:n]
    return found


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A " Did you mean: a, b?" suffix, or "" when nothing is close."""
    found = close_names(name, candidates)
    return f" Did you mean: {', '.join(found)}?" if found else ""
