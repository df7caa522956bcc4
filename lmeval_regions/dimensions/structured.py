"""Top dimensions and structured removal (paper 1 §3.3, Tables 3, 6, 7; Appendix C).

A *dimension* of a projection is one logical row or column of its weight. Each projection's
dimensions are ranked by how many entries of a region they hold, and ``N_d`` of them are picked
per projection (per matrix, per layer) by ``top`` / ``middle`` / ``bottom`` / ``random`` — the
same rules (and tie-break: lower index first) as :func:`lmeval_regions.regions.select`.

Reading of the paper's "rows" and "columns" (stated in docs/dimensions.md): the paper writes
weights as ``x W`` (``W`` is ``[in, out]``), as its Appendix C says: "the columns of the
Attn.k/q/v matrices ... as well as the rows of the Attn.o matrix, correspond to different
attention head parameters", and Appendix D: RMSNorm weight ``j`` acts on "a column of the
Attn.o and the FFN.down matrix" (output hidden dim ``j``). Its tables agree: excluding the
hidden outlier dims barely changes the head-feature setting but collapses the FFN setting's
effect. So, on torch ``[out, in]`` weights:

==========================  ==================================  =======================
paper                       here (side of the projection)       torch
==========================  ==================================  =======================
Attn.q/k/v column           q/k/v ``out`` (head feature)        row ``W[j, :]``
Attn.q/k/v row              q/k/v ``in`` (hidden dim)           column ``W[:, j]``
Attn.o row                  o ``in`` (head feature)             column ``W[:, j]``
Attn.o column               o ``out`` (hidden dim)              row ``W[j, :]``
FFN.up/gate row             up/gate ``in`` (hidden dim)         column ``W[:, j]``
FFN.down column             down ``out`` (hidden dim)           row ``W[j, :]``
==========================  ==================================  =======================

A GPT-2 ``Conv1D`` stores ``[in, out]``: there rows and columns swap (the module map's
:class:`~lmeval_regions.models.Projection` is transposed), and its fused ``c_attn`` is split
into q/k/v columns; everything here works on the logical ``[out, in]`` view.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from lmeval_regions.artefacts import model_fingerprint
from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.interventions import Editor
from lmeval_regions.models.module_map import ModuleMap, Projection, find_module_map
from lmeval_regions.regions import METHODS, Region, index_dtype, seed_for, select_flat

# The paper's four removal settings: role -> side whose dimensions are removed.
SETTINGS: dict[str, dict[str, str]] = {
    # Table 3 / 4 row 1: Attn.o(row) + Attn.k/q/v(column) + FFN.down(column)
    "attn_heads+ffn_down": {"q": "out", "k": "out", "v": "out", "o": "in", "down": "out"},
    # Table 6: Attn.o(row) + Attn.k/q/v(column)
    "attn_heads": {"q": "out", "k": "out", "v": "out", "o": "in"},
    # Table 7: Attn.o(column) + Attn.k/q/v(row) (the transposed setting)
    "attn_hidden": {"q": "in", "k": "in", "v": "in", "o": "out"},
    # Table 4 row 4: FFN.up/gate(row) + FFN.down(column)
    "ffn_hidden": {"gate": "in", "up": "in", "down": "out"},
}
PAPER_LABELS = {
    "attn_heads+ffn_down": "Attn.o(row) Attn.k/q/v(column) FFN.down(column)",
    "attn_heads": "Attn.o(row) Attn.k/q/v(column)",
    "attn_hidden": "Attn.o(column) Attn.k/q/v(row)",
    "ffn_hidden": "FFN.up/gate(row) FFN.down(column)",
}


def check_setting(setting: str | Mapping[str, str]) -> dict[str, str]:
    """A setting by name, or an explicit ``{role: side}`` map (validated)."""
    if isinstance(setting, str):
        if setting not in SETTINGS:
            raise RegionsError(f"removal setting '{setting}' is not one of {list(SETTINGS)}."
                               + did_you_mean(setting, SETTINGS))
        return SETTINGS[setting]
    out = dict(setting)
    for role, side in out.items():
        if role not in ("q", "k", "v", "o", "gate", "up", "down") or side not in ("in", "out"):
            raise RegionsError(f"setting entry {role!r}: {side!r} must map a role q/k/v/o/gate/"
                               "up/down to a side 'in' or 'out'")
    return out


def dimension_counts(region: Region, proj: Projection, side: str) -> torch.Tensor:
    """Region entries per logical dimension of ``proj`` on ``side``.

    Returns an int64 tensor ``[proj.size(side)]``: for ``out``, entries in each logical row;
    for ``in``, entries in each column within the projection's rows.
    """
    if proj.param not in region.indices:
        return torch.zeros(proj.size(side), dtype=torch.long)
    m = proj.logical(region.mask(proj.param)).long()
    return m.sum(1) if side == "out" else m.sum(0)


def select_dims(counts: torch.Tensor, n: int, method: str, seed: int = 0) -> torch.Tensor:
    """``n`` dimension indices (sorted) by ``method`` over ``counts`` ``[size]``.

    ``top``: most entries; ``bottom``: fewest; ``middle``: the ``n`` centred on the median;
    ``random``: uniform, seeded. Ties go to the lower index. ``n`` is capped at the size.
    """
    if method not in METHODS:
        raise RegionsError(f"dimension selection '{method}' is not one of {METHODS}."
                           + did_you_mean(str(method), METHODS))
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RegionsError(f"number of dimensions {n!r} must be a positive integer")
    return select_flat(counts.float(), min(n, counts.numel()), method, seed)


def _model_map(model: nn.Module | ModuleMap, mmap: ModuleMap | None) -> ModuleMap:
    if mmap is not None:
        return mmap
    if isinstance(model, ModuleMap):
        return model
    return find_module_map(model)


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {n: list(p.shape) for n, p in model.named_parameters()}


def dims_region(projs: Iterable[tuple[Projection, str, torch.Tensor]],
                model: nn.Module, spec: Mapping[str, Any] | None = None) -> Region:
    """A region from ``(projection, side, dims)`` triples: those rows/columns, whole."""
    shapes = _shapes(model)
    parts: dict[str, list[torch.Tensor]] = {}
    for proj, side, dims in projs:
        if len(dims):
            parts.setdefault(proj.param, []).append(proj.flat_indices(side, dims))
    idx = {}
    for name, ps in parts.items():
        numel = shapes[name][0] * shapes[name][1]
        idx[name] = torch.unique(torch.cat(ps)).to(index_dtype(numel))
    return Region(idx, {n: shapes[n] for n in idx}, model_fingerprint(model), dict(spec or {}))


def hidden_dims_region(model: nn.Module, dims: Iterable[int], roles: Iterable[str] | None = None,
                       layers: Iterable[int] | None = None,
                       mmap: ModuleMap | None = None) -> Region:
    """Every entry on the hidden-side dimension(s) ``dims`` of the chosen projections
    (default: all roles, all layers): q/k/v/up/gate input columns, o/down output rows."""
    mmap = _model_map(model, mmap)
    dims_t = torch.tensor(sorted(set(int(d) for d in dims)), dtype=torch.long)
    if dims_t.numel() and (dims_t.min() < 0 or dims_t.max() >= mmap.hidden_size):
        raise RegionsError(f"hidden dims {dims_t.tolist()} fall outside [0, {mmap.hidden_size})")
    layers = set(range(len(mmap.blocks))) if layers is None else set(layers)
    roles = tuple(roles) if roles is not None else ("q", "k", "v", "o", "gate", "up", "down")
    triples = [(p, p.hidden_side, dims_t) for b in mmap.blocks if b.index in layers
               for r, p in b.projections.items() if r in roles]
    return dims_region(triples, model, {"hidden_dims": dims_t.tolist(), "roles": list(roles),
                                        "layers": sorted(layers)})


def structured_region(model: nn.Module, region: Region, setting: str | Mapping[str, str],
                      n_dims: int, method: str, seed: int = 0,
                      protect_dims: Iterable[int] | None = None,
                      mmap: ModuleMap | None = None) -> Region:
    """The whole rows/columns to remove: for each projection named by ``setting`` in every
    block, ``n_dims`` dimensions of its side picked by ``method`` from ``region``'s counts.

    ``protect_dims`` (hidden dims, e.g. outliers) are then left untouched: every entry on those
    hidden-side rows/columns of the covered projections is dropped from the result (paper 1
    Tables 4/9 "w/o outlier": "not altering any row or column ... for the two outlier
    dimensions").
    """
    roles = check_setting(setting)
    mmap = _model_map(model, mmap)
    triples = []
    for b in mmap.blocks:
        for role, side in roles.items():
            proj = b.projections.get(role)
            if proj is None:  # e.g. no gate in BLOOM
                continue
            counts = dimension_counts(region, proj, side)
            seed_i = seed_for(seed, f"{proj.param}#{role}#{side}")
            triples.append((proj, side, select_dims(counts, n_dims, method, seed_i)))
    spec = {"structured": setting if isinstance(setting, str) else roles, "n_dims": n_dims,
            "method": method, "seed": seed, "from": region.spec}
    out = dims_region(triples, model, spec)
    if protect_dims:
        guard = hidden_dims_region(model, protect_dims, roles=None, mmap=mmap)
        keep = {p.param for p, _, _ in triples}
        guard = Region({n: i for n, i in guard.indices.items() if n in keep},
                       {n: s for n, s in guard.shapes.items() if n in keep}, guard.model)
        out = out - guard
        out.spec = {**spec, "protect_dims": sorted(int(d) for d in protect_dims)}
    return out


def hidden_dim_ranking(region: Region, model: nn.Module, roles: Iterable[str] | None = None,
                       mmap: ModuleMap | None = None) -> torch.Tensor:
    """Region entries per hidden dimension, summed over the hidden-side rows/columns of every
    projection in every block: int64 ``[hidden_size]`` (the model-wide "Top dimensions")."""
    mmap = _model_map(model, mmap)
    total = torch.zeros(mmap.hidden_size, dtype=torch.long)
    for proj in mmap.projections(tuple(roles) if roles
                                 else ("q", "k", "v", "o", "gate", "up", "down")):
        total += dimension_counts(region, proj, proj.hidden_side)
    return total


def removal_table(model: nn.Module, region: Region, evaluate: Callable[[], Mapping[str, Any]],
                  settings: Iterable[str] = tuple(SETTINGS), methods: Iterable[str] = METHODS,
                  n_dims: Iterable[int] = (1, 3, 5, 10), seed: int = 0,
                  protect_dims: Iterable[int] | None = None,
                  mmap: ModuleMap | None = None, progress: Callable[[str], None] | None = None
                  ) -> list[dict[str, Any]]:
    """Zero each structured region in turn and call ``evaluate()`` (e.g. a perplexity) with the
    weights edited; the model is restored bit-exactly after each row.

    Returns rows ``{setting, method, n_dims, removed, protect_dims, **evaluate()}``.
    """
    mmap = _model_map(model, mmap)
    rows = []
    for setting in settings:
        for method in methods:
            for n in n_dims:
                sub = structured_region(model, region, setting, n, method, seed, protect_dims, mmap)
                with Editor(model) as ed:
                    ed.apply(sub, "zero")
                    res = dict(evaluate())
                row = {"setting": setting, "method": method, "n_dims": n,
                       "removed": sub.numel(),
                       "protect_dims": sorted(int(d) for d in protect_dims or []), **res}
                rows.append(row)
                if progress:
                    progress(f"{setting} {method} N_d={n}: {res}")
    return rows
