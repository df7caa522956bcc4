"""The importance artefact: per-parameter scores with their provenance, and their sum.

Metadata names the ``criterion`` (``sum_abs``, ``abs_sum``, ``fisher``, ``magnitude``,
``wanda``); artefacts written before criteria existed say ``mode`` (``abs_sum`` or
``sum_abs``, the same meanings) and load unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from lmeval_regions.artefacts import (LazyScores, check_fingerprint, load_artefact,
                                      write_safetensors)
from lmeval_regions.errors import ArtefactError, RegionsError

KIND = "importance"


@dataclass
class Importance:
    """Importance scores ``name -> tensor`` (shape of the parameter) with their provenance."""

    scores: dict[str, torch.Tensor]
    """``name -> scores`` shaped like the parameter (fp32 from a pass; bf16 from one process'
    bf16 accumulators, whose values they are exactly)."""
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
        """Write the artefact atomically, tensor by tensor (one score tensor at a time is
        copied to the host, whatever the model size)."""
        layout = {n: (t.dtype, list(t.shape)) for n, t in self.scores.items()}
        write_safetensors(path, layout, self.scores.__getitem__, self.meta(), kind=KIND)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "Importance":
        """Load an importance artefact; with ``model``, check it was made for that model."""
        tensors, doc = load_artefact(path, KIND)
        if model is not None:
            check_fingerprint(doc["model"], model, what=f"importance file '{path}'", names=list(tensors))
        return cls.from_meta(tensors, doc, path)

    @classmethod
    def from_meta(cls, scores: dict[str, torch.Tensor], doc: Mapping[str, Any],
                  path: Any = "importance") -> "Importance":
        """An importance from its scores and artefact metadata (as :meth:`meta` writes it)."""
        known = {"criterion", "mode", "model", "languages", "n_sequences", "n_tokens",
                 "n_skipped", "sources", "snapshot"}
        return cls(
            scores=scores, criterion=criterion_of(doc, path), model=doc["model"],
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


def combined_meta(docs: Sequence[Mapping[str, Any]], names: Sequence[Iterable[str]],
                  labels: Sequence[str] | None = None) -> dict[str, Any]:
    """The metadata of the per-entry sum of importances with metadata ``docs`` (as
    :meth:`Importance.meta` or an artefact's header holds it) over parameters ``names``,
    checked to share the model, the parameters, the criterion and the snapshot count.
    ``labels`` name the parts in errors (e.g. their files)."""
    if not docs:
        raise RegionsError("combine() needs at least one importance")
    labels = list(labels) if labels is not None else [f"part {i}" for i in range(len(docs))]
    first, first_names = docs[0], set(names[0])
    crit = criterion_of(first, labels[0])
    for doc, ns, label in zip(docs[1:], names[1:], labels[1:]):
        if doc["model"]["sha256"] != first["model"]["sha256"]:
            raise ArtefactError(f"cannot combine importances computed on different models "
                                f"({labels[0]}, {label})")
        if set(ns) != first_names:
            diff = sorted(set(ns) ^ first_names)
            raise ArtefactError(f"cannot combine importances over different parameters "
                                f"({labels[0]}, {label}): {diff[:3]}")
        if criterion_of(doc, label) != crit:
            raise ArtefactError(f"cannot combine importance criteria '{crit}' and "
                                f"'{criterion_of(doc, label)}' ({labels[0]}, {label})")
        if doc.get("snapshot") != first.get("snapshot"):
            raise ArtefactError(f"cannot combine snapshots of {first.get('snapshot')} and "
                                f"{doc.get('snapshot')} sequences (None: whole corpus)")
    sizes = sorted({d.get("batch_size") for d in docs}, key=str)
    return {
        "criterion": crit, "model": first["model"],
        "languages": [l for d in docs for l in d.get("languages", [])],
        "n_sequences": sum(d.get("n_sequences", 0) for d in docs),
        "n_tokens": sum(d.get("n_tokens", 0) for d in docs),
        "n_skipped": sum(d.get("n_skipped", 0) for d in docs),
        "sources": [x for d in docs for x in d.get("sources", [])],
        "snapshot": first.get("snapshot"),
        "combined_from": [d.get("languages", []) for d in docs],
        "batch_size": sizes[0] if len(sizes) == 1 else sizes,
        # the same model: the first part's logical-matrix record holds for the sum
        **({"layouts": first["layouts"]} if "layouts" in first else {}),
    }


def combine(parts: Iterable[Importance]) -> Importance:
    """Sum of per-language importances: paper 1's core-region score (Σ_l I_l, per entry, in
    fp32, parts added in order).

    All parts must share the model, the parameters, the criterion and the snapshot count."""
    parts = list(parts)
    meta = combined_meta([p.meta() for p in parts], [list(p.scores) for p in parts])
    first = parts[0]
    scores = {n: sum((p.scores[n].float() for p in parts[1:]), first.scores[n].float().clone())
              for n in first.scores}
    return Importance.from_meta(scores, meta)


class SummedScores(Mapping[str, torch.Tensor]):
    """:func:`combine` of importance artefacts, read tensor by tensor: ``name -> tensor`` like
    :class:`~lmeval_regions.artefacts.LazyScores`, where reading a name reads that tensor from
    each file and adds them in fp32, in file order (the very sums :func:`combine` makes).

    Memory: the sum and one file's tensor of one parameter, whatever the number and size of
    the files. One file is read as stored (a bf16 artefact stays bf16, as
    :meth:`Importance.load` reads it).

    Attributes:
        paths: the files.
        shapes: ``name -> shape`` (from the headers).
        dtypes: ``name -> dtype`` of the tensors returned.
        meta: the metadata :func:`combine` gives the sum (one file: its own).
    """

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise RegionsError("combine() needs at least one importance")
        self.parts = [LazyScores(p, KIND) for p in self.paths]
        first = self.parts[0]
        if len(self.parts) == 1:
            self.meta = dict(first.meta)
            self.dtypes = dict(first.dtypes)
        else:
            self.meta = combined_meta([p.meta for p in self.parts], [list(p) for p in self.parts],
                                      [str(p) for p in self.paths])
            self.dtypes = dict.fromkeys(first, torch.float32)
        self.shapes = dict(first.shapes)
        for part, path in zip(self.parts[1:], self.paths[1:]):
            for n, shape in part.shapes.items():
                if shape != self.shapes[n]:
                    raise ArtefactError(f"cannot combine '{self.paths[0]}' and '{path}': "
                                        f"'{n}' has shapes {self.shapes[n]} and {shape}")

    def __getitem__(self, name: str) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.parts[0][name]
        total = self.parts[0][name].float()  # a new tensor (LazyScores reads into new memory)
        for part in self.parts[1:]:
            total += part[name].float()
        return total

    def __iter__(self) -> Iterator[str]:
        return iter(self.parts[0])

    def __len__(self) -> int:
        return len(self.parts[0])

    def check(self, names: Iterable[str]) -> None:
        """Raise naming the first of ``names`` without scores."""
        self.parts[0].check(names)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the sum as an importance artefact, one tensor at a time."""
        layout = {n: (self.dtypes[n], self.shapes[n]) for n in self}
        meta = {k: v for k, v in self.meta.items() if k not in ("kind", "library_version")}
        return write_safetensors(path, layout, self.__getitem__, meta, kind=KIND)
