"""Regions: sets of parameter entries, stored as per-parameter flat indices.

A :class:`Region` maps parameter names to sorted, unique flat indices (int32 where the parameter
has fewer than 2**31 entries). It is built by selecting from importance scores
(:func:`select`), from entry specs such as ``model.layers.1.input_layernorm.weight[2100]`` or
``model.layers.*.self_attn.o_proj.weight[:, 5]`` (:func:`from_specs`), or by set algebra.
Its artefact is a safetensors file of index tensors keyed by parameter name; never dense masks.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

import numpy as np
import torch
from torch import nn

from .artefacts import check_fingerprint, load_artefact, model_fingerprint, save_artefact
from .errors import ArtefactError, RegionsError, did_you_mean

KIND = "region"
Method = Literal["top", "bottom", "middle", "random"]
Scope = Literal["matrix", "row", "global"]
METHODS = ("top", "bottom", "middle", "random")
SCOPES = ("matrix", "row", "global")


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def n_select(n: int, ratio: float) -> int:
    """How many of ``n`` entries a ratio selects: round half up, at least 1."""
    return max(1, min(n, math.floor(ratio * n + 0.5)))


def check_ratio(ratio: float) -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise RegionsError(f"ratio {ratio!r} is not a number; expected a value in (0, 1]") from None
    if not (0.0 < r <= 1.0) or math.isnan(r):
        raise RegionsError(f"ratio {ratio!r} is outside (0, 1]; e.g. 0.01 selects 1%")
    return r


@dataclass
class Region:
    """A set of entries of named parameters.

    Attributes:
        indices: ``name -> 1-D int tensor`` of sorted unique flat indices into that parameter.
        shapes: ``name -> shape`` for every parameter in ``indices``.
        model: fingerprint of the model the region belongs to (may be ``{}`` for ad-hoc regions).
        spec: how the region was made (selection method, ratio, scope, seed, sources...).
    """

    indices: dict[str, torch.Tensor]
    shapes: dict[str, list[int]]
    model: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)

    # ---- size -------------------------------------------------------------------------
    def numel(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    def counts(self) -> dict[str, int]:
        return {n: int(i.numel()) for n, i in self.indices.items()}

    def __len__(self) -> int:
        return self.numel()

    def mask(self, name: str) -> torch.Tensor:
        """Dense boolean mask of one parameter (shape of the parameter)."""
        shape = self.shapes[name]
        m = torch.zeros(math.prod(shape), dtype=torch.bool)
        if name in self.indices:
            m[self.indices[name].long()] = True
        return m.view(shape)

    def coords(self, name: str) -> torch.Tensor:
        """``(k, ndim)`` coordinates of the entries of one parameter."""
        idx = self.indices[name].long()
        shape = self.shapes[name]
        out = []
        for size in reversed(shape):
            out.append(idx % size)
            idx = idx // size
        return torch.stack(list(reversed(out)), dim=1)

    # ---- set algebra ------------------------------------------------------------------
    def _combine(self, other: "Region", op: str) -> "Region":
        if self.model and other.model and self.model.get("sha256") != other.model.get("sha256"):
            raise ArtefactError(f"cannot {op} regions of different models")
        for n in set(self.shapes) & set(other.shapes):
            if list(self.shapes[n]) != list(other.shapes[n]):
                raise ArtefactError(f"cannot {op} regions: '{n}' has shapes "
                                    f"{self.shapes[n]} and {other.shapes[n]}")
        names = sorted(set(self.indices) | set(other.indices))
        out, shapes = {}, {}
        empty = np.empty(0, dtype=np.int64)
        for n in names:
            a = self.indices[n].numpy() if n in self.indices else empty
            b = other.indices[n].numpy() if n in other.indices else empty
            if op == "union":
                r = np.union1d(a, b)
            elif op == "intersection":
                r = np.intersect1d(a, b, assume_unique=True)
            else:
                r = np.setdiff1d(a, b, assume_unique=True)
            if r.size:
                shape = self.shapes.get(n, other.shapes.get(n))
                out[n] = torch.from_numpy(r.astype(np.int64)).to(index_dtype(math.prod(shape)))
                shapes[n] = list(shape)
        return Region(out, shapes, self.model or other.model,
                      {"op": op, "operands": [self.spec, other.spec]})

    def union(self, other: "Region") -> "Region":
        return self._combine(other, "union")

    def intersection(self, other: "Region") -> "Region":
        return self._combine(other, "intersection")

    def difference(self, other: "Region") -> "Region":
        return self._combine(other, "difference")

    __or__ = union
    __and__ = intersection
    __sub__ = difference

    # ---- persistence ------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        meta = {"model": self.model, "shapes": self.shapes, "spec": self.spec,
                "numel": self.numel()}
        save_artefact(path, self.indices, KIND, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "Region":
        """Load a region artefact; with ``model``, check every covered parameter exists there
        with the same shape (the error names the first mismatch)."""
        tensors, doc = load_artefact(path, KIND)
        shapes = {n: list(s) for n, s in doc["shapes"].items()}
        for n, t in tensors.items():
            if n not in shapes:
                raise ArtefactError(f"region file '{path}' has indices for '{n}' but no shape")
            if t.numel() and (int(t.max()) >= math.prod(shapes[n]) or int(t.min()) < 0):
                raise ArtefactError(f"region file '{path}' is corrupt: indices of '{n}' fall "
                                    f"outside its shape {shapes[n]}")
        if model is not None:
            if doc.get("model"):
                check_fingerprint(doc["model"], model, what=f"region file '{path}'",
                                  names=list(tensors))
            else:
                check_fingerprint({"params": shapes}, model, what=f"region file '{path}'")
        return cls(tensors, shapes, doc.get("model", {}), doc.get("spec", {}))


# ---- selection from scores ----------------------------------------------------------------

def _seed_for(seed: int, name: str) -> int:
    # Seeded per parameter by name, so a region does not depend on parameter order.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


_SORT_LIMIT = 1 << 20
"""Up to this many entries per-matrix/row selection sorts; above, it radix-selects."""


def _select_flat(x: torch.Tensor, k: int, method: str, gen_seed: int) -> torch.Tensor:
    """Flat indices of ``k`` entries of the 1-D tensor ``x`` by ``method`` (sorted).

    Ties are broken by position (lower flat index first), so the result is deterministic.
    """
    n = x.numel()
    if method == "random":
        g = torch.Generator().manual_seed(gen_seed)
        return torch.sort(torch.randperm(n, generator=g)[:k]).values
    if method not in METHODS:
        raise RegionsError(f"selection method '{method}' is not one of {METHODS}")
    from .selection_global import select_window, window

    lo, descending = window(method, n, k)
    if n <= _SORT_LIMIT:  # small (rows, small matrices): one stable sort is fastest
        order = torch.sort(x, descending=descending, stable=True).indices[lo:lo + k]
        return torch.sort(order).values
    # Large: radix select in chunks, the same ranks as a stable sort in bounded memory
    # (a 45M-entry matrix at 7B scale would need ~1 GB to sort).
    return select_window(lambda _: x, ["x"], {"x": n}, lo, k, descending, {"x": x.dtype})["x"]


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
        ratio: fraction in (0, 1]; ``k = max(1, floor(ratio * n + 1/2))`` entries per unit.
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
        from .selection_global import select_global  # streaming two-pass selection
        indices, shapes = select_global(scores, names, method, ratio, seed)
    else:
        for n in names:
            x = scores[n]
            shapes[n] = list(x.shape)
            flat = x.detach().reshape(-1)
            if flat.dtype not in (torch.float32, torch.bfloat16):  # bf16 is ranked as stored
                flat = flat.float()
            if scope == "matrix":
                idx = _select_flat(flat, n_select(flat.numel(), ratio), method, _seed_for(seed, n))
            else:
                rows = flat.view(-1, x.shape[-1]) if x.dim() > 1 else flat.view(1, -1)
                k = n_select(rows.shape[1], ratio)
                parts = [_select_flat(r, k, method, _seed_for(seed, f"{n}#{i}")) + i * rows.shape[1]
                         for i, r in enumerate(rows)]
                idx = torch.cat(parts)
            indices[n] = idx.to(index_dtype(flat.numel()))
    spec = {"method": method, "ratio": ratio, "scope": scope, "seed": seed,
            "source": dict(source or {})}
    return Region(indices, shapes, dict(model or {}), spec)


def select_from_importance(importance, method: Method, ratio: float, scope: Scope = "matrix",
                           seed: int = 0) -> Region:
    """:func:`select` over an :class:`~lmeval_regions.importance.Importance`, keeping provenance."""
    source = {"languages": importance.languages, "mode": importance.mode,
              "n_sequences": importance.n_sequences, "n_tokens": importance.n_tokens}
    return select(importance.scores, method, ratio, scope, seed, importance.model, source=source)


# ---- regions from entry specs -------------------------------------------------------------

_SPEC = re.compile(r"^\s*(?P<name>[^\[\]\s]+)\s*(?:\[(?P<index>[^\]]*)\])?\s*$")


def _parse_index(text: str, shape: list[int], spec: str) -> torch.Tensor:
    """Flat indices selected by a numpy-style index of ints and slices (``2100``, ``:, 5``)."""
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    if len(parts) > len(shape):
        raise RegionsError(f"entry spec '{spec}' has {len(parts)} indices but the parameter "
                           f"has shape {shape}")
    grid = torch.arange(math.prod(shape)).view(shape)
    key = []
    for p, size in zip(parts, shape):
        try:
            if ":" in p:
                bits = [int(b) if b.strip() else None for b in p.split(":")]
                key.append(slice(*bits))
            else:
                i = int(p)
                if not -size <= i < size:
                    raise RegionsError(f"entry spec '{spec}': index {i} is out of range for a "
                                       f"dimension of size {size} (shape {shape})")
                key.append(slice(i % size, i % size + 1))
        except RegionsError:  # a ValueError too: keep the out-of-range message
            raise
        except ValueError:
            raise RegionsError(f"entry spec '{spec}': '{p}' is not an integer or a slice "
                               f"like '3', ':', '2:10'") from None
    return torch.sort(grid[tuple(key)].reshape(-1)).values


def from_specs(model: nn.Module | Mapping[str, Any], specs: Iterable[str] | str) -> Region:
    """A region from entry specs: a parameter name (glob allowed) with an optional index.

    Examples: ``model.layers.1.input_layernorm.weight[2100]`` (one entry),
    ``model.layers.*.self_attn.o_proj.weight[:, 5]`` (column 5 in every layer),
    ``model.layers.0.mlp.down_proj.weight[3, :]`` (row 3), ``model.norm.weight`` (all).
    Several specs are separated by ``;`` in one string.
    """
    if isinstance(specs, str):
        specs = [s for s in specs.split(";") if s.strip()]
    if isinstance(model, nn.Module):
        shapes = {n: list(p.shape) for n, p in model.named_parameters()}
        fingerprint = model_fingerprint(model)
    else:
        shapes = {n: list(getattr(v, "shape", v)) for n, v in model.items()}
        fingerprint = model_fingerprint(shapes)
    region = Region({}, {}, fingerprint, {})
    specs = list(specs)
    for spec in specs:
        m = _SPEC.match(spec)
        if not m:
            raise RegionsError(f"entry spec '{spec}' is not of the form NAME or NAME[i, j] "
                               "(e.g. model.layers.1.input_layernorm.weight[2100])")
        names = fnmatch.filter(shapes, m["name"])
        if not names:
            raise RegionsError(f"entry spec '{spec}' matches no parameter."
                               + did_you_mean(m["name"], shapes))
        part = Region({}, {}, fingerprint, {})
        for n in names:
            idx = _parse_index(m["index"] or "", shapes[n], spec)
            part.indices[n] = idx.to(index_dtype(math.prod(shapes[n])))
            part.shapes[n] = shapes[n]
        region = region.union(part)
    region.spec = {"entries": specs}
    return region


# ---- statistics ---------------------------------------------------------------------------

def jaccard(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    a_ = a.numpy() if a is not None else np.empty(0, np.int64)
    b_ = b.numpy() if b is not None else np.empty(0, np.int64)
    inter = np.intersect1d(a_, b_, assume_unique=True).size
    union = a_.size + b_.size - inter
    return inter / union if union else float("nan")


def layer_index(name: str) -> int | None:
    """The block index of a parameter name: its first all-digit component (None outside blocks)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def overlap(a: Region, b: Region, layer_of=None) -> dict[str, Any]:
    """Jaccard overlap of two regions: total, per matrix, and per layer.

    ``layer_of(name) -> int | None`` groups parameters by layer (default: the first integer in
    the dotted name).
    """
    layer_of = layer_of or layer_index
    names = sorted(set(a.indices) | set(b.indices))
    per_matrix, layers = {}, {}
    tot_i = tot_u = 0
    for n in names:
        ia, ib = a.indices.get(n), b.indices.get(n)
        na = ia.numel() if ia is not None else 0
        nb = ib.numel() if ib is not None else 0
        inter = np.intersect1d(ia.numpy(), ib.numpy(), assume_unique=True).size if na and nb else 0
        union = na + nb - inter
        per_matrix[n] = inter / union if union else float("nan")
        l = layer_of(n)
        li, lu = layers.get(l, (0, 0))
        layers[l] = (li + inter, lu + union)
        tot_i += inter
        tot_u += union
    return {
        "jaccard": tot_i / tot_u if tot_u else float("nan"),
        "intersection": tot_i, "union": tot_u, "size_a": a.numel(), "size_b": b.numel(),
        "per_matrix": per_matrix,
        "per_layer": {str(l): (i / u if u else float("nan")) for l, (i, u) in layers.items()},
    }


