"""Selecting a region from importance scores: Top / Bottom / Middle / Random, per matrix, per
row, or globally, from scores in memory or read tensor by tensor from an artefact.

Per matrix means per *logical* matrix: a fused projection (GPT-NeoX/BLOOM ``query_key_value``,
GPT-2 ``c_attn``, Phi-3 ``qkv_proj`` and ``gate_up_proj``) is split into its q/k/v (gate/up)
sub-matrices, each getting ``n_select(its entries, ratio)``, as the separate q/k/v of Llama do
(``fused="split"``, the default); ``fused="whole"`` ranks the stored parameter as one matrix.
The split comes from the importance artefact's ``layouts`` metadata (written by
:func:`importance.compute_importance` from :func:`models.matrix_layouts`), so no model is
needed here; per row means per logical output row (a GPT-2 ``Conv1D`` weight is stored
``[in, out]``: its logical rows are stored columns).
"""

from __future__ import annotations

import contextlib
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch

from lmeval_regions import kernels
from lmeval_regions.errors import ArtefactError, RegionsError, did_you_mean
from lmeval_regions.importance import SummedScores, criterion_of, lazy_scores
from lmeval_regions.regions.ranking import (
    METHODS,
    check_ratio,
    checking_reader,
    n_select,
    seed_for,
    select_flat,
    select_global,
    select_matrices,
    shapes_of,
)
from lmeval_regions.regions.region import Region, index_dtype

Method = Literal["top", "bottom", "middle", "random"]
Scope = Literal["matrix", "row", "global"]
SCOPES = ("matrix", "row", "global")
Fused = Literal["split", "whole"]
FUSED = ("split", "whole")


@dataclass
class SelectionConfig:
    """How a ratio is applied when a region is selected (the method and ratio are the
    command's own)."""

    scope: Scope = "matrix"
    """Unit the ratio applies to: each parameter matrix (paper 1: "N equals 3% of each parameter
    matrix"), each row, or all scored entries at once (global)."""
    seed: int = 0
    """Seed of Random selection (drawn per parameter, by name: order-independent)."""
    fused: Fused = "split"
    """Per-matrix scope on a fused projection (GPT-NeoX/BLOOM query_key_value, GPT-2 c_attn,
    Phi-3 qkv_proj/gate_up_proj): split = the ratio of each of its logical q/k/v (gate/up)
    matrices, as for separate q/k/v (Llama); whole = the ratio of the fused matrix."""

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise RegionsError(f"selection scope '{self.scope}' is not one of {SCOPES}."
                               + did_you_mean(str(self.scope), SCOPES))
        check_fused(self.fused)


def check_fused(fused: str) -> str:
    if fused not in FUSED:
        raise RegionsError(f"fused '{fused}' is not one of {FUSED} (split: the ratio of each "
                           "logical q/k/v or gate/up matrix; whole: of the fused matrix)."
                           + did_you_mean(str(fused), FUSED))
    return fused


def _parts(name: str, layout: Mapping[str, Any], shape: list[int]):
    """``(out_dim, {role: output indices})`` of a parameter's layout entry, checked to tile
    its outputs exactly (``parts`` empty when it is not fused)."""
    out_dim = layout.get("out_dim", 0)
    if out_dim not in (0, 1) or len(shape) != 2:
        raise ArtefactError(f"layout of '{name}' has out_dim {out_dim!r} for shape {shape}; "
                            "expected 0 or 1 on a 2-D parameter")
    parts = {r: torch.cat([torch.arange(a, b) for a, b in ranges])
             for r, ranges in (layout.get("parts") or {}).items()}
    # in storage order (q, k, v; gate, up): JSON metadata does not keep key order
    parts = dict(sorted(parts.items(), key=lambda rv: int(rv[1].min())))
    if parts:
        every = torch.sort(torch.cat(list(parts.values()))).values
        if not torch.equal(every, torch.arange(shape[out_dim])):
            raise ArtefactError(f"layout of '{name}': parts {sorted(parts)} do not tile its "
                                f"{shape[out_dim]} outputs exactly once")
    return out_dim, parts


def _stored_flat(rows: torch.Tensor, cols: torch.Tensor, out_dim: int, shape: list[int]):
    """Flat indices in the stored tensor of logical entries (output ``rows``, input ``cols``)."""
    return rows * shape[1] + cols if out_dim == 0 else cols * shape[1] + rows


def _ranked(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.bfloat16) else x.float()  # bf16 ranked as stored


