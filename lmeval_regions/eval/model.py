"""``hf-regions``: lm-eval's ``hf`` model with region and neuron interventions from model_args.

Everything ``hf`` accepts keeps working (``pretrained``, ``dtype``, ``device``, ``parallelize``,
``peft``, ``gguf_file``, ...); ``pretrained`` also takes the embedded names (``gemma-3-270m``,
``smollm2-135m``, see :mod:`lmeval_regions.models`). Our keys, removed before ``HFLM.__init__``
(which forwards unknown keys to ``from_pretrained``):

=====================  ===========================================================================
``region``             ``TARGET[@INTERVENTION];...``: region artefacts (``*.safetensors``) and/or
                       entry specs (``model.layers.*.input_layernorm.weight[2100]``,
                       ``...o_proj.weight[:, 5]`` for a column), each with an optional
                       intervention (``zero``, ``constant:1``, ``scale:10``, ``noise:0.02``,
                       ``reinit``); applied in order.
``intervention``       default intervention of targets without ``@`` (default ``zero``).
``neurons``            a neuron-set artefact (kind ``neurons``, :mod:`lmeval_regions.neurons.sets`).
``neuron_set``         which set(s) of it, e.g. ``ar`` or ``ar+es`` (needed if it holds several).
``neuron_intervention`` ``zero`` (default), ``scale:X``, ``mean`` (the stored mean activation) or
                       ``noise:STD[/SEED]`` (seeded Gaussian noise on the selected neurons).
``batch_order``        ``length`` (default): with a batch size above 1, perplexity documents
                       (``loglikelihood_rolling``) are batched longest first; ``request``:
                       in request order, as ``hf`` batches them. Each batch is padded to its
                       longest document: on the UDHR held-out units request order adds 62 %
                       (batch 4) to 98 % (batch 8) padding tokens, length order 2-4 %. The
                       order changes no document's computation, only which documents share a
                       matrix product (values agree to ~1e-6; batch size 1 is unaffected).
``keep_host_memory``   ``true`` (default): on the CPU, freed memory is kept for reuse instead of
                       being faulted in afresh each batch (the same numbers, less time;
                       :mod:`lmeval_regions.models.host_memory`); ``false``: glibc's defaults.
=====================  ===========================================================================

Everything is checked before the model loads: region files exist and are region artefacts,
a neuron file is a neuron-set artefact, entry specs parse; when ``pretrained`` has a config
(a folder, an embedded name, a hub id in the cache) specs and region files are also resolved
against the model built from it on the meta device (no weights). Weight edits are applied once,
after the model is loaded, placed and tied, through
:class:`~lmeval_regions.interventions.Editor` (each parameter edited on its own device), and
each is logged in one line (target, intervention, entries) on the ``lm_eval`` logger: a
forward pass costs exactly what ``hf``'s does. Neuron interventions are forward-pre hooks on
the down projections, held for the life of the model. What was applied is recorded in the
results under ``config.regions`` (see :meth:`HFRegionsLM.get_model_info`).
"""

from __future__ import annotations

import difflib
import inspect
import logging
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from torch import nn

from lmeval_regions.artefacts import file_digest, read_metadata
from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.interventions import Editor, Intervention, parse_edits, resolve_target
from lmeval_regions.models import ModelConfig, keep_freed_memory, meta_model, resolve_pretrained
from lmeval_regions.neurons import NeuronMode, NeuronSet
from lmeval_regions.parsing import typed_value

MODEL_NAME = "hf-regions"
OUR_KEYS = ("region", "intervention", "neurons", "neuron_set", "neuron_intervention",
            "batch_order", "keep_host_memory")
BATCH_ORDERS = ("length", "request")
log = logging.getLogger("lm_eval.models.hf_regions")  # shown wherever lm_eval's log is


