"""What a region looks like and how regions relate: per-layer/module counts, Jaccard overlap,
and paper 1's monolingual regions (Eq. 5)."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from lmeval_regions.errors import RegionsError
from lmeval_regions.models.architecture import matrix_kind
from lmeval_regions.regions.region import Region, index_dtype


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


def overlap(a: Region, b: Region, layer_of=None, kind_of=None) -> dict[str, Any]:
    """Jaccard overlap of two regions: total, per matrix, per layer and per module kind.

    ``layer_of(name) -> int | None`` groups parameters by layer (default: the first integer in
    the dotted name); ``kind_of(name)`` by module (default: :func:`matrix_kind`, e.g.
    ``self_attn.q_proj``). A group's Jaccard pools its matrices' intersections and unions.
    """
    layer_of = layer_of or layer_index
    kind_of = kind_of or matrix_kind
    names = sorted(set(a.indices) | set(b.indices))
    per_matrix, layers, kinds = {}, {}, {}
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
        ki, ku = kinds.get(kind_of(n), (0, 0))
        kinds[kind_of(n)] = (ki + inter, ku + union)
        tot_i += inter
        tot_u += union
    return {
        "jaccard": tot_i / tot_u if tot_u else float("nan"),
        "intersection": tot_i, "union": tot_u, "size_a": a.numel(), "size_b": b.numel(),
        "per_matrix": per_matrix,
        "per_layer": {str(l): (i / u if u else float("nan")) for l, (i, u) in layers.items()},
        "per_module": {k: (i / u if u else float("nan")) for k, (i, u) in kinds.items()},
    }


def distribution(region: Region, layer_of=None, kind_of=None) -> dict[str, dict[str, int]]:
    """Entry counts of a region per layer and per module kind (q_proj, mlp.down_proj, ...)."""
    layer_of = layer_of or layer_index
    kind_of = kind_of or matrix_kind
    by_layer: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for n, idx in region.indices.items():
        by_layer[str(layer_of(n))] = by_layer.get(str(layer_of(n)), 0) + idx.numel()
        by_kind[kind_of(n)] = by_kind.get(kind_of(n), 0) + idx.numel()
    return {"per_layer": by_layer, "per_module": by_kind}


def monolingual(tops: Mapping[str, Region],
                bottoms: Mapping[str, Region]) -> dict[str, dict[str, Region]]:
    """Paper 1 Eq. 5: each language's Top (and Bottom) region minus every other language's
    Top and Bottom regions.

    Returns ``{lang: {"top": region, "bottom": region}}``.
    """
    langs = list(tops)
    if set(langs) != set(bottoms):
        raise RegionsError(f"tops and bottoms must cover the same languages: {sorted(tops)} vs "
                           f"{sorted(bottoms)}")
    regions = [tops[l] for l in langs] + [bottoms[l] for l in langs]
    for r in regions[1:]:
        regions[0].check_compatible(r, "exclude")
    # An entry of language L's region is excluded when another language's Top or Bottom holds
    # it: when its count of languages holding it (Top ∪ Bottom of each) is above 1. One count
    # per matrix instead of the unions of the set algebra (sorts of ever larger index sets:
    # 90 % of this step on Gemma); the same sets.
    names = sorted({n for r in regions for n in r.indices})
    shapes = {n: next(r.shapes[n] for r in regions if n in r.shapes) for n in names}
    kept: dict[str, dict[str, dict[str, torch.Tensor]]] = {
        l: {"top": {}, "bottom": {}} for l in langs}
    for n in names:
        size = math.prod(shapes[n])
        count = np.zeros(size, dtype=np.int32)
        for l in langs:
            held = [r.indices[n].numpy() for r in (tops[l], bottoms[l]) if n in r.indices]
            if held:
                count[np.union1d(*held) if len(held) == 2 else held[0]] += 1
        for l in langs:
            for band, r in (("top", tops[l]), ("bottom", bottoms[l])):
                if n in r.indices:
                    idx = r.indices[n]
                    sel = idx[torch.from_numpy(count[idx.numpy()] == 1)]
                    if sel.numel():
                        kept[l][band][n] = sel.to(index_dtype(size))
    known = next((r.model for r in regions if r.model), {})
    out = {}
    for lang in langs:
        excluded = [l for l in langs if l != lang]
        pair = {}
        for band, src in (("top", tops[lang]), ("bottom", bottoms[lang])):
            model = src.model or known
            got = kept[lang][band] if excluded else dict(src.indices)
            pair[band] = Region(got, {n: list(shapes[n]) for n in got}, model,
                                {"monolingual": lang, "band": band, "excluded": excluded,
                                 "from": src.spec})
        out[lang] = pair
    return out
