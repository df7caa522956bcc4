"""Regions from entry specs: a parameter name (glob allowed) with an optional numpy-style index,
e.g. ``model.layers.1.input_layernorm.weight[2100]`` or
``model.layers.*.self_attn.o_proj.weight[:, 5]``."""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from lmeval_regions.artefacts import model_fingerprint
from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.regions.region import Region, index_dtype

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
