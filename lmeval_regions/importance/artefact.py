"""The importance artefact: per-parameter scores with their provenance, and their sum.

Metadata names the ``criterion`` (``sum_abs``, ``abs_sum``, ``fisher``, ``magnitude``,
``wanda``); artefacts written before criteria existed say ``mode`` (``abs_sum`` or
``sum_abs``, the same meanings) and load unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from lmeval_regions.artefacts import check_fingerprint, load_artefact, save_artefact
from lmeval_regions.errors import ArtefactError, RegionsError

KIND = "importance"


@dataclass
class Importance:
    """Importance scores ``name -> tensor`` (shape of the parameter) with their provenance."""

    scores: dict[str, torch.Tensor]
    """``name -> scores`` shaped like the parameter (fp32 from a pass)."""
    criterion: str
    """How the scores were made (see :data:`importance.CRITERIA`)."""
    model: dict[str, Any]
    """Model fingerprint (see :func:`artefacts.model_fingerprint`)."""
    languages: list[str] = field(default_factory=list)
    """Languages of the corpus (several after :func:`combine`)."""
    n_sequences: int = 0
    """Sequences read."""
    n_tokens: int = 0
    """Predicted (scored) tokens read."""
    n_skipped: int = 0
    """Batches skipped because a gradient was not finite."""
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Where the corpus came from (file digests, units, ...)."""
    snapshot: int | None = None
    """The sequence count of a cumulative snapshot (None: the whole corpus)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Everything else in the metadata (``batch_size``, ``include``, ...)."""

    @property
    def mode(self) -> str:
        """Former name of :attr:`criterion` (read-only)."""
        return self.criterion

    def meta(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion, "model": self.model, "languages": self.languages,
            "n_sequences": self.n_sequences, "n_tokens": self.n_tokens,
            "n_skipped": self.n_skipped, "sources": self.sources, "snapshot": self.snapshot,
            **self.extra,
        }

    def save(self, path: str | os.PathLike) -> None:
        save_artefact(path, self.scores, KIND, self.meta())

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "Importance":
        """Load an importance artefact; with ``model``, check it was made for that model."""
        tensors, doc = load_artefact(path, KIND)
        if model is not None:
            check_fingerprint(doc["model"], model, what=f"importance file '{path}'", names=list(tensors))
        known = {"criterion", "mode", "model", "languages", "n_sequences", "n_tokens",
                 "n_skipped", "sources", "snapshot"}
        return cls(
            scores=tensors, criterion=criterion_of(doc, path), model=doc["model"],
            languages=doc.get("languages", []), n_sequences=doc.get("n_sequences", 0),
            n_tokens=doc.get("n_tokens", 0), n_skipped=doc.get("n_skipped", 0),
            sources=doc.get("sources", []), snapshot=doc.get("snapshot"),
            extra={k: v for k, v in doc.items() if k not in known | {"kind", "library_version"}},
        )

    @property
    def shapes(self) -> dict[str, list[int]]:
        return {n: list(t.shape) for n, t in self.scores.items()}


def criterion_of(meta: Mapping[str, Any], path: Any = "importance", required: bool = True
                 ) -> str | None:
    """The criterion an importance artefact's metadata names (``mode`` in older files); None
    when it names none and not ``required``."""
    c = meta.get("criterion", meta.get("mode"))
    if c is None and required:
        raise ArtefactError(f"'{path}' names no importance criterion (no 'criterion' or 'mode' "
                            "in its metadata)")
    return c


def combine(parts: Iterable[Importance]) -> Importance:
    """Sum of per-language importances: paper 1's core-region score (Σ_l I_l, per entry).

    All parts must share the model, the parameters, the criterion and the snapshot count."""
    parts = list(parts)
    if not parts:
        raise RegionsError("combine() needs at least one importance")
    first = parts[0]
    for p in parts[1:]:
        if p.model["sha256"] != first.model["sha256"]:
            raise ArtefactError("cannot combine importances computed on different models")
        if set(p.scores) != set(first.scores):
            diff = sorted(set(p.scores) ^ set(first.scores))
            raise ArtefactError(f"cannot combine importances over different parameters: {diff[:3]}")
        if p.criterion != first.criterion:
            raise ArtefactError(f"cannot combine importance criteria '{first.criterion}' and "
                                f"'{p.criterion}'")
        if p.snapshot != first.snapshot:
            raise ArtefactError(f"cannot combine snapshots of {first.snapshot} and {p.snapshot} "
                                "sequences (None: whole corpus)")
    scores = {n: sum((p.scores[n].float() for p in parts[1:]), first.scores[n].float().clone())
              for n in first.scores}
    sizes = sorted({p.extra.get("batch_size") for p in parts}, key=str)
    return Importance(
        scores=scores, criterion=first.criterion, model=first.model,
        languages=[l for p in parts for l in p.languages],
        n_sequences=sum(p.n_sequences for p in parts), n_tokens=sum(p.n_tokens for p in parts),
        n_skipped=sum(p.n_skipped for p in parts),
        sources=[s for p in parts for s in p.sources], snapshot=first.snapshot,
        extra={"combined_from": [p.languages for p in parts],
               "batch_size": sizes[0] if len(sizes) == 1 else sizes,
               # the same model: the first part's logical-matrix record holds for the sum
               **({"layouts": first.extra["layouts"]} if "layouts" in first.extra else {})},
    )
