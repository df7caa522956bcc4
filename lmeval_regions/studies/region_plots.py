"""Pictures of a region (paper 1 Fig. 2/9/10) and of dimension experiments, as PNG files.

* :func:`neighbourhood_density`: fraction of region entries in the 3x3 neighbourhood of every
  entry of a matrix (zero padding at the borders), pooled down to at most ``max_px`` per side;
* :func:`plot_region_heatmaps`: one PNG per projection role (q, k, v, o, gate, up, down), a grid
  of those densities over layers, drawn as logical ``[out, in]`` (rows = output dims, whatever
  the storage);
* :func:`plot_distribution`: region entries per layer and per module, as bars;
* :func:`plot_sweep`: perplexity per perturbed dimension (Fig. 3).

Figures are drawn without pyplot (:mod:`.plotting`) and written atomically; each is titled
with what it shows, the model and the region's settings (:func:`describe_region`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F

from lmeval_regions.errors import RegionsError
from lmeval_regions.models.module_map import ROLES, ModuleMap
from lmeval_regions.regions import Region, distribution
from lmeval_regions.studies.plotting import save_figure, subplots, title


def neighbourhood_density(mask: torch.Tensor, max_px: int | None = 256) -> torch.Tensor:
    """3x3 neighbourhood density of a 2-D boolean ``mask`` ``[R, C]``.

    Returns fp32 ``[R', C']`` with values in [0, 1]: ``(number of region entries among the 3x3
    cells centred on each entry) / 9``; then average-pooled so neither side exceeds ``max_px``
    (``None``: no pooling, ``[R, C]``).
    """
    if mask.dim() != 2:
        raise RegionsError(f"density needs a 2-D mask, got shape {list(mask.shape)}")
    x = mask.float()[None, None]
    d = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
    if max_px is not None and max(d.shape[-2:]) > max_px:
        r, c = d.shape[-2:]
        d = F.adaptive_avg_pool2d(d, (min(r, max_px), min(c, max_px)))
    return d[0, 0]


def model_label(region: Region) -> str:
    """The model a region belongs to: its recorded name, else what its fingerprint says."""
    name = region.spec.get("model_name") or (region.spec.get("source") or {}).get("model_name")
    if name:
        return str(name)
    params = (region.model or {}).get("params") or region.shapes
    layers = {m.group(1) for n in params if (m := re.search(r"\.(\d+)\.", n))}
    total = sum(math.prod(s) for s in params.values())
    what = "model" if region.model else "model (covered parameters)"
    return f"{what} with {len(layers)} layers, {total / 1e6:.1f}M parameters"


def describe_region(region: Region) -> str:
    """One line: the model, how the region was made and its size (for figure titles)."""
    spec, src = region.spec, region.spec.get("source") or {}
    parts = [model_label(region)]
    if "method" in spec:
        parts.append(f"{spec['method']} {100 * float(spec['ratio']):.3g}% per "
                     f"{spec.get('scope', 'matrix')}")
    elif "op" in spec:
        parts.append(f"{spec['op']} of {len(spec.get('operands') or [])} regions")
    if src.get("languages"):
        parts.append("importance over " + ",".join(map(str, src["languages"])))
    if src.get("criterion"):
        parts.append(f"criterion {src['criterion']}")
    parts.append(f"{region.numel():,} entries in {len(region.indices)} parameters")
    return "; ".join(parts)


def plot_region_heatmaps(region: Region, mmap: ModuleMap, out_dir: str | os.PathLike,
                         roles: Iterable[str] = ROLES, layers: Iterable[int] | None = None,
                         max_px: int = 128, prefix: str = "heatmap",
                         context: str | None = None) -> list[Path]:
    """One PNG per role: the 3x3 density of ``region`` in that projection, one panel per layer.

    Every panel is the logical ``[out, in]`` view: a fused projection (BLOOM's, GPT-2's q/k/v)
    is drawn as the role's own rows, a GPT-2 ``Conv1D`` (stored ``[in, out]``) transposed.
    ``context``: the title's second line (default :func:`describe_region`).
    """
    out_dir = Path(out_dir)
    layers = list(range(len(mmap.blocks))) if layers is None else list(layers)
    paths = []
    for role in roles:
        panels = []
        for l in layers:
            proj = mmap.blocks[l].projections.get(role)
            if proj is None:
                continue
            mask = proj.logical(region.mask(proj.param)) if proj.param in region.shapes \
                else torch.zeros(proj.out_size, proj.in_size, dtype=torch.bool)
            panels.append((l, proj, neighbourhood_density(mask, max_px)))
        if not panels:
            continue
        cols = min(6, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
        vmax = max(float(p[2].max()) for p in panels) or 1.0
        for ax in axes.flat:
            ax.axis("off")
        for ax, (l, proj, d) in zip(axes.flat, panels):
            im = ax.imshow(d.numpy(), cmap="viridis", vmin=0, vmax=vmax, aspect="auto",
                           interpolation="nearest")
            ax.set_title(f"layer {l}: {proj.out_size}x{proj.in_size}", fontsize=8)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel("input dims", fontsize=7)
            ax.set_ylabel("output dims", fontsize=7)
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="3x3 density")
        title(fig, f"Where the region lies in {role}: density of its entries (3x3 "
                   "neighbourhood)", describe_region(region) if context is None else context)
        paths.append(save_figure(fig, out_dir / f"{prefix}_{role}.png", dpi=110))
    return paths


def plot_distribution(region: Region, path: str | os.PathLike, context: str | None = None
                      ) -> Path:
    """Where the region lies: bars of its entries per layer and per module kind
    (:func:`regions.distribution`). ``context``: the title's second line (default
    :func:`describe_region`)."""
    dist = distribution(region)
    fig, (a, b) = subplots(1, 2, figsize=(12, 3.8))
    layers = sorted(dist["per_layer"], key=lambda s: (s == "None", int(s) if s.isdigit() else 0))
    a.bar(layers, [dist["per_layer"][l] for l in layers])
    a.set_xlabel("layer")
    a.set_ylabel("region entries")
    kinds = sorted(dist["per_module"])
    b.bar(kinds, [dist["per_module"][k] for k in kinds])
    b.tick_params(axis="x", rotation=45)
    for t in b.get_xticklabels():
        t.set_horizontalalignment("right")
    b.set_xlabel("module")
    b.set_ylabel("region entries")
    title(fig, "Where the region lies: entries per layer and per module",
          describe_region(region) if context is None else context)
    return save_figure(fig, path, dpi=110)


def plot_sweep(rows: list[Mapping[str, Any]], path: str | os.PathLike, metric: str = "ppl",
               labels: Mapping[int, str] | None = None, context: str = "") -> Path:
    """Bars of ``metric`` per perturbed dim (log scale), the unperturbed value as a line;
    ``context`` (the model and settings) under the title."""
    base = [r[metric] for r in rows if r["dim"] is None]
    pert = [r for r in rows if r["dim"] is not None]
    fig, ax = subplots(figsize=(max(5, 0.6 * len(pert) + 2), 3.5))
    names = [f"{r['dim']}" + (f"\n{labels[r['dim']]}" if labels and r["dim"] in labels else "")
             for r in pert]
    ax.bar(names, [r[metric] for r in pert])
    if base:
        ax.axhline(base[0], color="k", ls="--", label=f"unperturbed {base[0]:.3g}")
        ax.legend()
    ax.set_yscale("log")
    ax.set_xlabel("hidden dimension re-initialised in every layer")
    ax.set_ylabel(f"{metric} (log scale)")
    title(fig, f"Single-dimension perturbation: {metric} per re-initialised dimension", context)
    return save_figure(fig, path, dpi=110)
