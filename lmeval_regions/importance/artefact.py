"""The importance artefact: per-parameter scores with their provenance, and their sum.

Metadata names the ``criterion`` (``sum_abs``, ``abs_sum``, ``fisher``, ``magnitude``,
``wanda``); artefacts written before criteria existed say ``mode`` (``abs_sum`` or
``sum_abs``, the same meanings) and load unchanged.

Scores are checked when they are read (:func:`check_scores`): a NaN ranks as the largest
score (it would land in every Top region; an all-NaN matrix gives identical Top and Bottom),
and no criterion we compute can be negative, so a non-finite or negative entry is an error
naming the parameter and the count, never a silently wrong region.

Sums (paper 1's core score) run in bounded memory: :func:`combine` keeps one fp32 buffer per
parameter however many parts it is given (one part at a time from a generator), and
:class:`SummedScores` reads the same sum over artefact files tensor by tensor (one tensor of
each file and one of the sum in memory): :func:`combine_files` writes it, selection ranks it.
:func:`combined_meta` is the one check (same model, parameters, criterion, snapshot) and
provenance of a sum.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from lmeval_regions import kernels
from lmeval_regions.artefacts import (
    LazyScores,
    check_fingerprint,
    check_same_model,
    load_artefact,
    read_metadata,
    write_safetensors,
)
from lmeval_regions.errors import ArtefactError, RegionsError
from lmeval_regions.importance.accumulator import CRITERIA

KIND = "importance"
NON_NEGATIVE = frozenset(CRITERIA)
"""Criteria whose scores cannot be negative: every one we compute (|θ·Σg|, Σ|θ·g|, Σg², |θ|,
|W|·‖X‖)."""
_BITS = {torch.bfloat16: (torch.int16, kernels.INF16),
         torch.float32: (torch.int32, kernels.INF32)}


def check_scores(name: str, scores: torch.Tensor, where: str, criterion: str | None) -> None:
    """Refuse scores no selection can rank (raises :class:`ArtefactError` naming ``where``,
    the parameter and how many entries are bad): non-finite entries, and negative ones of a
    criterion in :data:`NON_NEGATIVE`. ``scores``: any shape, float dtype."""
    if not scores.is_floating_point():
        raise ArtefactError(f"{where}: scores of '{name}' have dtype {scores.dtype}, expected "
                            "floating point")
    if scores.dtype in _BITS and scores.numel():
        # the common case in one vectorised pass: every bit pattern, read as a signed integer,
        # in [0, +inf's) <=> every value finite and >= +0.0 (torch's isfinite + min on bf16
        # took ~15x as long); anything else is counted exactly below
        bits, inf = _BITS[scores.dtype]
        lo, hi = torch.aminmax(scores.view(bits))
        if int(lo) >= 0 and int(hi) < inf:
            return
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
        """Load an importance artefact, its scores checked (:func:`check_scores`); with
        ``model``, check it was made for that model."""
        tensors, doc = load_artefact(path, KIND)
        if model is not None:
            check_fingerprint(doc["model"], model, what=f"importance file '{path}'",
                              names=list(tensors))
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
    model_names = {d.get("model_name") for d in docs}
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
        # figure titles name the model: kept when every part names the same one
        **({"model_name": model_names.pop()} if len(model_names) == 1 and None not in model_names
           else {}),
    }


def combine(parts: Iterable[Importance]) -> Importance:
    """Sum of per-language importances: paper 1's core-region score (Σ_l I_l, per entry, in
    fp32, parts added in order).

    All parts must share the model, the parameters (names and shapes), the criterion and the
    snapshot count (:func:`combined_meta`). Parts are consumed one at a time: pass a generator
    to hold one part beside the sum (six languages x 6.5 B entries x 4 B would be 156 GB at 7B;
    the sum needs 26 GB)."""
    total: dict[str, torch.Tensor] = {}
    docs: list[dict[str, Any]] = []
    names: list[list[str]] = []
    for i, part in enumerate(parts):
        docs.append(part.meta())
        names.append(list(part.scores))
        combined_meta(docs[:1] + docs[-1:], names[:1] + names[-1:], ["part 0", f"part {i}"])
        for n, t in part.scores.items():
            if n not in total:
                total[n] = t.float().clone()
            elif total[n].shape != t.shape:
                raise ArtefactError(f"cannot combine importances over different parameters "
                                    f"(part 0, part {i}): '{n}' has shapes "
                                    f"{list(total[n].shape)} and {list(t.shape)}")
            else:
                total[n] += t.float()
        del part  # one part alive at a time (the loop variable would hold it to the next)
    return Importance.from_metadata(combined_meta(docs, names), "combine", total)


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
        self.parts = [lazy_scores(p) for p in self.paths]  # scores checked when read
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


def combine_files(paths: Iterable[str | os.PathLike], out: str | os.PathLike,
                  repeat_languages: bool = False) -> Importance:
    """Sum importance files into ``out`` tensor by tensor (:class:`SummedScores`: one tensor of
    each input and one of the sum in memory), with the metadata :func:`combine` gives; checked
    first by :func:`check_summable`. Returns the sum's provenance (``scores`` empty)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise RegionsError("combine needs at least one importance file")
    check_summable(paths, repeat_languages)
    summed = SummedScores(paths)
    summed.save(out)
    return Importance.from_metadata(summed.meta, out, {})