def select(
    scores: Mapping[str, torch.Tensor],
    method: Method,
    ratio: float,
    scope: Scope = "matrix",
    seed: int = 0,
    model: Mapping[str, Any] | None = None,
    names: Iterable[str] | None = None,
    source: Mapping[str, Any] | None = None,
    fused: Fused = "split",
    layouts: Mapping[str, Mapping[str, Any]] | None = None,
) -> Region:
    """Select a region from importance ``scores`` (``name -> tensor``).

    Args:
        method: ``top`` (largest), ``bottom`` (smallest), ``middle`` (the band of k entries
            centred on the median) or ``random`` (uniform, seeded; ignores the scores' values).
        ratio: fraction in (0, 1]; ``k = max(1, floor(ratio * n))`` entries per unit (paper 1's
            release: ``torch.topk`` with ``k = int(ratio * n)``; see :func:`n_select`).
        scope: the unit k is taken from: ``matrix`` (each logical matrix, paper 1: "N equals
            3% of each parameter matrix"), ``row`` (each logical output row of each 2-D
            parameter; 1-D = one row), ``global`` (the whole set of parameters at once).
        names: restrict to these parameters (default all in ``scores``).
        fused: ``split`` (each logical q/k/v, gate/up matrix of a fused parameter is a unit of
            the ``matrix`` scope) or ``whole`` (the stored parameter is).
        layouts: ``param -> {"out_dim", "parts"}`` (an importance artefact's ``layouts``
            metadata, :func:`models.matrix_layouts`); parameters absent are plain
            ``[out, in]`` matrices. ``None``: unknown (an artefact older than the record):
            every parameter is taken whole, and the region's spec says so.

    The region's ``spec`` records ``fused`` and ``split``: ``{param: [roles]}`` of the
    parameters that were selected per logical sub-matrix.
    """
    ratio = check_ratio(ratio)
    check_fused(fused)
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
    # Every tensor read below is done with before the same thread reads another: a lazy
    # mapping may serve the reads from one buffer per thread.
    transient = getattr(scores, "transient_reads", None)
    with transient() if callable(transient) else nullcontext(), kernels.small_pages():
        return _select(scores, method, ratio, scope, seed, model, names, source, fused, layouts)


def _select(scores, method, ratio, scope, seed, model, names, source, fused, layouts) -> Region:
    indices: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    split: dict[str, list[str]] = {}
    if scope == "global":
        indices, shapes = select_global(scores, names, method, ratio, seed)
    else:
        shapes = shapes_of(scores, names)
        layout = {}
        for n in names:
            lay = (layouts or {}).get(n)
            layout[n] = _parts(n, lay, shapes[n]) if lay else (0, {})
        # Whole matrices (not split into logical parts): ranked several at once, each read
        # once (random reads none), its values checked by the ranking's own pass where it can.
        whole = [n for n in names
                 if scope == "matrix" and not (layout[n][1] and fused == "split")]
        read, checked = checking_reader(scores)
        done = select_matrices(lambda n: _ranked(read(n).detach().reshape(-1)), whole,
                               {n: math.prod(shapes[n]) for n in whole}, ratio, method,
                               {n: seed_for(seed, n) for n in whole}, checked) if whole else {}
        for n in names:
            if n in done:
                indices[n] = done[n]
                continue
            x = scores[n].detach()
            out_dim, parts = layout[n]
            if scope == "matrix":
                idx = _select_parts(x, out_dim, parts, method, ratio, seed, n)
                split[n] = list(parts)
            else:
                idx = _select_rows(x, out_dim, method, ratio, seed, n)
            indices[n] = idx.to(index_dtype(x.numel()))
    spec = {"method": method, "ratio": ratio, "scope": scope, "seed": seed, "fused": fused,
            "split": split, "source": dict(source or {})}
    if layouts is None:
        spec["layouts"] = "unknown"  # the importance predates the layout record
    return Region(indices, shapes, dict(model or {}), spec)


