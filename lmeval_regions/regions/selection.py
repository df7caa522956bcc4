"""Selecting a region from importance scores: Top / Bottom / Middle / Random, per matrix, per
row, or globally, from scores in memory or read tensor by tensor from an artefact."""

from __future__ import annotations

import os
from typing import Any, Iterable, Literal, Mapping

import torch

from lmeval_regions.artefacts import LazyScores
from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.importance import criterion_of
from lmeval_regions.regions.ranking import (METHODS, check_ratio, n_select, seed_for,
                                            select_flat, select_global)
from lmeval_regions.regions.region import Region, index_dtype

Method = Literal["top", "bottom", "middle", "random"]
Scope = Literal["matrix", "row", "global"]
SCOPES = ("matrix", "row", "global")


def select(
    scores: Mapping[str, torch.Tensor],
    method: Method,
    ratio: float,
    scope: Scope = "matrix",
    seed: int = 0,
    model: Mapping[str, Any] | None = None,
    names: Iterable[str] | None = None,
    source: Mapping[str, Any] | None = None,
) -> Region:
    """Select a region from importance ``scores`` (``name -> tensor``).

    Args:
        method: ``top`` (largest), ``bottom`` (smallest), ``middle`` (the band of k entries
            centred on the median) or ``random`` (uniform, seeded; ignores the scores' values).
        ratio: fraction in (0, 1]; ``k = max(1, floor(ratio * n))`` entries per unit (paper 1's
            release: ``torch.topk`` with ``k = int(ratio * n)``; see :func:`n_select`).
        scope: the unit k is taken from: ``matrix`` (each parameter, paper 1: "N equals 3% of
            each parameter matrix"), ``row`` (each row of each 2-D parameter; 1-D = one row),
            ``global`` (the whole set of parameters at once).
        names: restrict to these parameters (default all in ``scores``).
    """
    ratio = check_ratio(ratio)
    if method not in METHODS:
        raise RegionsError(f"selection method '{method}' is not one of {METHODS}."
                           + did_you_mean(str(method), METHODS))
    if scope not in SCOPES:
        raise RegionsError(f"selection scope '{scope}' is not one of {SCOPES}."
                           + did_you_mean(str(scope), SCOPES))
    names = list(names) if names is not None else list(scores)
    for n in names:
        if n not in scores:
            raise RegionsError(f"no scores for parameter '{n}'." + did_you_mean(n, scores))
    indices: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    if scope == "global":
        indices, shapes = select_global(scores, names, method, ratio, seed)
    else:
        for n in names:
            x = scores[n]
            shapes[n] = list(x.shape)
            flat = x.detach().reshape(-1)
            if flat.dtype not in (torch.float32, torch.bfloat16):  # bf16 is ranked as stored
                flat = flat.float()
            if scope == "matrix":
                idx = select_flat(flat, n_select(flat.numel(), ratio), method, seed_for(seed, n))
            else:
                rows = flat.view(-1, x.shape[-1]) if x.dim() > 1 else flat.view(1, -1)
                k = n_select(rows.shape[1], ratio)
                parts = [select_flat(r, k, method, seed_for(seed, f"{n}#{i}")) + i * rows.shape[1]
                         for i, r in enumerate(rows)]
                idx = torch.cat(parts)
            indices[n] = idx.to(index_dtype(flat.numel()))
    spec = {"method": method, "ratio": ratio, "scope": scope, "seed": seed,
            "source": dict(source or {})}
    return Region(indices, shapes, dict(model or {}), spec)


def select_from_importance(importance, method: Method, ratio: float, scope: Scope = "matrix",
                           seed: int = 0) -> Region:
    """:func:`select` over an :class:`~lmeval_regions.importance.Importance`, keeping provenance."""
    source = {"languages": importance.languages, "criterion": importance.criterion,
              "snapshot": importance.snapshot, "n_sequences": importance.n_sequences,
              "n_tokens": importance.n_tokens}
    return select(importance.scores, method, ratio, scope, seed, importance.model, source=source)


def select_file(path: str | os.PathLike, method: str, ratio: float, scope: str = "matrix",
                seed: int = 0, names: Iterable[str] | None = None):
    """:func:`regions.select` over an importance artefact read tensor by tensor.

    The region keeps the artefact's model fingerprint and provenance, as
    :func:`regions.select_from_importance` does for an in-memory importance.
    """
    scores = LazyScores(path)
    if names is not None:
        names = list(names)
        scores.check(names)
    meta = scores.meta
    source = {"file": str(path), "languages": meta.get("languages", []),
              "criterion": criterion_of(meta, path, required=False),
              "snapshot": meta.get("snapshot"), "n_sequences": meta.get("n_sequences"),
              "n_tokens": meta.get("n_tokens")}
    return select(scores, method, ratio, scope, seed, meta.get("model", {}), names, source)
