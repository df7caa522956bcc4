"""Capture of MLP neuron activations on parallel text (paper 2 §3.1), streamed to disk.

The *neurons* of a block are the channels of its down projection's input (act(gate)*up for
gated MLPs such as Llama/Gemma, act(fc) for BLOOM/GPT-style MLPs), found by structure with
:func:`~lmeval_regions.architecture.find_layout`. A forward-pre hook on every down projection
mean-pools that input over each sample's non-pad tokens (paper 2 Eq. 5) and, for LAPE
(Tang et al., 2024), counts the fraction of tokens where each neuron is positive.

Artefact (kind ``"activations"``), one entry per sample, keyed by ``{lang}/{unit id}``::

    "{lang}/{id}"         (layers, neurons) fp32   mean activation over the sample's tokens
    "{lang}/{id}.active"  (layers, neurons) fp32   fraction of tokens with activation > 0
    "{lang}/{id}.tokens"  ()                int64  number of tokens pooled

metadata: ``languages``, ``ids`` (``lang -> [id, ...]``), model fingerprint, ``layers``
(down-projection module names), ``neurons`` (per layer), ``max_length``, ``site``.

Samples are written as soon as their batch is done (the safetensors header is laid out
first, then the data streamed into a temporary file that replaces the target at the end), so
memory stays bounded by one batch whatever the corpus size.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from lmeval_regions import __version__
from lmeval_regions.artefacts import (METADATA_KEY, atomic_path, check_fingerprint, load_artefact,
                                      model_fingerprint, read_metadata)
from lmeval_regions.corpora.batches import batches
from lmeval_regions.errors import ArtefactError, RegionsError
from lmeval_regions.models.architecture import find_layout

KIND = "activations"
SITE = "mlp.down_proj.input"
"""Where neurons are read: the input of each block's MLP down projection."""


@dataclass
class ActivationConfig:
    """How activations are captured."""

    batch_size: int = 8
    """Samples per forward pass."""
    max_length: int = 128
    """Tokens per sample (longer units are truncated)."""
    active: bool = True
    """Also record, per neuron, the fraction of tokens where it is > 0 (needed by LAPE)."""

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise RegionsError(f"batch_size must be >= 1, got {self.batch_size}")
        if int(self.max_length) < 2:
            raise RegionsError(f"max_length must be >= 2 tokens, got {self.max_length}")


class _PoolHook:
    """Forward-pre hook storing the masked mean (and positive fraction) of a layer's input.

    ``mask``: ``(batch, seq)`` float on the model's device, set before each forward.
    """

    def __init__(self, active: bool):
        self.active = active
        self.mask: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None    # (batch, neurons) fp32
        self.pos: torch.Tensor | None = None     # (batch, neurons) fp32

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        m = self.mask.to(x.dtype).unsqueeze(-1)              # (B, T, 1)
        n = self.mask.sum(1, keepdim=True).clamp(min=1).float()  # (B, 1)
        # bmm keeps the pooling one fused op: (B, 1, T) @ (B, T, I) -> (B, 1, I)
        self.mean = torch.bmm(m.transpose(1, 2), x).squeeze(1).float() / n
        if self.active:
            self.pos = torch.bmm(m.transpose(1, 2), (x > 0).to(x.dtype)).squeeze(1).float() / n


def _header(entries: list[tuple[str, str, list[int]]], meta: dict[str, Any]) -> tuple[bytes, dict]:
    """A safetensors header for tensors laid out in ``entries`` order: (bytes, offsets)."""
    sizes = {"F32": 4, "I64": 8}
    hdr: dict[str, Any] = {"__metadata__": {METADATA_KEY: json.dumps(meta, sort_keys=True)}}
    offsets, pos = {}, 0
    for key, dtype, shape in entries:
        n = sizes[dtype]
        for s in shape:
            n *= s
        hdr[key] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        offsets[key] = pos
        pos += n
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw, offsets


