"""``FreezeRegionConfig``: what to protect and how, saved PEFT-style (``config.json`` + region)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from lmeval_regions.artefacts import write_text_atomic
from lmeval_regions.errors import RegionsError
from lmeval_regions.regions import Region

CONFIG_NAME = "freeze_region_config.json"
REGION_NAME = "region.safetensors"
INITS = ("keep", "zero")


@dataclass
class FreezeRegionConfig:
    """Protect a region of a model during training.

    ``alpha == 0`` and no ``max_update``: the region's entries stay bit-identical (freezing,
    paper 1 §3.5). Otherwise each optimizer step's update ``Δ = new - old`` of every region entry
    becomes ``clamp(alpha * Δ, -max_update, max_update)`` (paper 1's future work: "limit the
    magnitude of parameter updates"); ``alpha == 1`` without ``max_update`` leaves it free.

    ``init="zero"`` first sets the region to zero (paper 1 Table 2, "remove then train"):
    with freezing it stays exactly zero (``Top & Freeze``, ``Bottom & Freeze``); with
    ``alpha=1`` it is removed, then trained freely (``Top & Unfreeze``).
    """

    region: str
    """Path of a region artefact (``.safetensors`` written by ``Region.save``)."""
    alpha: float = 0.0
    """Fraction in [0, 1] of each step's update kept inside the region (0 = frozen, 1 = free)."""
    max_update: float | None = None
    """If set (> 0): per-entry bound on |update| per optimizer step inside the region."""
    mask_grads: bool | None = None
    """Zero the region's gradients as they are accumulated (before clipping, so they do not count
    in the clipped norm nor in optimizer moments). Default: True when freezing, False otherwise
    (a soft region still needs its gradients)."""
    init: Literal["keep", "zero"] = "keep"
    """What the region holds when the adapter attaches: ``keep`` its values, or ``zero`` them
    first (remove then freeze/train, paper 1 Table 2). Applied once, at the start of training
    (not again when a run resumes from a checkpoint)."""

    def __post_init__(self) -> None:
        if not isinstance(self.region, (str, os.PathLike)) or not str(self.region):
            raise RegionsError(f"region {self.region!r} is not a path to a region "
                               ".safetensors file")
        self.region = str(self.region)
        try:
            self.alpha = float(self.alpha)
        except (TypeError, ValueError):
            raise RegionsError(f"alpha {self.alpha!r} is not a number in [0, 1]") from None
        if not 0.0 <= self.alpha <= 1.0 or math.isnan(self.alpha):
            raise RegionsError(f"alpha {self.alpha!r} is outside [0, 1] (0 freezes, 1 leaves free)")
        if self.max_update is not None:
            try:
                self.max_update = float(self.max_update)
            except (TypeError, ValueError):
                raise RegionsError(f"max_update {self.max_update!r} is not a positive "
                                   "number") from None
            if not self.max_update > 0 or math.isinf(self.max_update):
                raise RegionsError(f"max_update {self.max_update!r} must be a finite number > 0")
        if self.init not in INITS:
            raise RegionsError(f"init {self.init!r} is not one of {INITS} (keep the region's "
                               "values, or zero them before training)")
        if self.mask_grads is None:
            self.mask_grads = self.frozen

    @property
    def frozen(self) -> bool:
        """True when the region must stay bit-identical."""
        return self.alpha == 0.0 and self.max_update is None

    @property
    def free(self) -> bool:
        """True when steps inside the region are left as the optimizer makes them."""
        return self.alpha == 1.0 and self.max_update is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``freeze_region_config.json`` and a copy of the region into a folder."""
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        Region.load(self.region).save(d / REGION_NAME)
        doc = {**self.to_dict(), "region": REGION_NAME, "config_type": type(self).__name__}
        write_text_atomic(d / CONFIG_NAME, json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "FreezeRegionConfig":
        """Read a folder written by :meth:`save_pretrained` (the region path becomes absolute)."""
        d = Path(directory)
        path = d / CONFIG_NAME
        if not path.is_file():
            raise RegionsError(f"'{d}' holds no {CONFIG_NAME}; expected a folder written by "
                               "FreezeRegionConfig.save_pretrained")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RegionsError(f"'{path}' is not valid JSON: {e}") from e
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known - {"config_type"})
        if unknown:
            raise RegionsError(f"'{path}' has unknown fields {unknown}; expected {sorted(known)}")
        region = Path(doc["region"])
        doc["region"] = str(region if region.is_absolute() else d / region)
        doc.pop("config_type", None)
        return cls(**doc)
