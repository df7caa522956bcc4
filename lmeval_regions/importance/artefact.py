"""The importance artefact: per-parameter scores with their provenance, and their sum.

Metadata names the ``criterion`` (``sum_abs``, ``abs_sum``, ``fisher``, ``magnitude``,
``wanda``); artefacts written before criteria existed say ``mode`` (``abs_sum`` or
``sum_abs``, the same meanings) and load unchanged.

Scores are checked when they are read (:func:`check_scores`): a NaN ranks as the largest
score (it would land in every Top region; an all-NaN matrix gives identical Top and Bottom),
and no criterion we compute can be negative, so a non-finite or negative entry is an error
naming the parameter and the count, never a silently wrong region.

Sums (paper 1's core score) run in bounded memory: :class:`ImportanceSum` keeps one fp32
buffer per parameter however many parts are added, and :func:`combine_files` sums artefacts
tensor by tensor into a file (one tensor of each input and one of the sum in memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from lmeval_regions.artefacts import (LazyScores, check_fingerprint, check_same_model,
                                      load_artefact, read_metadata, save_artefact,
                                      write_safetensors)
from lmeval_regions.errors import ArtefactError, RegionsError
from lmeval_regions.importance.accumulator import CRITERIA

KIND = "importance"
NON_NEGATIVE = frozenset(CRITERIA)
"""Criteria whose scores cannot be negative: every one we compute (|θ·Σg|, Σ|θ·g|, Σg², |θ|,
|W|·‖X‖)."""


def check_scores(name: str, scores: torch.Tensor, where: str, criterion: str | None) -> None:
    """Refuse scores no selection can rank (raises :class:`ArtefactError` naming ``where``,
    the parameter and how many entries are bad): non-finite entries, and negative ones of a
    criterion in :data:`NON_NEGATIVE`. ``scores``: any shape, float dtype."""
    if not scores.is_floating_point():
        raise ArtefactError(f"{where}: scores of '{name}' have dtype {scores.dtype}, expected "
                            "floating point")
    if not bool(torch.isfinite(scores).all()):
        nan = int(torch.isnan(scores).sum())
        pos = int((scores == float("inf")).sum())
        neg = int((scores == float("-inf")).sum())
        raise ArtefactError(
            f"{where}: scores of '{name}' hold {nan + pos + neg} non-finite entries of "
            f"{scores.numel()} ({nan} NaN, {pos} +inf, {neg} -inf); importance scores must be "
            "finite (a NaN would rank as the largest score): recompute them")
    if criterion in NON_NEGATIVE and scores.numel() and float(scores.min()) < 0:
        bad = int((scores < 0).sum())
        raise ArtefactError(
            f"{where}: scores of '{name}' hold {bad} negative entries of {scores.numel()} "
            f"(min {float(scores.min()):.4g}); criterion '{criterion}' gives scores >= 0, so "
            "the file was not made by it (or was edited)")


def lazy_scores(path: str | os.PathLike) -> LazyScores:
    """An importance artefact read tensor by tensor (:class:`~lmeval_regions.artefacts.
    LazyScores`), each tensor checked by :func:`check_scores` the first time it is read."""
    scores = LazyScores(path, KIND)
    criterion = criterion_of(scores.meta, path, required=False)
    scores.validate = lambda n, t: check_scores(n, t, f"importance file '{path}'", criterion)
    return scores


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
        """Load an importance artefact, its scores checked (:func:`check_scores`); with
        ``model``, check it was made for that model."""
        tensors, doc = load_artefact(path, KIND)
        if model is not None:
            check_fingerprint(doc["model"], model, what=f"importance file '{path}'", names=list(tensors))
        criterion = criterion_of(doc, path)
        for n, t in tensors.items():
            check_scores(n, t, f"importance file '{path}'", criterion)
        return cls.from_metadata(doc, path, tensors)

    @classmethod
    def header(cls, path: str | os.PathLike) -> "Importance":
        """The provenance of an importance artefact without its scores (``scores`` empty)."""
        return cls.from_metadata(read_metadata(path, KIND), path, {})

    @classmethod
    def from_metadata(cls, doc: Mapping[str, Any], path: Any,
                      tensors: dict[str, torch.Tensor]) -> "Importance":
        """An :class:`Importance` from an artefact's metadata document and its tensors."""
        known = {"criterion", "mode", "model", "languages", "n_sequences", "n_tokens",
                 "n_skipped", "sources", "snapshot"}
        if "model" not in doc:
            raise ArtefactError(f"importance file '{path}' has no model fingerprint")
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


