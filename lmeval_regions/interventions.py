"""Interventions: change the entries of a region on a loaded model, and restore them bit-exactly.

Kinds (paper 1 §3.2–3.3, Appendix E):

=========  ==========================================================
zero       set to 0 (removal)
constant   set to ``value`` (e.g. reset an RMSNorm weight to 1)
scale      multiply by ``value`` (×10, ×4)
noise      add N(0, ``value``²) noise, seeded
reinit     draw from N(0, std²), std = ``value`` or the model's ``initializer_range``
=========  ==========================================================

:class:`Editor` applies any number of (region, intervention) pairs in order and restores them
in reverse order, so overlapping edits compose and the weights come back bit for bit.
The parameter is edited in place on whatever device (or dtype) it lives on.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.models.architecture import init_std
from lmeval_regions.regions import Region, from_specs

KINDS = ("zero", "constant", "scale", "noise", "reinit")


@dataclass(frozen=True)
class Intervention:
    """What to do to a region's entries."""

    kind: str = "zero"
    """One of ``zero``, ``constant``, ``scale``, ``noise``, ``reinit``."""
    value: float | None = None
    """The constant, the scale factor, the noise std, or the re-init std (None: model's)."""
    seed: int = 0
    """Seed of ``noise``/``reinit`` draws (per parameter, by name: order-independent)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RegionsError(f"intervention '{self.kind}' is not one of {KINDS}."
                               + did_you_mean(self.kind, KINDS))
        if self.kind in ("constant", "scale", "noise") and self.value is None:
            raise RegionsError(f"intervention '{self.kind}' needs a value, e.g. '{self.kind}:10'")
        if self.kind == "zero" and self.value not in (None, 0, 0.0):
            raise RegionsError(f"intervention 'zero' takes no value (got {self.value})")
        if self.kind in ("noise", "reinit") and self.value is not None and self.value < 0:
            raise RegionsError(f"intervention '{self.kind}' needs a std >= 0, got {self.value}")

    @classmethod
    def parse(cls, text: str) -> "Intervention":
        """``zero``, ``constant:1``, ``scale:10``, ``noise:0.02``, ``reinit``, ``reinit:0.02``;
        an optional ``/seed`` suffix, e.g. ``noise:0.02/7``."""
        text = text.strip()
        seed = 0
        if "/" in text:
            text, s = text.rsplit("/", 1)
            try:
                seed = int(s)
            except ValueError:
                raise RegionsError(f"intervention seed '{s}' is not an integer") from None
        kind, _, val = text.partition(":")
        value = None
        if val:
            try:
                value = float(val)
            except ValueError:
                raise RegionsError(f"intervention '{text}': value '{val}' is not a "
                                   "number") from None
        return cls(kind.strip(), value, seed)

    def __str__(self) -> str:
        s = self.kind if self.value is None else f"{self.kind}:{self.value:g}"
        return s + (f"/{self.seed}" if self.seed else "")


def _new_values(p: torch.Tensor, idx: torch.Tensor, iv: Intervention, name: str,
                model: nn.Module) -> torch.Tensor:
    old = p.view(-1)[idx]
    if iv.kind == "zero":
        return torch.zeros_like(old)
    if iv.kind == "constant":
        return torch.full_like(old, iv.value)
    if iv.kind == "scale":
        return old * iv.value
    g = torch.Generator().manual_seed(iv.seed * 1_000_003 + zlib.crc32(name.encode()))
    draw = torch.randn(old.shape, generator=g, dtype=torch.float32).to(old.device)
    if iv.kind == "noise":
        return (old.float() + draw * iv.value).to(old.dtype)
    std = iv.value if iv.value is not None else init_std(model)
    return (draw * std).to(old.dtype)


class Editor:
    """Applies region interventions to a model and undoes them exactly.

    Usage::

        with Editor(model) as ed:
            ed.apply(region, Intervention("zero"))
            ...evaluate...
        # weights restored bit-exactly here

    or ``ed = Editor(model); ed.apply(...); ...; ed.restore()``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._params = dict(model.named_parameters())
        self._undo: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def apply(self, region: Region, intervention: Intervention | str = "zero") -> int:
        """Apply one intervention over ``region``; returns the number of entries changed."""
        iv = Intervention.parse(intervention) if isinstance(intervention, str) else intervention
        changed = 0
        for name, idx in region.indices.items():
            if name not in self._params:
                raise RegionsError(f"region covers '{name}', which the model lacks."
                                   + did_you_mean(name, self._params))
            p = self._params[name]
            if list(p.shape) != list(region.shapes[name]):
                raise RegionsError(f"region shape {region.shapes[name]} of '{name}' does not "
                                   f"match the model's {list(p.shape)}")
            if idx.numel() == 0:
                continue
            data = p.data
            if not data.is_contiguous():
                raise RegionsError(f"parameter '{name}' is not contiguous; cannot edit in place")
            idx_d = idx.to(device=data.device, dtype=torch.long)
            flat = data.view(-1)
            self._undo.append((flat, idx_d, flat[idx_d].clone()))
            flat[idx_d] = _new_values(data, idx_d, iv, name, self.model)
            changed += idx.numel()
        return changed

    @torch.no_grad()
    def restore(self) -> None:
        """Undo every applied intervention, newest first (bit-exact)."""
        while self._undo:
            flat, idx, old = self._undo.pop()
            flat[idx] = old

    @property
    def active(self) -> bool:
        return bool(self._undo)

    def __enter__(self) -> "Editor":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


@contextlib.contextmanager
def intervened(model: nn.Module,
               edits: Iterable[tuple[Region, Intervention | str]]) -> Iterator[Editor]:
    """Context manager: apply ``edits`` in order, restore all on exit (also on error)."""
    ed = Editor(model)
    try:
        for region, iv in edits:
            ed.apply(region, iv)
        yield ed
    finally:
        ed.restore()


def parse_edits(text: str, default: str = "zero") -> list[tuple[str, Intervention]]:
    """Parse ``TARGET[@INTERVENTION];TARGET[@INTERVENTION];...``.

    A TARGET is a region artefact path (``*.safetensors``) or an entry spec such as
    ``model.layers.1.input_layernorm.weight[2100]``; the intervention defaults to ``default``.
    Example: ``top1.safetensors;model.layers.*.input_layernorm.weight[2100]@constant:1``.
    """
    out = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        target, _, iv = part.partition("@")
        out.append((target.strip(), Intervention.parse(iv or default)))
    if not out:
        raise RegionsError(f"no region given in '{text}'")
    return out


def resolve_target(model: nn.Module, target: str) -> Region:
    """A region from a TARGET of :func:`parse_edits`: artefact path or entry spec."""
    if target.endswith(".safetensors") or Path(target).is_file():
        return Region.load(target, model)
    return from_specs(model, target)