def distribution(region: Region, layer_of=None, kind_of=None) -> dict[str, dict[str, int]]:
    """Entry counts of a region per layer and per module kind (q_proj, mlp.down_proj, ...)."""
    from .architecture import matrix_kind

    layer_of = layer_of or layer_index
    kind_of = kind_of or matrix_kind
    by_layer: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for n, idx in region.indices.items():
        by_layer[str(layer_of(n))] = by_layer.get(str(layer_of(n)), 0) + idx.numel()
        by_kind[kind_of(n)] = by_kind.get(kind_of(n), 0) + idx.numel()
    return {"per_layer": by_layer, "per_module": by_kind}


def monolingual(tops: Mapping[str, Region], bottoms: Mapping[str, Region]) -> dict[str, dict[str, Region]]:
    """Paper 1 Eq. 5: each language's Top (and Bottom) region minus every other language's
    Top and Bottom regions.

    Returns ``{lang: {"top": region, "bottom": region}}``.
    """
    langs = list(tops)
    if set(langs) != set(bottoms):
        raise RegionsError(f"tops and bottoms must cover the same languages: {sorted(tops)} vs "
                           f"{sorted(bottoms)}")
    out = {}
    for lang in langs:
        others = None
        for other in langs:
            if other == lang:
                continue
            both = tops[other] | bottoms[other]
            others = both if others is None else others | both
        top, bottom = tops[lang], bottoms[lang]
        if others is not None:
            top, bottom = top - others, bottom - others
        top.spec = {"monolingual": lang, "band": "top", "excluded": [l for l in langs if l != lang],
                    "from": tops[lang].spec}
        bottom.spec = {"monolingual": lang, "band": "bottom",
                       "excluded": [l for l in langs if l != lang], "from": bottoms[lang].spec}
        out[lang] = {"top": top, "bottom": bottom}
    return out
