"""Capture of MLP neuron activations on parallel text (paper 2 §3.1), streamed to disk.

The *neurons* of a block are the channels of its down projection's input (act(gate)*up for
gated MLPs such as Llama/Gemma, act(fc) for BLOOM/GPT-style MLPs), found by structure with
:func:`~lmeval_regions.models.architecture.find_layout`. A forward-pre hook on every down
projection mean-pools that input over each sample's non-pad tokens (paper 2 Eq. 5: paper 2's
release reads the input of ``mlp.down_proj`` for Llama).

For LAPE (Tang et al., 2024) the capture also counts, per neuron, the fraction of tokens where
it is *active* (> 0) at :attr:`ActivationConfig.lape_site`:

* ``act`` (default, as the LAPE release): the output of the MLP's activation function, i.e.
  act(gate) in a gated MLP (the release counts ``silu(gate) > 0``; its maintainers confirm
  "gate values") and act(fc) in a plain one; the module is found by structure
  (:func:`~lmeval_regions.models.architecture.find_mlp_activations`);
* ``down_input``: the down projection's input act(gate)*up (what this library counted before;
  for plain MLPs both sites are the same tensor).

Artefact (kind ``"activations"``), one entry per sample, keyed by ``{lang}/{unit id}``::

    "{lang}/{id}"         (layers, neurons) fp32   mean activation over the sample's tokens
    "{lang}/{id}.active"  (layers, neurons) fp32   fraction of tokens > 0 at ``active_site``
    "{lang}/{id}.tokens"  ()                int64  number of tokens pooled

metadata: ``languages``, ``ids`` (``lang -> [id, ...]``), model fingerprint, ``layers``
(down-projection module names), ``neurons`` (per layer), ``max_length``, ``site`` (of the
means, :data:`SITE`), ``active``, ``active_site`` (:data:`ACT_SITE` or :data:`SITE`),
``active_modules`` (the hooked module per layer) and ``gated``.

Samples are written as soon as their batch is done (the safetensors header is laid out
first, then the data streamed into a temporary file that replaces the target at the end), so
memory stays bounded by one batch whatever the corpus size. Under a launcher (``accelerate
launch``, ``torchrun``) the ranks capture batches round-robin and rank 0 writes the same file
(:func:`capture`'s ``data_parallel``).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping

import torch
from torch import nn

from lmeval_regions import __version__
from lmeval_regions.artefacts import (
    METADATA_KEY,
    atomic_path,
    check_fingerprint,
    load_artefact,
    model_fingerprint,
    read_metadata,
)
from lmeval_regions.corpora.batches import batches
from lmeval_regions.errors import ArtefactError, RegionsError
from lmeval_regions.models import parallel
from lmeval_regions.models.architecture import find_layout, find_mlp_activations

KIND = "activations"
SITE = "mlp.down_proj.input"
"""Where neurons are read: the input of each block's MLP down projection."""
ACT_SITE = "mlp.act.output"
"""The output of each block's MLP activation function: act(gate) (gated) or act(fc) (plain)."""
LAPE_SITES = {"act": ACT_SITE, "down_input": SITE}
"""Values of :attr:`ActivationConfig.lape_site` and the site each one names."""


@dataclass
class ActivationConfig:
    """How activations are captured."""

    batch_size: int = field(default=8, metadata={"cli": False})
    """Samples per forward pass (on the command line: the corpus's --batch-size)."""
    max_length: int = field(default=128, metadata={"cli": False})
    """Tokens per sample, longer units truncated (on the command line: --max-length)."""
    active: bool = True
    """Also record, per neuron, the fraction of tokens where it is > 0 (needed by LAPE)."""
    lape_site: Literal["act", "down_input"] = "act"
    """Where a neuron counts as active (> 0) for LAPE: ``act`` = the MLP activation's output,
    act(gate) in gated MLPs (the LAPE release); ``down_input`` = the down projection's input
    act(gate)*up. Plain MLPs (BLOOM, GPT-2): both are act(fc)."""

    def __post_init__(self) -> None:
        if self.lape_site not in LAPE_SITES:
            raise RegionsError(f"lape_site '{self.lape_site}' is not one of {list(LAPE_SITES)}")
        if int(self.batch_size) < 1:
            raise RegionsError(f"batch_size must be >= 1, got {self.batch_size}")
        if int(self.max_length) < 2:
            raise RegionsError(f"max_length must be >= 2 tokens, got {self.max_length}")