class ImportanceSum:
    """Running per-entry sum of importances (paper 1's core score, Σ_l I_l): one fp32 buffer
    per parameter however many parts are added, so a caller never holds every language's
    scores at once (six languages x 6.5 B entries x 4 B would be 156 GB at 7B; the sum needs
    26 GB).

    Every part must share the first one's model, parameters (names and shapes), criterion and
    snapshot count; the error names the part (``label``). Adding in order gives the same bits
    as ``first + second + ...`` in fp32.
    """

    def __init__(self) -> None:
        self.scores: dict[str, torch.Tensor] | None = None
        """``name -> fp32 sum`` (None before the first part)."""
        self.shapes: dict[str, list[int]] = {}
        self.headers: list[Importance] = []
        """The parts' provenance (their ``scores`` dropped)."""
        self._labels: list[str] = []

    def expect(self, part: Importance, shapes: Mapping[str, list[int]], label: str = "") -> None:
        """Check ``part`` (its provenance; ``shapes`` = its parameters) against the parts so
        far and record its provenance, without touching any scores."""
        label = label or f"part {len(self.headers) + 1}"
        if self.headers:
            first, where = self.headers[0], f"{self._labels[0]} and {label}"
            if part.model.get("sha256") != first.model.get("sha256"):
                raise ArtefactError(f"cannot combine importances of different models: {where}")
            if dict(shapes) != self.shapes:
                diff = sorted(set(shapes) ^ set(self.shapes)) or sorted(
                    n for n in shapes if list(shapes[n]) != list(self.shapes[n]))
                raise ArtefactError(f"cannot combine importances over different parameters "
                                    f"({where}): {diff[:3]}")
            if part.criterion != first.criterion:
                raise ArtefactError(f"cannot combine importance criteria '{first.criterion}' "
                                    f"and '{part.criterion}' ({where})")
            if part.snapshot != first.snapshot:
                raise ArtefactError(f"cannot combine snapshots of {first.snapshot} and "
                                    f"{part.snapshot} sequences (None: whole corpus; {where})")
        else:
            self.shapes = {n: list(v) for n, v in shapes.items()}
        self.headers.append(replace(part, scores={}))
        self._labels.append(label)

    def add(self, part: Importance, label: str = "") -> None:
        """Add ``part``'s scores into the running sum (it may be dropped afterwards)."""
        self.expect(part, {n: list(t.shape) for n, t in part.scores.items()}, label)
        if self.scores is None:
            self.scores = {n: t.float().clone() for n, t in part.scores.items()}
        else:
            for n, t in part.scores.items():
                self.scores[n] += t.float()

    def meta(self) -> Importance:
        """The sum's provenance (``scores`` left empty)."""
        if not self.headers:
            raise RegionsError("combine() needs at least one importance")
        parts, first = self.headers, self.headers[0]
        sizes = sorted({p.extra.get("batch_size") for p in parts}, key=str)
        names = {p.extra.get("model_name") for p in parts}
        return Importance(
            scores={}, criterion=first.criterion, model=first.model,
            languages=[l for p in parts for l in p.languages],
            n_sequences=sum(p.n_sequences for p in parts),
            n_tokens=sum(p.n_tokens for p in parts),
            n_skipped=sum(p.n_skipped for p in parts),
            sources=[s for p in parts for s in p.sources], snapshot=first.snapshot,
            extra={"combined_from": [p.languages for p in parts],
                   "batch_size": sizes[0] if len(sizes) == 1 else sizes,
                   # the same model: the first part's logical-matrix record holds for the sum
                   **({"layouts": first.extra["layouts"]} if "layouts" in first.extra else {}),
                   **({"model_name": names.pop()} if len(names) == 1 and None not in names
                      else {})},
        )

    def result(self) -> Importance:
        """The sum as an :class:`Importance` (its scores are this object's buffers)."""
        return replace(self.meta(), scores=self.scores if self.scores is not None else {})