class _CanonicalParams(nn.Module):
    """A view of a model whose ``named_parameters`` carry the base model's names.

    Under a PEFT adapter a targeted weight is named ``...q_proj.base_layer.weight`` and the
    whole model sits under ``base_model.model.``; regions are made on the plain model, so they
    are resolved and applied through this view (same tensors, no copy)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        object.__setattr__(self, "_target", base)  # not registered as a submodule
        self.config = getattr(base, "config", None)
        self._names = {}
        for name, p in base.named_parameters():
            self._names.setdefault(name.replace(".base_layer.", "."), p)

    def named_parameters(self, *args, **kwargs):  # noqa: D401 - nn.Module signature
        yield from self._names.items()


def _check_unknown_keys(kwargs: dict[str, Any]) -> None:
    """Reject keys that look like misspellings of ours (they would reach ``from_pretrained``)."""
    known = set(inspect.signature(HFLM.__init__).parameters)
    for key in kwargs:
        if key in known:
            continue
        close = difflib.get_close_matches(key, OUR_KEYS, n=1, cutoff=0.75)
        if close:
            raise RegionsError(
                f"hf-regions: unknown model_args key '{key}'. Did you mean '{close[0]}'? "
                f"Region keys: {', '.join(OUR_KEYS)}; any other key goes to hf/from_pretrained.")


def _check_before_loading(pretrained: Any, edits: list[tuple[str, Intervention]],
                          neurons: str | None, kwargs: dict[str, Any]) -> None:
    """Everything that can be checked without the weights: files exist and are of the right
    kind; specs and region files fit the model's config (built on the meta device) when it
    can be read. Raises :class:`RegionsError` naming the bad value."""
    for target, _ in edits:
        if target.endswith(".safetensors") or Path(target).is_file():
            if not Path(target).is_file():
                raise RegionsError(f"hf-regions: region file '{target}' does not exist")
            read_metadata(target, "region")  # ArtefactError: not a region artefact
    if neurons is not None:
        if not Path(neurons).is_file():
            raise RegionsError(f"hf-regions: neurons file '{neurons}' does not exist")
        read_metadata(neurons, "neurons")
    if not edits or not isinstance(pretrained, str) or kwargs.get("gguf_file") \
            or kwargs.get("peft") or kwargs.get("delta"):
        return  # nothing to resolve, or a model whose names come from more than its config
    try:
        skeleton = meta_model(ModelConfig(
            model=pretrained, device="cpu", revision=kwargs.get("revision") or None,
            trust_remote_code=bool(kwargs.get("trust_remote_code", False))))
    except Exception:  # noqa: BLE001 - no readable config (e.g. offline hub id): after loading
        return
    for target, _ in edits:
        resolve_target(skeleton, target)  # a spec matching nothing, an index out of range


def _as_text(key: str, value: Any) -> str:
    # lm-eval types CLI values (ints, floats, bools); ours are all strings.
    if value is None or isinstance(value, bool) or str(value).strip() == "":
        raise RegionsError(f"hf-regions: model_args key '{key}' needs a value, got {value!r}")
    return str(value).strip()


@register_model(MODEL_NAME)
class HFRegionsLM(HFLM):
    """lm-eval's HF model with region edits and neuron interventions (see module doc)."""

    def __init__(self, pretrained: Any = None, region: str | None = None,
                 intervention: str = "zero", neurons: str | None = None,
                 neuron_set: str | None = None, neuron_intervention: str = "zero",
                 batch_order: str = "length", keep_host_memory: bool | str = True,
                 **kwargs: Any) -> None:
        if batch_order not in BATCH_ORDERS:
            raise RegionsError(f"hf-regions: batch_order '{batch_order}' is not one of "
                               f"{BATCH_ORDERS}")
        keep = keep_host_memory if isinstance(keep_host_memory, bool) \
            else typed_value(str(keep_host_memory))
        if not isinstance(keep, bool):
            raise RegionsError(f"hf-regions: keep_host_memory {keep_host_memory!r} is not "
                               "true or false")
        self.batch_order = batch_order
        if pretrained is None:
            raise RegionsError("hf-regions: model_args needs 'pretrained' (a folder, a hub id, "
                               "or an embedded model: gemma-3-270m, smollm2-135m)")
        _check_unknown_keys(kwargs)
        if isinstance(pretrained, str):
            pretrained = resolve_pretrained(pretrained)
        # Parse everything before the (slow) model load so a typo fails in milliseconds.
        default = Intervention.parse(_as_text("intervention", intervention))
        edits = parse_edits(_as_text("region", region), str(default)) if region is not None else []
        if neuron_set is not None and neurons is None:
            raise RegionsError("hf-regions: 'neuron_set' needs 'neurons=PATH' (a neuron-set file)")
        mode = NeuronMode.parse(_as_text("neuron_intervention", neuron_intervention))
        _check_before_loading(pretrained, edits, _as_text("neurons", neurons)
                              if neurons is not None else None, kwargs)
        super().__init__(pretrained=pretrained, **kwargs)
        if keep and str(self.device).startswith("cpu") and keep_freed_memory():
            # (before the first batch's logits)
            log.debug("hf-regions: freed memory is kept for reuse on the CPU "
                      "(keep_host_memory=false gives it back to the system)")
        self._region_log: list[dict[str, Any]] = []
        self._neuron_log: dict[str, Any] | None = None
        self._neuron_hooks = None
        self.editor: Editor | None = None
        if edits:
            self.apply_edits(edits)
        if neurons is not None:
            self._apply_neurons(_as_text("neurons", neurons), neuron_set, mode)

    # ---- weight edits -----------------------------------------------------------------
    def apply_edits(self, edits: list[tuple[str, Intervention]] | str,
                    default: str = "zero") -> list[dict[str, Any]]:
        """Apply ``TARGET@INTERVENTION`` edits (a list from :func:`parse_edits` or its text)
        on top of any already applied; returns their log entries."""
        if isinstance(edits, str):
            edits = parse_edits(edits, default)
        view = _CanonicalParams(self._model)
        if self.editor is None:
            self.editor = Editor(view)
        new = []
        for target, iv in edits:
            region = resolve_target(view, target)
            params = view._names
            offloaded = [n for n in region.indices
                         if n in params and params[n].device.type == "meta"]
            if offloaded:
                raise RegionsError(
                    f"hf-regions: parameter '{offloaded[0]}' is offloaded (on the meta device); "
                    "regions can only be applied to weights held in memory. Give the model "
                    "more memory (max_memory_per_gpu/max_cpu_memory) or drop parallelize.")
            n = self.editor.apply(region, iv)
            entry = {"target": target, "intervention": str(iv), "entries": n,
                     "parameters": len(region.indices), "spec": region.spec}
            if target.endswith(".safetensors"):
                entry["sha256"] = file_digest(target)
            log.info("hf-regions: applied %s to %d entries of %d parameters: %s", iv, n,
                     len(region.indices), target)
            new.append(entry)
        self._region_log.extend(new)
        return new

    def restore_edits(self) -> None:
        """Undo every weight edit (bit-exact); neuron hooks stay."""
        if self.editor is not None:
            self.editor.restore()
        self._region_log = []

    # ---- neuron interventions ---------------------------------------------------------
    def _apply_neurons(self, path: str, set_name: Any, mode: NeuronMode) -> None:
        base = (self._model.get_base_model() if hasattr(self._model, "get_base_model")
                else self._model)
        ns = NeuronSet.load(path, base)
        if set_name is None:
            if len(ns.sets) != 1:
                raise RegionsError(f"hf-regions: '{path}' holds the neuron sets {ns.sets}; "
                                   "choose with neuron_set=NAME (or NAME+NAME)")
            names = list(ns.sets)
        else:
            names = [s.strip() for s in _as_text("neuron_set", set_name).split("+") if s.strip()]
            for s in names:
                if s not in ns.sets:
                    raise RegionsError(f"hf-regions: neuron_set '{s}' is not in '{path}', which "
                                       f"holds {ns.sets}." + did_you_mean(s, ns.sets))
        self._neuron_hooks = ns.intervene(base, names, mode)
        self._neuron_log = {"file": path, "sha256": file_digest(path), "sets": names,
                            "intervention": str(mode),
                            "neurons": sum(ns.numel(s) for s in names)}
        log.info("hf-regions: neuron intervention %s on %d neurons of set(s) %s: %s", mode,
                 self._neuron_log["neurons"], "+".join(names), path)

    def remove_neuron_hooks(self) -> None:
        if self._neuron_hooks is not None:
            self._neuron_hooks.remove()
            self._neuron_hooks = None
            self._neuron_log = None

    # ---- provenance -------------------------------------------------------------------
    @property
    def applied(self) -> dict[str, Any]:
        """What this model has applied: ``{"edits": [...], "neurons": {...} | None}``."""
        return {"edits": list(self._region_log), "neurons": self._neuron_log}

    # ---- batching ---------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's, with the documents taken longest first when batched (``batch_order``):
        lm-eval batches rolling windows in request order and pads each batch to its longest."""
        if self.batch_order == "request" or self.batch_size == 1 or len(requests) < 2:
            return super().loglikelihood_rolling(requests, disable_tqdm)
        lengths = [len(self.tok_encode(r.args[0])) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: -lengths[i])  # stable on ties
        got = super().loglikelihood_rolling([requests[i] for i in order], disable_tqdm)
        out: list[float] = [0.0] * len(requests)
        for i, value in zip(order, got):
            out[i] = value
        return out

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["regions"] = self.applied
        info["batch_order"] = self.batch_order
        return info
