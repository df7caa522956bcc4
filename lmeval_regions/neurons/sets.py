"""Neuron sets: named sets of MLP neurons per layer, and scoped hooks that deactivate them.

An MLP *neuron* is one channel of the input of a block's down projection (act(gate)*up for
gated MLPs such as Llama/Gemma, act(fc) for BLOOM/GPT-style MLPs); see
:mod:`lmeval_regions.models.architecture`. A :class:`NeuronSet` holds several named sets (one per
language, ``"random"``, ...) of such channels, per down-projection module.

Artefact (kind ``"neurons"``), tensors keyed by names, never by list position::

    "{set}/{down_proj module}"       -> sorted unique int32 neuron indices
    "{set}/{down_proj module}.mean"  -> fp32 mean activation of those neurons (optional)

metadata: model fingerprint, ``sets``, ``site`` (``"mlp.down_proj.input"``), ``method``,
``threshold``, ``intermediate_size`` and free-form ``info``.

Deactivation (paper 2 §4.3) is done by forward-pre hooks on each down projection, which
rewrite the selected input channels: ``zero``, ``scale:X`` (multiply by X), ``mean``
(replace by the stored mean activation) or ``noise:STD[/SEED]`` (add Gaussian noise of that
std, as paper 2's release can). :meth:`NeuronSet.intervene` returns a handle that is a context
manager; it removes exactly the hooks it added, also on error.

Noise is seeded per handle: one ``torch.Generator`` per device, seeded with SEED when the
handle is made, draws ``(*input.shape[:-1], k)`` standard normals in fp32 for the ``k``
selected channels of each hooked layer, in the order the layers run; they are multiplied by
STD, cast to the input's dtype and added. The same handle, model and inputs give the same
noise on the same device type (CPU and CUDA streams differ); successive forwards draw fresh
noise, like the release's ``randn_like``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from lmeval_regions.activations.capture import SITE
from lmeval_regions.artefacts import (
    check_fingerprint,
    load_artefact,
    model_fingerprint,
    save_artefact,
)
from lmeval_regions.errors import ArtefactError, RegionsError, did_you_mean
from lmeval_regions.models.architecture import find_layout

KIND = "neurons"
MODES = ("zero", "scale:X", "mean", "noise:STD[/SEED]")
_KINDS = ("zero", "scale", "mean", "noise")


@dataclass(frozen=True)
class NeuronMode:
    """How selected neurons are changed."""

    kind: str = "zero"
    """``zero``, ``scale``, ``mean`` or ``noise``."""
    value: float | None = None
    """The factor of ``scale`` or the standard deviation of ``noise``; None otherwise."""
    seed: int | None = None
    """Seed of ``noise`` (0 when not given); None for the other kinds."""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise RegionsError(f"neuron intervention '{self.kind}' is not one of {MODES}."
                               + did_you_mean(self.kind, _KINDS))
        if self.kind in ("scale", "noise"):
            if self.value is None:
                example = "scale:0.5" if self.kind == "scale" else "noise:0.1 or noise:0.1/7"
                raise RegionsError(f"neuron intervention '{self.kind}' needs a value, e.g. "
                                   f"'{example}'")
            if not math.isfinite(self.value) or (self.kind == "noise" and self.value < 0):
                raise RegionsError(f"neuron intervention '{self.kind}': value {self.value:g} "
                                   f"must be a finite number" + (" >= 0 (a standard deviation)"
                                                                 if self.kind == "noise" else ""))
        elif self.value is not None:
            raise RegionsError(f"neuron intervention '{self.kind}' takes no value "
                               f"(got {self.value:g})")
        if self.kind == "noise":
            seed = 0 if self.seed is None else self.seed
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise RegionsError(f"neuron intervention 'noise': seed {seed!r} must be an "
                                   f"integer >= 0")
            object.__setattr__(self, "seed", seed)
        elif self.seed is not None:
            raise RegionsError(f"neuron intervention '{self.kind}' takes no seed "
                               f"(got {self.seed})")

    @classmethod
    def parse(cls, text: "str | NeuronMode") -> "NeuronMode":
        """``zero``, ``scale:X``, ``mean`` or ``noise:STD[/SEED]`` (e.g. ``noise:0.1/7``)."""
        if isinstance(text, NeuronMode):
            return text
        kind, _, val = str(text).strip().partition(":")
        kind = kind.strip()
        seed_text = None
        if kind == "noise":
            val, _, seed_text = val.partition("/")
        value = seed = None
        if val.strip():
            try:
                value = float(val)
            except ValueError:
                raise RegionsError(f"neuron intervention '{text}': value '{val}' is not a "
                                   f"number; expected one of {MODES}") from None
        if seed_text is not None and seed_text.strip():
            try:
                seed = int(seed_text)
            except ValueError:
                raise RegionsError(f"neuron intervention '{text}': seed '{seed_text}' is not "
                                   f"an integer; expected noise:STD[/SEED]") from None
        return cls(kind, value, seed)

    def __str__(self) -> str:
        if self.kind == "noise":
            return f"noise:{self.value:g}/{self.seed}"
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


@dataclass
class NeuronSet:
    """Named sets of MLP neurons of one model.

    Attributes:
        indices: ``set -> module -> (k,) int32`` sorted unique neuron indices, where ``module``
            is a down-projection module name (e.g. ``model.layers.3.mlp.down_proj``).
        means: ``set -> module -> (k,) fp32`` mean activation of those neurons (optional;
            needed by the ``mean`` intervention), aligned with ``indices``.
        model: fingerprint of the model (:func:`~lmeval_regions.artefacts.model_fingerprint`).
        method: how the sets were chosen (``"zscore"``, ``"lape"``, ``"random"``, ...).
        threshold: the selection threshold (z-score, entropy quantile...), if any.
        intermediate_size: number of neurons per layer (indices are below it).
        info: free-form JSON-serialisable details (sources, counts, seeds...).
        selected_at: ``set -> site`` of the statistic each set was selected from (e.g. z-score
            sets at ``mlp.down_proj.input``, LAPE sets at ``mlp.act.output``); the sets are
            always *applied* at the down projection's input (``site`` in the metadata).
    """

    indices: dict[str, dict[str, torch.Tensor]]
    means: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    method: str = ""
    threshold: float | None = None
    intermediate_size: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    selected_at: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        extra = set(self.selected_at) - set(self.indices)
        if extra:
            raise RegionsError(f"selected_at names sets that do not exist: {sorted(extra)[:3]}")
        clean: dict[str, dict[str, torch.Tensor]] = {}
        clean_means: dict[str, dict[str, torch.Tensor]] = {}
        for s, per in self.means.items():
            extra = set(per) - set(self.indices.get(s, {}))
            if extra:
                raise RegionsError(f"neuron set '{s}' has means for modules without neurons: "
                                   f"{sorted(extra)[:3]}")
        for s, per in self.indices.items():
            if not s or "/" in s:
                raise RegionsError(f"neuron set name {s!r} must be non-empty and without '/'")
            clean[s] = {}
            for m, idx in per.items():
                idx = torch.as_tensor(idx).reshape(-1).to(torch.int64)
                uniq = torch.unique(idx)  # sorted
                if uniq.numel() != idx.numel():
                    raise RegionsError(f"neuron set '{s}' lists a neuron of '{m}' twice")
                if uniq.numel() and (int(uniq[0]) < 0 or (
                        self.intermediate_size and int(uniq[-1]) >= self.intermediate_size)):
                    raise RegionsError(
                        f"neuron set '{s}': indices of '{m}' fall outside "
                        f"[0, {self.intermediate_size or 'inf'})")
                if self.means.get(s, {}).get(m) is not None:
                    mean = self.means[s][m].reshape(-1).float()
                    if mean.numel() != idx.numel():
                        raise RegionsError(f"neuron set '{s}', '{m}': {mean.numel()} means for "
                                           f"{idx.numel()} neurons")
                    # keep means aligned with the sorted indices
                    clean_means.setdefault(s, {})[m] = mean[torch.argsort(idx)]
                clean[s][m] = uniq.to(torch.int32)
        self.indices = clean
        self.means = clean_means

    # ---- inspection -------------------------------------------------------------------
    @property
    def sets(self) -> list[str]:
        """Names of the sets, in insertion order."""
        return list(self.indices)

    def counts(self, set_name: str) -> dict[str, int]:
        """``module -> number of neurons`` of one set."""
        return {m: int(i.numel()) for m, i in self._get(set_name).items()}

    def numel(self, set_name: str) -> int:
        return sum(self.counts(set_name).values())

    def _get(self, set_name: str) -> dict[str, torch.Tensor]:
        if set_name not in self.indices:
            raise RegionsError(f"neuron set '{set_name}' is not in this file; it holds "
                               f"{self.sets}." + did_you_mean(set_name, self.sets))
        return self.indices[set_name]

    # ---- persistence ------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for s, per in self.indices.items():
            for m, idx in per.items():
                tensors[f"{s}/{m}"] = idx.to(torch.int32)
                mean = self.means.get(s, {}).get(m)
                if mean is not None:
                    tensors[f"{s}/{m}.mean"] = mean.float()
        meta = {"model": self.model, "sets": self.sets, "site": SITE, "method": self.method,
                "threshold": self.threshold, "intermediate_size": self.intermediate_size,
                "counts": {s: self.numel(s) for s in self.sets}, "info": self.info,
                "selected_at": self.selected_at}
        save_artefact(path, tensors, KIND, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "NeuronSet":
        """Read a neuron-set artefact; with ``model``, check that each down projection it
        names exists there with the same shape (the error names the first mismatch)."""
        tensors, doc = load_artefact(path, KIND)
        if doc.get("site", SITE) != SITE:
            raise ArtefactError(f"'{path}' holds neurons at site '{doc.get('site')}', "
                                f"expected '{SITE}'")
        sets = list(doc.get("sets", []))
        indices: dict[str, dict[str, torch.Tensor]] = {s: {} for s in sets}
        means: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            s, sep, m = key.partition("/")
            if not sep or s not in indices:
                raise ArtefactError(f"'{path}' has tensor '{key}' outside its sets {sets}")
            if m.endswith(".mean"):
                means.setdefault(s, {})[m[:-len(".mean")]] = t
            else:
                indices[s][m] = t
        try:
            out = cls(indices, means, doc.get("model", {}), doc.get("method", ""),
                      doc.get("threshold"), int(doc.get("intermediate_size", 0)),
                      doc.get("info", {}), dict(doc.get("selected_at") or {}))
        except RegionsError as e:
            raise ArtefactError(f"'{path}' is corrupt: {e}") from e
        if model is not None:
            out.check_model(model, what=f"neuron file '{path}'")
        return out

    def check_model(self, model: nn.Module, what: str = "neuron set") -> None:
        modules = sorted({m for per in self.indices.values() for m in per})
        if self.model:
            check_fingerprint(self.model, model, what=what,
                              names=[f"{m}.weight" for m in modules])
        layout = find_layout(model)
        for m in modules:
            if m not in layout.down_proj:
                raise ModelLayoutError(f"{what} names '{m}', which is not a down projection of "
                                       f"{type(model).__name__}."
                                       + did_you_mean(m, layout.down_proj))

    # ---- construction helpers -------------------------------------------------------------
    @classmethod
    def from_masks(cls, masks: Mapping[str, torch.Tensor], model: nn.Module,
                   means: Mapping[str, torch.Tensor] | None = None, method: str = "",
                   threshold: float | None = None, info: dict[str, Any] | None = None,
                   selected_at: Mapping[str, str] | None = None) -> "NeuronSet":
        """Build from ``set -> (num_layers, intermediate) bool`` masks over ``model``'s layers;
        ``means``: ``set -> (num_layers, intermediate)`` mean activations (optional)."""
        layout = find_layout(model)
        indices: dict[str, dict[str, torch.Tensor]] = {}
        mean_out: dict[str, dict[str, torch.Tensor]] = {}
        for s, mask in masks.items():
            mask = torch.as_tensor(mask).bool()
            if tuple(mask.shape) != (layout.num_layers, layout.intermediate_size):
                raise RegionsError(f"mask of set '{s}' has shape {tuple(mask.shape)}, expected "
                                   f"(layers, neurons) = ({layout.num_layers}, "
                                   f"{layout.intermediate_size})")
            indices[s], mean_out[s] = {}, {}
            for layer, module in enumerate(layout.down_proj):
                idx = torch.nonzero(mask[layer]).reshape(-1)
                if idx.numel():
                    indices[s][module] = idx.to(torch.int32)
                    if means is not None and s in means:
                        mean_out[s][module] = torch.as_tensor(means[s])[layer, idx].float()
        return cls(indices, {k: v for k, v in mean_out.items() if v}, model_fingerprint(model),
                   method, threshold, layout.intermediate_size, dict(info or {}),
                   dict(selected_at or {}))

    def masks(self, num_layers: int, down_proj: list[str]) -> dict[str, torch.Tensor]:
        """``set -> (num_layers, intermediate) bool`` masks (inverse of :meth:`from_masks`)."""
        out = {}
        for s, per in self.indices.items():
            m = torch.zeros(num_layers, self.intermediate_size, dtype=torch.bool)
            for layer, module in enumerate(down_proj):
                if module in per:
                    m[layer, per[module].long()] = True
            out[s] = m
        return out

    # ---- deactivation -------------------------------------------------------------------
    def intervene(self, model: nn.Module, set_name: str | Iterable[str],
                  mode: "str | NeuronMode" = "zero") -> "NeuronHooks":
        """Hook ``model`` so that the neurons of ``set_name`` (or the union of several sets)
        are zeroed / scaled / replaced by their mean / noised while the handle is active.

        The hooks are registered at once; use the handle as a context manager (or call its
        ``remove()``) to take off exactly these hooks::

            with neurons.intervene(model, "ar", "zero"):
                ppl = perplexity(model, tok, texts)
        """
        mode = NeuronMode.parse(mode)
        names = [set_name] if isinstance(set_name, str) else list(set_name)
        if not names:
            raise RegionsError("intervene needs at least one neuron set name")
        self.check_model(model)
        modules = dict(model.named_modules())
        per_module: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for s in names:
            for m, idx in self._get(s).items():
                mean = self.means.get(s, {}).get(m)
                if mode.kind == "mean" and mean is None:
                    raise RegionsError(f"neuron set '{s}' has no stored means for '{m}'; "
                                       f"the 'mean' intervention needs them (use zero/scale:X)")
                if m in per_module:  # union of sets: a neuron in two sets keeps its first mean
                    old_idx, old_mean = per_module[m]
                    new = ~torch.isin(idx, old_idx)
                    idx = torch.cat([old_idx, idx[new]])
                    mean = None if mean is None else torch.cat([old_mean, mean[new]])
                per_module[m] = (idx, mean)
        return NeuronHooks(modules, per_module, mode)


class ModelLayoutError(ArtefactError):
    """A neuron set names modules the model does not have."""


class _NoiseSource:
    """Seeded Gaussian noise shared by the hooks of one handle: a generator per device."""

    def __init__(self, seed: int):
        self.seed = seed
        self._gens: dict[torch.device, torch.Generator] = {}

    def draw(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        if device not in self._gens:
            self._gens[device] = torch.Generator(device=device).manual_seed(self.seed)
        return torch.randn(shape, generator=self._gens[device], device=device,
                           dtype=torch.float32)


class _ChannelEdit:
    """Forward-pre hook rewriting channels of the down projection's input.

    ``zero``/``scale``/``mean``: ``x * factor + offset`` with ``factor``/``offset`` of shape
    ``(intermediate,)`` (1/0 outside the selected neurons); ``noise``: ``x`` plus noise on the
    selected channels only. Out of place, so autograd and the caller's tensors are untouched.
    The vectors are cached per (device, dtype) of the input.
    """

    def __init__(self, idx: torch.Tensor, mean: torch.Tensor | None, mode: NeuronMode,
                 noise: _NoiseSource | None = None):
        self.idx = idx.long()
        self.mean = mean
        self.mode = mode
        self.noise = noise
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _check(self, n: int) -> None:
        if self.idx.numel() and int(self.idx.max()) >= n:
            raise RegionsError(f"neuron index {int(self.idx.max())} is outside the "
                               f"{n} neurons of this layer")

    def _vectors(self, x: torch.Tensor):
        key = (x.device, x.dtype, x.shape[-1])
        if key not in self._cache:
            n = x.shape[-1]
            self._check(n)
            if self.mode.kind == "noise":
                self._cache[key] = (self.idx.to(x.device), None)
                return self._cache[key]
            factor = torch.ones(n, dtype=x.dtype)
            offset = None
            if self.mode.kind == "scale":
                factor[self.idx] = self.mode.value
            else:
                factor[self.idx] = 0
            if self.mode.kind == "mean":
                offset = torch.zeros(n, dtype=x.dtype)
                offset[self.idx] = self.mean.to(x.dtype)
                offset = offset.to(x.device)
            self._cache[key] = (factor.to(x.device), offset)
        return self._cache[key]

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if self.mode.kind == "noise":
            idx, _ = self._vectors(x)
            eps = self.noise.draw((*x.shape[:-1], idx.numel()), x.device) * self.mode.value
            return (x.index_add(-1, idx, eps.to(x.dtype)),) + tuple(args[1:])
        factor, offset = self._vectors(x)
        y = x * factor
        if offset is not None:
            y = y + offset
        return (y,) + tuple(args[1:])


class NeuronHooks:
    """Handle of the hooks :meth:`NeuronSet.intervene` added; a context manager."""

    def __init__(self, modules: Mapping[str, nn.Module],
                 per_module: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]],
                 mode: NeuronMode):
        self.mode = mode
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        noise = _NoiseSource(mode.seed) if mode.kind == "noise" else None
        try:
            for name, (idx, mean) in per_module.items():
                self._handles.append(modules[name].register_forward_pre_hook(
                    _ChannelEdit(idx, mean, mode, noise)))
        except BaseException:
            self.remove()
            raise

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Remove exactly the hooks this handle added (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "NeuronHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