def combine(parts: Iterable[Importance]) -> Importance:
    """Sum of per-language importances: paper 1's core-region score (Σ_l I_l, per entry).

    All parts must share the model, the parameters, the criterion and the snapshot count.
    Parts are consumed one at a time (:class:`ImportanceSum`): pass a generator to hold one
    part beside the sum."""
    total = ImportanceSum()
    for part in parts:
        total.add(part)
    return total.result()


def check_summable(paths: Iterable[str | os.PathLike], repeat_languages: bool = False) -> None:
    """Before summing importance files, from their metadata alone: refuse a file given twice
    (by path or as the same file under another name) and, unless ``repeat_languages``, two
    files holding one language (either double-counts scores); the files must also share the
    model (:func:`~lmeval_regions.artefacts.check_same_model` names both files), criterion
    and snapshot."""
    paths = [Path(p) for p in paths]
    seen: dict[tuple[int, int], Path] = {}
    for p in paths:
        st = p.stat()
        key = (st.st_dev, st.st_ino)
        if key in seen:
            same = "" if seen[key] == p else f" (as '{seen[key]}')"
            raise ArtefactError(f"importance file '{p}' is given twice{same}: summing it would "
                                "count its scores twice")
        seen[key] = p
    headers = [(p, Importance.header(p)) for p in paths]
    if len(paths) > 1:
        check_same_model(paths, KIND)
    owner: dict[str, Path] = {}
    first_path, first = headers[0]
    for p, h in headers:
        if h.criterion != first.criterion:
            raise ArtefactError(f"'{first_path}' holds criterion '{first.criterion}' and '{p}' "
                                f"'{h.criterion}': scores of different criteria cannot be summed")
        if h.snapshot != first.snapshot:
            raise ArtefactError(f"'{first_path}' is a snapshot of {first.snapshot} sequences and "
                                f"'{p}' of {h.snapshot} (None: whole corpus): they cannot be "
                                "summed")
        for lang in h.languages:
            if lang in owner and not repeat_languages:
                raise ArtefactError(
                    f"language '{lang}' is in both '{owner[lang]}' and '{p}': summing them "
                    f"would count '{lang}' twice; give each language once (to sum several "
                    "corpora of one language on purpose, pass --repeat-languages)")
            owner.setdefault(lang, p)


def combine_files(paths: Iterable[str | os.PathLike], out: str | os.PathLike,
                  repeat_languages: bool = False) -> Importance:
    """Sum importance files into ``out`` tensor by tensor (fp32; one tensor of each input and
    one of the sum in memory), with the metadata :func:`combine` gives; checked first by
    :func:`check_summable`. Returns the sum's provenance (``scores`` empty)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise RegionsError("combine needs at least one importance file")
    check_summable(paths, repeat_languages)
    readers = [lazy_scores(p) for p in paths]
    total = ImportanceSum()
    for p, r in zip(paths, readers):
        total.expect(Importance.from_metadata(r.meta, p, {}), r.shapes, f"'{p}'")

    def produce(name: str) -> torch.Tensor:
        out_t = readers[0][name].float()  # LazyScores returns memory of its own: sum in place
        for r in readers[1:]:
            out_t += r[name].float()
        return out_t

    meta = total.meta()
    layout = {n: (torch.float32, shape) for n, shape in readers[0].shapes.items()}
    write_safetensors(out, layout, produce, meta.meta(), kind=KIND)
    return meta