def _select_parts(x: torch.Tensor, out_dim: int, parts: Mapping[str, torch.Tensor], method: str,
                  ratio: float, seed: int, name: str) -> torch.Tensor:
    """Per logical sub-matrix of a fused parameter: ``n_select`` of each part's entries,
    ranked in its logical ``[out_part, in]`` order. Returns sorted stored flat indices."""
    logical = x if out_dim == 0 else x.t()  # [out, in]
    n_in = logical.shape[1]
    picked = []
    for role, rows in parts.items():
        sub = _ranked(logical.index_select(0, rows).reshape(-1))
        loc = select_flat(sub, n_select(sub.numel(), ratio), method,
                          seed_for(seed, f"{name}#{role}")).long()
        picked.append(_stored_flat(rows[loc // n_in], loc % n_in, out_dim, list(x.shape)))
    return torch.sort(torch.cat(picked)).values


def _select_rows(x: torch.Tensor, out_dim: int, method: str, ratio: float, seed: int,
                 name: str) -> torch.Tensor:
    """``n_select`` of each logical output row (a stored column when ``out_dim`` is 1)."""
    if x.dim() < 2:
        rows = x.reshape(1, -1)
    else:
        rows = x.reshape(-1, x.shape[-1]) if out_dim == 0 else x.t()
    k = n_select(rows.shape[1], ratio)
    picked = []
    for i, r in enumerate(rows):
        loc = select_flat(_ranked(r.contiguous()), k, method, seed_for(seed, f"{name}#{i}")).long()
        if x.dim() < 2 or out_dim == 0:
            picked.append(loc + i * rows.shape[1])
        else:
            picked.append(_stored_flat(torch.full_like(loc, i), loc, 1, list(x.shape)))
    return torch.sort(torch.cat(picked)).values


def select_from_importance(importance, method: Method, ratio: float, scope: Scope = "matrix",
                           seed: int = 0, fused: Fused = "split") -> Region:
    """:func:`select` over an :class:`~lmeval_regions.importance.Importance`, keeping provenance
    and splitting fused parameters by its ``layouts`` record."""
    source = {"languages": importance.languages, "criterion": importance.criterion,
              "snapshot": importance.snapshot, "n_sequences": importance.n_sequences,
              "n_tokens": importance.n_tokens}
    return select(importance.scores, method, ratio, scope, seed, importance.model, source=source,
                  fused=fused, layouts=importance.extra.get("layouts"))


def select_file(path: str | os.PathLike, method: str, ratio: float, scope: str = "matrix",
                seed: int = 0, names: Iterable[str] | None = None, fused: Fused = "split",
                progress: str | None = None):
    """:func:`regions.select` over an importance artefact read tensor by tensor.

    The region keeps the artefact's model fingerprint and provenance, as
    :func:`regions.select_from_importance` does for an in-memory importance, and splits fused
    parameters by the artefact's ``layouts`` metadata. Each tensor's scores are checked as it
    is read (:func:`importance.check_scores`: no NaN/inf, no negative entry). ``progress``:
    the description of a progress bar counting the parameters read (None: no bar; the
    ``TQDM_DISABLE`` environment variable silences it).
    """
    scores = lazy_scores(path)
    if names is not None:
        names = list(names)
        scores.check(names)
    with _read_progress(scores, progress):
        return _select_lazy(scores, {"file": str(path)}, method, ratio, scope, seed, names,
                            fused)


@contextlib.contextmanager
def _read_progress(scores, desc: str | None):
    """A tqdm bar advanced the first time each parameter of the lazy ``scores`` is read and
    checked (its reader's ``progress`` callback, which :class:`~lmeval_regions.artefacts.
    LazyScores` calls once per tensor); restored and closed on exit."""
    if desc is None:
        yield
        return
    from tqdm.auto import tqdm

    reader = scores.parts[0] if isinstance(scores, SummedScores) else scores
    before = reader.progress
    quiet = os.environ.get("TQDM_DISABLE", "") not in ("", "0")  # --quiet, read at each call
    bar = tqdm(total=len(reader), desc=desc, unit="tensor", leave=False, disable=quiet)
    reader.progress = lambda name: bar.update(1)
    try:
        yield
    finally:
        reader.progress = before
        bar.close()


def _select_lazy(scores, where: dict[str, Any], method: str, ratio: float, scope: str,
                 seed: int, names: list[str] | None, fused: Fused) -> Region:
    """:func:`select` over a lazy mapping with artefact metadata ``scores.meta``, keeping
    its model fingerprint and provenance (plus ``where``: the file or files)."""
    meta = scores.meta
    source = {**where, "languages": meta.get("languages", []),
              "criterion": criterion_of(meta, where, required=False),
              "snapshot": meta.get("snapshot"), "n_sequences": meta.get("n_sequences"),
              "n_tokens": meta.get("n_tokens")}
    return select(scores, method, ratio, scope, seed, meta.get("model", {}), names, source,
                  fused, meta.get("layouts"))


def select_files(paths: Sequence[str | os.PathLike], method: str, ratio: float,
                 scope: str = "matrix", seed: int = 0, names: Iterable[str] | None = None,
                 fused: Fused = "split", progress: str | None = None) -> Region:
    """:func:`select_file` over the per-entry sum of several importance artefacts (paper 1's
    core score), read tensor by tensor (:class:`importance.SummedScores`): memory is one
    parameter's summed scores plus the selected indices, whatever the files' sizes.

    The region is the one :func:`select_from_importance` gives on :func:`importance.combine`
    of the loaded files (the same fp32 sums, the same provenance); one file is
    :func:`select_file`.
    """
    paths = list(paths)
    if len(paths) == 1:
        return select_file(paths[0], method, ratio, scope, seed, names, fused, progress)
    scores = SummedScores(paths)
    if names is not None:
        names = list(names)
        scores.check(names)
    with _read_progress(scores, progress):
        return _select_lazy(scores, {"files": [str(p) for p in paths]}, method, ratio, scope,
                            seed, names, fused)
