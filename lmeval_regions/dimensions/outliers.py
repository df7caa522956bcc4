"""Outlier dimensions of the residual stream (paper 1 §3.3 "Ablation Study", Appendix E).

Two detectors:

* **massive activations** (Sun et al., 2024): run text with ``output_hidden_states`` and, per
  layer and hidden dimension, take the largest ``|h|`` over real tokens; a dimension is an
  outlier in a layer when that maximum is at least ``ratio`` times the layer's median ``|h|``;
* **norm-weight outliers**: per hidden-size norm, the effective scale (``w`` or ``1 + w``, as
  measured by :mod:`module_map`) of each dimension compared with the norm's others by a robust
  z-score ``(|s| - median) / (1.4826 * MAD)``.

The ablation "with / without outlier dimensions" is :func:`dimensions.removal_table` with
``protect_dims`` set to the outlier dimensions found here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from lmeval_regions.errors import RegionsError
from lmeval_regions.models.module_map import ModuleMap, find_module_map


@dataclass
class OutlierConfig:
    """Thresholds of the two detectors."""

    ratio: float = field(default=100.0, metadata={"flag": "outlier-ratio"})
    """Massive activation: max |h| of a dim >= this many times the layer's median |h|."""
    min_layers: int = 1
    """A dim is reported when it is an outlier in at least this many layers."""
    norm_z: float = 10.0
    """Norm-weight outlier: robust z-score of |effective scale| >= ``norm_z``."""
    top_k: int = 10
    """How many dims per layer to list in the report, by max |h|."""

    def __post_init__(self) -> None:
        if not self.ratio > 1:
            raise RegionsError(f"outlier ratio {self.ratio} must be > 1 (e.g. 100)")
        if self.min_layers < 1:
            raise RegionsError(f"min_layers {self.min_layers} must be >= 1")
        if not self.norm_z > 0:
            raise RegionsError(f"norm_z {self.norm_z} must be > 0")
        if self.top_k < 1:
            raise RegionsError(f"top_k {self.top_k} must be >= 1")


@torch.no_grad()
def hidden_state_stats(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
                       ) -> dict[str, torch.Tensor]:
    """Per-layer statistics of the residual stream over real (unpadded) tokens.

    Returns ``max_abs`` ``[n_states, hidden]`` (largest |h| per dim; state 0 is the embedding
    output, state i the output of block i) and ``median_abs`` ``[n_states]`` (median |h| over all
    tokens and dims, from the first batch with tokens, to bound memory).
    """
    device = next(model.parameters()).device
    max_abs = median = None
    for b in batches:
        out = model(input_ids=b["input_ids"].to(device),
                    attention_mask=b["attention_mask"].to(device), output_hidden_states=True)
        keep = b["attention_mask"].to(device).bool()
        hs = torch.stack([h[keep].abs().float() for h in out.hidden_states])  # [S, tokens, H]
        m = hs.amax(1).cpu()
        max_abs = m if max_abs is None else torch.maximum(max_abs, m)
        if median is None and hs.shape[1]:
            median = hs.flatten(1).median(1).values.cpu()
    if max_abs is None:
        raise RegionsError("no batches given for hidden-state statistics")
    return {"max_abs": max_abs, "median_abs": median}


def massive_activation_dims(stats: Mapping[str, torch.Tensor], config: OutlierConfig | None = None
                            ) -> list[dict[str, Any]]:
    """Dims whose max |h| reaches ``ratio`` x the layer median in >= ``min_layers`` block outputs
    (the embedding output is not counted), most extreme first."""
    config = config or OutlierConfig()
    ratios = stats["max_abs"][1:] / stats["median_abs"][1:, None].clamp_min(1e-12)  # [L, H]
    hits = ratios >= config.ratio
    out = []
    for d in torch.nonzero(hits.sum(0) >= config.min_layers).flatten().tolist():
        layers = torch.nonzero(hits[:, d]).flatten().tolist()
        out.append({"dim": d, "layers": layers, "max_ratio": float(ratios[:, d].max()),
                    "max_abs": float(stats["max_abs"][1:, d].max())})
    return sorted(out, key=lambda r: -r["max_ratio"])


def top_dims_per_layer(stats: Mapping[str, torch.Tensor], k: int = 10) -> list[list[int]]:
    """The ``k`` dims with the largest max |h| in each block output (state 1..L)."""
    return [torch.topk(m, min(k, m.numel())).indices.tolist() for m in stats["max_abs"][1:]]


@torch.no_grad()
def norm_weight_outliers(model: nn.Module, config: OutlierConfig | None = None,
                         mmap: ModuleMap | None = None) -> list[dict[str, Any]]:
    """Dims whose effective norm scale is a robust-z outlier in some hidden-size norm.

    Returns ``[{dim, norms: [{name, scale, z}], max_z}]``, most extreme first.
    """
    config = config or OutlierConfig()
    mmap = mmap or find_module_map(model, projections=False)  # norms only: any block layout
    params = dict(model.named_parameters())
    by_dim: dict[int, list[dict[str, Any]]] = {}
    for b in mmap.blocks:
        for norm in b.norms:
            if norm.size != mmap.hidden_size:
                continue
            s = norm.effective(params[norm.name].detach().float().cpu()).abs()
            med = s.median()
            mad = (s - med).abs().median() * 1.4826
            z = (s - med) / mad.clamp_min(1e-12)
            for d in torch.nonzero(z >= config.norm_z).flatten().tolist():
                by_dim.setdefault(d, []).append(
                    {"name": norm.name, "scale": float(norm.effective(params[norm.name][d])),
                     "z": float(z[d])})
    out = [{"dim": d, "norms": v, "max_z": max(x["z"] for x in v)} for d, v in by_dim.items()]
    return sorted(out, key=lambda r: -r["max_z"])


@dataclass
class OutlierReport:
    """Outlier dimensions found by both detectors."""

    massive: list[dict[str, Any]] = field(default_factory=list)
    norm: list[dict[str, Any]] = field(default_factory=list)
    top_per_layer: list[list[int]] = field(default_factory=list)

    @property
    def dims(self) -> list[int]:
        """Massive-activation dims (the paper's "outlier dimensions"), most extreme first."""
        return [r["dim"] for r in self.massive]

    def to_dict(self) -> dict[str, Any]:
        return {"dims": self.dims, "massive": self.massive, "norm": self.norm,
                "top_per_layer": self.top_per_layer}


def find_outliers(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                  config: OutlierConfig | None = None, mmap: ModuleMap | None = None
                  ) -> OutlierReport:
    """Run both detectors (see the module docstring)."""
    config = config or OutlierConfig()
    stats = hidden_state_stats(model, batches)
    return OutlierReport(massive_activation_dims(stats, config),
                         norm_weight_outliers(model, config, mmap),
                         top_dims_per_layer(stats, config.top_k))