class _Pool:
    """Masked mean and/or positive fraction over tokens of a ``(batch, seq, neurons)`` tensor.

    :meth:`pre` is a forward-pre hook (pools the module's input), :meth:`post` a forward hook
    (pools its output). ``mask``: ``(batch, seq)`` on the model's device, set before each
    forward; ``calls`` counts the module's calls, so a module run twice per forward is caught.
    """

    def __init__(self, name: str, width: int, mean: bool, active: bool):
        self.name, self.width = name, width
        self.want_mean, self.want_active = mean, active
        self.mask: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None    # (batch, neurons) fp32
        self.pos: torch.Tensor | None = None     # (batch, neurons) fp32
        self.calls = 0

    def _take(self, x: torch.Tensor) -> None:
        self.calls += 1
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise RegionsError(f"'{self.name}' carries a tensor of shape {tuple(x.shape)}; "
                               f"expected (batch, seq, {self.width} neurons)")
        x = x.detach()
        m = self.mask.to(x.dtype).unsqueeze(-1)                  # (B, T, 1)
        n = self.mask.sum(1, keepdim=True).clamp(min=1).float()  # (B, 1)
        # bmm keeps the pooling one fused op: (B, 1, T) @ (B, T, I) -> (B, 1, I)
        if self.want_mean:
            self.mean = torch.bmm(m.transpose(1, 2), x).squeeze(1).float() / n
        if self.want_active:
            self.pos = torch.bmm(m.transpose(1, 2), (x > 0).to(x.dtype)).squeeze(1).float() / n

    def pre(self, module: nn.Module, args: tuple) -> None:
        self._take(args[0])

    def post(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._take(output)


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


class _Writer:
    """Writes each sample's pooled tensors at its place in the artefact (rank 0 only)."""

    def __init__(self, f, base: int, offsets: dict[str, int], active: bool):
        self.f, self.base, self.offsets, self.active = f, base, offsets, active

    def put(self, keys: list[str], mean: torch.Tensor, pos: torch.Tensor | None,
            ntok: torch.Tensor) -> None:
        """``mean``/``pos``: ``(rows, L, I)`` fp32 on the CPU, ``ntok``: ``(rows,)``."""
        f = self.f
        for j, key in enumerate(keys):
            f.seek(self.base + self.offsets[key])
            f.write(mean[j].contiguous().numpy().tobytes())
            if self.active:
                f.seek(self.base + self.offsets[key + ".active"])
                f.write(pos[j].contiguous().numpy().tobytes())
            f.seek(self.base + self.offsets[key + ".tokens"])
            f.write(struct.pack("<q", int(ntok[j])))


def _gather_round(results: list, dp, batch_size: int, shape: tuple[int, int], active: bool,
                  device: torch.device, writer: _Writer | None) -> None:
    """Data parallel: send each rank's batch of this round (global batches ``r*world + k``,
    ``k`` = the rank) to rank 0, which writes them in corpus order. ``results[k]`` is
    ``(keys, mean, pos, ntok)``, the tensors only on rank ``k`` (None elsewhere)."""
    import torch.distributed as dist

    L, I = shape
    fields = 2 if active else 1
    payload = torch.zeros(batch_size, fields * L * I + 1, dtype=torch.float32, device=device)
    if dp.rank < len(results):
        _, mean, pos, ntok = results[dp.rank]
        rows = mean.shape[0]
        payload[:rows, :L * I] = mean.reshape(rows, -1)
        if active:
            payload[:rows, L * I:2 * L * I] = pos.reshape(rows, -1)
        payload[:rows, -1] = ntok.to(torch.float32)  # token counts < 2^24: exact in fp32
    got = [torch.empty_like(payload) for _ in range(dp.world_size)] if dp.main else None
    dist.gather(payload, got, dst=0)
    if writer is None:
        return
    for k, (keys, *_) in enumerate(results):
        part = got[k][:len(keys)].cpu()
        mean = part[:, :L * I].reshape(-1, L, I)
        pos = part[:, L * I:2 * L * I].reshape(-1, L, I) if active else None
        writer.put(keys, mean, pos, part[:, -1].round().long())


def capture(
    model: nn.Module,
    tokenizer,
    corpus: Mapping[str, list[dict]],
    path: str | os.PathLike,
    config: ActivationConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
    data_parallel: bool | None = None,
) -> dict[str, Any]:
    """Run ``corpus`` (``lang -> [{"id", "text"}]``) through ``model`` and stream the pooled
    neuron activations of every layer to ``path``. Returns the artefact's metadata.

    Works on whatever device the model is on; ``model`` is put in eval mode for the run and
    every hook added here is removed afterwards, also on error.

    ``data_parallel`` (None: when a process group of several processes exists and ``model``
    holds plain tensors, :func:`models.data_parallel`): every rank passes the whole corpus;
    batch ``i`` (over all languages, in order) is captured by rank ``i % world_size``
    (round-robin, :mod:`models.parallel`); after each round of ``world_size`` batches rank 0
    gathers them and writes the one artefact, identical to one process' (the others write
    nothing and wait for it at the end).
    """
    config = config or ActivationConfig()
    if not corpus or any(not units for units in corpus.values()):
        raise RegionsError("capture needs at least one unit in every language of the corpus")
    dp = parallel.data_parallel(model) if data_parallel is not False else None
    if data_parallel and dp is None:
        raise RegionsError("data_parallel=True needs a process group of more than one process "
                           "and a model of plain tensors")
    layout = find_layout(model)
    L, I = layout.num_layers, layout.intermediate_size
    ids = {lang: [str(u["id"]) for u in units] for lang, units in corpus.items()}
    for lang, lst in ids.items():
        if len(set(lst)) != len(lst):
            raise RegionsError(f"language '{lang}' has duplicate unit ids")
    # Means are always read at the down projection's input; the active fraction at lape_site.
    means = [_Pool(n, I, mean=True, active=False) for n in layout.down_proj]
    actives, gated, active_modules = [], None, None
    if config.active and config.lape_site == "act":
        found = find_mlp_activations(model, layout)
        active_modules, gated = found.modules, found.gated
        actives = [_Pool(n, I, mean=False, active=True) for n in active_modules]
    elif config.active:
        active_modules, actives = list(layout.down_proj), means
        for p in means:
            p.want_active = True
    meta = {"kind": KIND, "library_version": __version__, "languages": list(corpus), "ids": ids,
            "model": model_fingerprint(model), "layers": layout.down_proj, "neurons": I,
            "max_length": config.max_length, "site": SITE, "active": config.active,
            "active_site": LAPE_SITES[config.lape_site] if config.active else None,
            "active_modules": active_modules, "gated": gated}
    entries = []
    for lang, lst in ids.items():
        for i in lst:
            entries.append((f"{lang}/{i}", "F32", [L, I]))
            if config.active:
                entries.append((f"{lang}/{i}.active", "F32", [L, I]))
            entries.append((f"{lang}/{i}.tokens", "I64", []))
    head, offsets = _header(entries, meta)

    modules = dict(model.named_modules())
    pools = list({id(p): p for p in means + actives}.values())
    handles = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = sum(len(v) for v in ids.values())
    done = 0

    def forward(b: dict[str, torch.Tensor]):
        """``(mean, pos, ntok)`` of one batch: ``(B, L, I)`` fp32 on the model's device."""
        mask = b["attention_mask"].to(device)
        for p in pools:
            p.mask, p.calls = mask, 0
        model(input_ids=b["input_ids"].to(device), attention_mask=mask)
        for p in pools:
            if p.calls != 1:
                raise RegionsError(f"'{p.name}' ran {p.calls} times in one forward "
                                   f"pass; expected once per layer")
        mean = torch.stack([p.mean for p in means], 1)  # (B, L, I)
        pos = torch.stack([p.pos for p in actives], 1) if actives else None
        return mean, pos, b["attention_mask"].sum(1)

    try:
        for p in means:
            handles.append(modules[p.name].register_forward_pre_hook(p.pre))
        if actives is not means:
            for p in actives:
                handles.append(modules[p.name].register_forward_hook(p.post))
        with contextlib.ExitStack() as stack, torch.no_grad():
            writer = None
            if dp is None or dp.main:  # only rank 0 writes
                f = stack.enter_context(open(stack.enter_context(atomic_path(path)), "wb"))
                f.write(head)
                writer = _Writer(f, len(head), offsets, config.active)
            index, round_ = 0, []
            for lang, units in corpus.items():
                texts = [u["text"] for u in units]
                keys = [f"{lang}/{i}" for i in ids[lang]]
                start = 0
                for b in batches(tokenizer, texts, config.batch_size, config.max_length):
                    rows = int(b["input_ids"].shape[0])
                    batch_keys = keys[start:start + rows]
                    start += rows
                    if dp is None:
                        mean, pos, ntok = forward(b)
                        writer.put(batch_keys, mean.cpu(), None if pos is None else pos.cpu(),
                                   ntok)
                    else:
                        out = forward(b) if dp.mine(index) else (None, None, None)
                        round_.append((batch_keys, *out))
                        if len(round_) == dp.world_size:
                            _gather_round(round_, dp, config.batch_size, (L, I), config.active,
                                          device, writer)
                            round_ = []
                    index += 1
                    done += rows
                    if progress and writer is not None and (dp is None or not round_):
                        progress(done, total)
            if round_:  # the last, partial round
                _gather_round(round_, dp, config.batch_size, (L, I), config.active, device,
                              writer)
                if progress and writer is not None:
                    progress(done, total)
    finally:
        for h in handles:
            h.remove()
        for p in pools:
            p.mask = p.mean = p.pos = None
        model.train(was_training)
    if dp is not None:
        parallel.barrier()  # the other ranks wait for rank 0's file
    return meta


def _probabilities(active: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Token-weighted share of active tokens over samples: ``(samples, L, I)`` fractions and
    ``(samples,)`` token counts -> ``(L, I)`` fp32, i.e. LAPE's over_zero / n."""
    w = tokens.double()
    return ((active.double() * w[:, None, None]).sum(0) / w.sum()).float()


def _active_site(meta: Mapping[str, Any]) -> str | None:
    if not meta.get("active"):
        return None
    # Captures made before the site was recorded counted the down projection's input.
    return meta.get("active_site") or SITE


def activation_probabilities(path: str | os.PathLike, languages: Iterable[str] | None = None
                             ) -> tuple[list[str], torch.Tensor, str]:
    """LAPE's activation probabilities read from a capture one language at a time (memory:
    one language's ``.active`` tensors, whatever the number of languages).

    Returns ``(languages, probs, site)``: ``probs`` is ``(languages, layers, neurons)`` fp32,
    the share of each language's tokens where the neuron is > 0 at ``site``.
    """
    meta = read_metadata(path, KIND)
    if not meta.get("active"):
        raise RegionsError(f"'{path}' has no activation probabilities: capture with active=True")
    langs = list(languages) if languages is not None else list(meta["languages"])
    out = []
    for lang in langs:
        if lang not in meta["ids"]:
            raise RegionsError(f"language '{lang}' is not in '{path}'; it holds "
                               f"{meta['languages']}")
        keys = [f"{lang}/{i}" for i in meta["ids"][lang]]
        names = [k + suffix for k in keys for suffix in (".active", ".tokens")]
        t, _ = load_artefact(path, KIND, names=names)
        tokens = torch.stack([t[k + ".tokens"] for k in keys])
        out.append(_probabilities(torch.stack([t[k + ".active"] for k in keys]), tokens))
    return langs, torch.stack(out), _active_site(meta)


@dataclass
class Activations:
    """Pooled activations of a parallel corpus, in memory.

    Attributes:
        mean: ``(samples, layers, neurons)`` fp32, samples grouped by language in
            ``languages`` order, units in each language's ``ids`` order.
        active: ``(samples, layers, neurons)`` fp32 fraction of tokens > 0 at
            ``active_site``, or None.
        tokens: ``(samples,)`` int64 tokens pooled per sample.
        langs: language of each sample.
        ids: unit id (meaning) of each sample.
        languages: languages in order.
        layers: down-projection module names, one per layer.
        meta: the artefact metadata.
        active_site: where ``active`` was read (:data:`ACT_SITE` or :data:`SITE`), None when
            unknown (synthetic data) or not captured.
    """

    mean: torch.Tensor
    active: torch.Tensor | None
    tokens: torch.Tensor
    langs: list[str]
    ids: list[str]
    languages: list[str]
    layers: list[str]
    meta: dict[str, Any]
    active_site: str | None = None

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
                   [k.split("/", 1)[1] for k in keys], langs, list(meta["layers"]), meta,
                   _active_site(meta))

    def probabilities(self) -> torch.Tensor:
        """``(languages, layers, neurons)`` fp32: per language (``languages`` order), the share
        of its tokens where each neuron is > 0 at ``active_site`` (LAPE's p(l, k))."""
        if self.active is None:
            raise RegionsError("LAPE needs activation probabilities: capture with active=True")
        out = []
        for lang in self.languages:
            sel = torch.tensor([i for i, l in enumerate(self.langs) if l == lang])
            out.append(_probabilities(self.active[sel], self.tokens[sel]))
        return torch.stack(out)

    @classmethod
    def from_tensor(cls, mean: torch.Tensor, langs: list[str], ids: list[str],
                    active: torch.Tensor | None = None, layers: list[str] | None = None,
                    active_site: str | None = None) -> "Activations":
        """Wrap in-memory activations (synthetic data, tests): ``mean`` is
        ``(samples, layers, neurons)``."""
        if mean.dim() != 3 or mean.shape[0] != len(langs) or len(langs) != len(ids):
            raise RegionsError(f"activations must be (samples, layers, neurons) with one lang "
                               f"and id per sample; got {tuple(mean.shape)}, {len(langs)} langs, "
                               f"{len(ids)} ids")
        languages = list(dict.fromkeys(langs))
        layers = layers or [f"layer{i}" for i in range(mean.shape[1])]
        return cls(mean.float(), active, torch.ones(len(langs), dtype=torch.long), list(langs),
                   [str(i) for i in ids], languages, layers, {}, active_site)