def capture(
    model: nn.Module,
    tokenizer,
    corpus: Mapping[str, list[dict]],
    path: str | os.PathLike,
    config: ActivationConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run ``corpus`` (``lang -> [{"id", "text"}]``) through ``model`` and stream the pooled
    neuron activations of every layer to ``path``. Returns the artefact's metadata.

    Works on whatever device the model is on; ``model`` is put in eval mode for the run and
    every hook added here is removed afterwards, also on error.
    """
    config = config or ActivationConfig()
    if not corpus or any(not units for units in corpus.values()):
        raise RegionsError("capture needs at least one unit in every language of the corpus")
    layout = find_layout(model)
    L, I = layout.num_layers, layout.intermediate_size
    ids = {lang: [str(u["id"]) for u in units] for lang, units in corpus.items()}
    for lang, lst in ids.items():
        if len(set(lst)) != len(lst):
            raise RegionsError(f"language '{lang}' has duplicate unit ids")
    meta = {"kind": KIND, "library_version": __version__, "languages": list(corpus), "ids": ids,
            "model": model_fingerprint(model), "layers": layout.down_proj, "neurons": I,
            "max_length": config.max_length, "site": SITE, "active": config.active}
    entries = []
    for lang, lst in ids.items():
        for i in lst:
            entries.append((f"{lang}/{i}", "F32", [L, I]))
            if config.active:
                entries.append((f"{lang}/{i}.active", "F32", [L, I]))
            entries.append((f"{lang}/{i}.tokens", "I64", []))
    head, offsets = _header(entries, meta)
    base = len(head)

    modules = dict(model.named_modules())
    hooks = [_PoolHook(config.active) for _ in layout.down_proj]
    handles = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = sum(len(v) for v in ids.values())
    done = 0
    try:
        for name, h in zip(layout.down_proj, hooks):
            handles.append(modules[name].register_forward_pre_hook(h))
        with atomic_path(path) as tmp, open(tmp, "wb") as f, torch.no_grad():
            f.write(head)
            for lang, units in corpus.items():
                texts = [u["text"] for u in units]
                keys = [f"{lang}/{i}" for i in ids[lang]]
                start = 0
                for b in batches(tokenizer, texts, config.batch_size, config.max_length):
                    mask = b["attention_mask"].to(device)
                    for h in hooks:
                        h.mask = mask
                    model(input_ids=b["input_ids"].to(device), attention_mask=mask)
                    mean = torch.stack([h.mean for h in hooks], 1).cpu()  # (B, L, I)
                    pos = torch.stack([h.pos for h in hooks], 1).cpu() if config.active else None
                    ntok = b["attention_mask"].sum(1)
                    for j in range(mean.shape[0]):
                        key = keys[start + j]
                        f.seek(base + offsets[key])
                        f.write(mean[j].contiguous().numpy().tobytes())
                        if pos is not None:
                            f.seek(base + offsets[key + ".active"])
                            f.write(pos[j].contiguous().numpy().tobytes())
                        f.seek(base + offsets[key + ".tokens"])
                        f.write(struct.pack("<q", int(ntok[j])))
                    start += mean.shape[0]
                    done += mean.shape[0]
                    if progress:
                        progress(done, total)
    finally:
        for h in handles:
            h.remove()
        for h in hooks:
            h.mask = h.mean = h.pos = None
        model.train(was_training)
    return meta


@dataclass
class Activations:
    """Pooled activations of a parallel corpus, in memory.

    Attributes:
        mean: ``(samples, layers, neurons)`` fp32, samples grouped by language in
            ``languages`` order, units in each language's ``ids`` order.
        active: ``(samples, layers, neurons)`` fp32 fraction of tokens > 0, or None.
        tokens: ``(samples,)`` int64 tokens pooled per sample.
        langs: language of each sample.
        ids: unit id (meaning) of each sample.
        languages: languages in order.
        layers: down-projection module names, one per layer.
        meta: the artefact metadata.
    """

    mean: torch.Tensor
    active: torch.Tensor | None
    tokens: torch.Tensor
    langs: list[str]
    ids: list[str]
    languages: list[str]
    layers: list[str]
    meta: dict[str, Any]

    @classmethod
    def load(cls, path: str | os.PathLike, languages: Iterable[str] | None = None,
             model: nn.Module | None = None) -> "Activations":
        """Read an activation artefact (optionally only some ``languages``)."""
        meta = read_metadata(path, KIND)
        if model is not None:
            check_fingerprint(meta["model"], model, what=f"activation file '{path}'")
        langs = list(languages) if languages is not None else meta["languages"]
        for l in langs:
            if l not in meta["ids"]:
                raise RegionsError(f"language '{l}' is not in '{path}'; it holds "
                                   f"{meta['languages']}")
        keys = [f"{l}/{i}" for l in langs for i in meta["ids"][l]]
        names = keys + [k + ".tokens" for k in keys]
        if meta.get("active"):
            names += [k + ".active" for k in keys]
        tensors, _ = load_artefact(path, KIND, names=names)
        mean = torch.stack([tensors[k] for k in keys])
        active = torch.stack([tensors[k + ".active"] for k in keys]) if meta.get("active") else None
        tokens = torch.stack([tensors[k + ".tokens"] for k in keys])
        if int(tokens.min()) <= 0:
            raise ArtefactError(f"'{path}' has samples with no tokens (incomplete capture?)")
        return cls(mean, active, tokens, [k.split("/", 1)[0] for k in keys],
                   [k.split("/", 1)[1] for k in keys], langs, list(meta["layers"]), meta)

    @classmethod
    def from_tensor(cls, mean: torch.Tensor, langs: list[str], ids: list[str],
                    active: torch.Tensor | None = None, layers: list[str] | None = None
                    ) -> "Activations":
        """Wrap in-memory activations (synthetic data, tests): ``mean`` is
        ``(samples, layers, neurons)``."""
        if mean.dim() != 3 or mean.shape[0] != len(langs) or len(langs) != len(ids):
            raise RegionsError(f"activations must be (samples, layers, neurons) with one lang "
                               f"and id per sample; got {tuple(mean.shape)}, {len(langs)} langs, "
                               f"{len(ids)} ids")
        languages = list(dict.fromkeys(langs))
        layers = layers or [f"layer{i}" for i in range(mean.shape[1])]
        return cls(mean.float(), active, torch.ones(len(langs), dtype=torch.long), list(langs),
                   [str(i) for i in ids], languages, layers, {})
