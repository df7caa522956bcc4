"""Neuron metrics of paper 2 (Zeng et al., "Converging to a Lingua Franca"), and LAPE.

Input: :class:`~lmeval_regions.activations.Activations`, i.e. per sample (language, meaning)
the mean-pooled activation of every MLP neuron of every layer.

* **Similarity map** (Eq. 5-7): each sample's activations of all layers concatenated,
  L2-normalised; ``S = A Aᵀ`` (cosine). Per layer: the same on one layer's neurons.
* **LRDS** (Eq. 8): mean similarity of pairs in the *same language* minus that of pairs in
  *different languages*, all pairs having *different meanings*.
* **SADS** (Eq. 9): mean similarity of pairs with the *same meaning* minus that of pairs with
  *different meanings*, all pairs in *different languages*. Pairs are grouped by the samples'
  language and unit id, never by position, so the released code's SADS regrouping bug
  (striding by ``n_per_lang + 1``) cannot occur.
* **Contribution** of neuron k to language l (Eq. 10-11): the mean over pairs i<j of that
  language's samples of ``â_ik â_jk`` (â normalised), i.e. k's share of the language's mean
  within-language cosine.
* **z-scores** across languages (Eq. 12-14, population std); **key neurons** of l: z > threshold
  (default 2). **SKLR**: the sum over languages of their key-region sizes.
* **LAPE** (Tang et al., 2024): activation probability p(l, k) of each neuron per language;
  neurons whose normalised distribution over languages has the lowest entropy (bottom
  ``top_rate``), among those with a high probability somewhere, are assigned to the languages
  where p exceeds the ``activation_bar`` quantile.

Both selections return a :class:`~lmeval_regions.neuron_sets.NeuronSet`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from lmeval_regions.activations import Activations
from lmeval_regions.errors import RegionsError
from lmeval_regions.neurons.sets import NeuronHooks, NeuronSet
from lmeval_regions.perplexity import perplexity


# ---- similarity ------------------------------------------------------------------------------

def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``(samples, dims)`` scaled to unit L2 norm (zero rows stay zero)."""
    x = x.double()
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def vectors(acts: Activations, layer: int | None = None) -> torch.Tensor:
    """``(samples, dims)`` normalised activation vectors: all layers concatenated, or one."""
    x = acts.mean if layer is None else acts.mean[:, layer:layer + 1]
    return _normalise(x.reshape(x.shape[0], -1))


def similarity(acts: Activations, layer: int | None = None) -> torch.Tensor:
    """``(samples, samples)`` cosine similarity map (whole model, or one layer)."""
    v = vectors(acts, layer)
    return (v @ v.T).float()


def pair_masks(langs: list[str], ids: list[str]) -> dict[str, torch.Tensor]:
    """Boolean ``(samples, samples)`` masks of pair groups, from labels (never positions):
    ``same_lang_diff_meaning``, ``diff_lang_diff_meaning``, ``same_meaning_diff_lang``."""
    lang_codes = {l: i for i, l in enumerate(dict.fromkeys(langs))}
    id_codes = {m: i for i, m in enumerate(dict.fromkeys(ids))}
    la = torch.tensor([lang_codes[l] for l in langs])
    me = torch.tensor([id_codes[m] for m in ids])
    same_l = la[:, None] == la[None, :]
    same_m = me[:, None] == me[None, :]
    return {"same_lang_diff_meaning": same_l & ~same_m,
            "diff_lang_diff_meaning": ~same_l & ~same_m,
            "same_meaning_diff_lang": same_m & ~same_l}


def _masked_mean(s: torch.Tensor, m: torch.Tensor, what: str) -> float:
    if not bool(m.any()):
        raise RegionsError(f"no sample pairs for {what}: need >= 2 languages and >= 2 units "
                           f"with shared ids")
    return float(s[m].double().mean())


def lrds_sads(sim: torch.Tensor, langs: list[str], ids: list[str]) -> dict[str, float]:
    """LRDS and SADS of a similarity map with per-sample language and meaning labels."""
    m = pair_masks(langs, ids)
    d = _masked_mean(sim, m["diff_lang_diff_meaning"], "different language, different meaning")
    same_l = _masked_mean(sim, m["same_lang_diff_meaning"], "same language, different meaning")
    same_m = _masked_mean(sim, m["same_meaning_diff_lang"], "same meaning, different language")
    return {"lrds": same_l - d, "sads": same_m - d, "sim_same_lang": same_l,
            "sim_same_meaning": same_m, "sim_other": d}


def layerwise(acts: Activations) -> list[dict[str, float]]:
    """LRDS/SADS of every layer's own similarity map."""
    return [lrds_sads(similarity(acts, i), acts.langs, acts.ids) | {"layer": i}
            for i in range(acts.mean.shape[1])]


def language_block_means(sim: torch.Tensor, langs: list[str]) -> tuple[list[str], torch.Tensor]:
    """``(languages, (n_lang, n_lang))`` mean similarity between language blocks (the
    diagonal block excludes each sample's similarity with itself)."""
    languages = list(dict.fromkeys(langs))
    idx = {l: torch.tensor([i for i, x in enumerate(langs) if x == l]) for l in languages}
    out = torch.zeros(len(languages), len(languages))
    for a, la in enumerate(languages):
        for b, lb in enumerate(languages):
            block = sim[idx[la]][:, idx[lb]]
            if a == b:
                n = block.shape[0]
                out[a, b] = (block.sum() - block.diagonal().sum()) / max(n * n - n, 1)
            else:
                out[a, b] = block.mean()
    return languages, out


# ---- key neurons (paper 2 §3.3) ---------------------------------------------------------------

def contribution_scores(acts: Activations) -> torch.Tensor:
    """``(languages, layers*neurons)`` contribution of each neuron to each language's mean
    pairwise cosine (Eq. 10-11): mean over pairs i<j of ``â_ik â_jk``."""
    v = vectors(acts)
    rows = []
    for lang in acts.languages:
        x = v[torch.tensor([i for i, l in enumerate(acts.langs) if l == lang])]
        n = x.shape[0]
        if n < 2:
            raise RegionsError(f"language '{lang}' has {n} sample; contributions need >= 2")
        # sum_{i<j} x_i x_j = ((sum x)^2 - sum x^2) / 2, per neuron
        rows.append((x.sum(0) ** 2 - (x ** 2).sum(0)) / (n * (n - 1)))
    return torch.stack(rows).float()


def zscores(scores: torch.Tensor) -> torch.Tensor:
    """``(languages, neurons)`` standard scores across languages (population std, Eq. 12-14);
    neurons whose scores agree in every language (to 1e-9 relative) get 0."""
    scores = scores.double()
    mu = scores.mean(0, keepdim=True)
    sd = scores.std(0, unbiased=False, keepdim=True)
    # A spread at rounding level is no spread: z of float noise would be arbitrary.
    flat = sd <= 1e-9 * scores.abs().amax(0, keepdim=True)
    z = (scores - mu) / sd.clamp(min=1e-300)
    return torch.where(flat, torch.zeros_like(z), z).float()


@dataclass
class KeyNeurons:
    """Result of the z-score selection.

    Attributes:
        masks: ``lang -> (layers, neurons)`` bool key-neuron masks.
        z: ``(languages, layers, neurons)`` z-scores.
        threshold: the z threshold used.
    """

    masks: dict[str, torch.Tensor]
    z: torch.Tensor
    threshold: float

    @property
    def sizes(self) -> dict[str, int]:
        return {l: int(m.sum()) for l, m in self.masks.items()}

    @property
    def sklr(self) -> int:
        """Size of Key Linguistic Regions: sum over languages of key-region sizes."""
        return sum(self.sizes.values())

    def layer_distribution(self) -> dict[str, list[int]]:
        """``lang -> key neurons per layer``."""
        return {l: m.sum(1).tolist() for l, m in self.masks.items()}


def key_neurons(acts: Activations, threshold: float = 2.0) -> KeyNeurons:
    """Paper 2's key linguistic regions: neurons whose contribution z-score for a language
    exceeds ``threshold``."""
    if not math.isfinite(threshold):
        raise RegionsError(f"z threshold must be a finite number, got {threshold}")
    if len(acts.languages) < 2:
        raise RegionsError("key neurons need >= 2 languages (z-scores are across languages)")
    n_l, n_k = acts.mean.shape[1], acts.mean.shape[2]
    z = zscores(contribution_scores(acts)).reshape(len(acts.languages), n_l, n_k)
    masks = {l: z[i] > threshold for i, l in enumerate(acts.languages)}
    return KeyNeurons(masks, z, float(threshold))


def random_like(masks: Mapping[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random baseline: for each set, as many random neurons *in each layer* as it has
    (same size and same layer distribution), seeded."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in masks.items():
        r = torch.zeros_like(m, dtype=torch.bool)
        for layer in range(m.shape[0]):
            k = int(m[layer].sum())
            if k:
                r[layer, torch.randperm(m.shape[1], generator=g)[:k]] = True
        out[name] = r
    return out


def lape(acts: Activations, top_rate: float = 0.01, filter_rate: float = 0.95,
         activation_bar_ratio: float = 0.95) -> dict[str, torch.Tensor]:
    """LAPE language-specific neurons (Tang et al., 2024): ``lang -> (layers, neurons)`` bool.

    p(l, k) = fraction of language l's tokens where neuron k is > 0 (token-weighted over the
    samples). Neurons never above the ``filter_rate`` quantile of all p are dropped; of the
    rest, the ``top_rate`` share with the lowest entropy of p(·, k)/Σ_l p(l, k) is kept, and
    each kept neuron belongs to every language where p exceeds the ``activation_bar_ratio``
    quantile.
    """
    if acts.active is None:
        raise RegionsError("LAPE needs activation probabilities: capture with active=True")
    for name, v in (("top_rate", top_rate), ("filter_rate", filter_rate),
                    ("activation_bar_ratio", activation_bar_ratio)):
        if not 0.0 < v < 1.0:
            raise RegionsError(f"{name} must be in (0, 1), got {v}")
    n_l, n_k = acts.active.shape[1], acts.active.shape[2]
    w = acts.tokens.double()
    probs = []
    for lang in acts.languages:
        sel = torch.tensor([i for i, l in enumerate(acts.langs) if l == lang])
        probs.append((acts.active[sel].double() * w[sel, None, None]).sum(0) / w[sel].sum())
    p = torch.stack(probs).reshape(len(acts.languages), -1)  # (languages, neurons)
    dist = p / p.sum(0, keepdim=True).clamp(min=1e-30)
    entropy = -(dist * torch.log(dist.clamp(min=1e-30))).sum(0)
    flat = p.flatten()
    top_prob = torch.quantile(flat.float(), filter_rate).double()
    entropy[~(p > top_prob).any(0)] = math.inf
    k = max(1, round(top_rate * p.shape[1]))
    k = min(k, int(torch.isfinite(entropy).sum()))
    chosen = torch.topk(entropy, k, largest=False).indices
    bar = torch.quantile(flat.float(), activation_bar_ratio).double()
    out = {}
    for i, lang in enumerate(acts.languages):
        m = torch.zeros(p.shape[1], dtype=torch.bool)
        m[chosen[p[i, chosen] > bar]] = True
        out[lang] = m.reshape(n_l, n_k)
    return out


def neuron_set(masks: Mapping[str, torch.Tensor], acts: Activations, model: nn.Module,
               method: str, threshold: float | None, info: dict[str, Any] | None = None
               ) -> NeuronSet:
    """A :class:`NeuronSet` over ``model`` from masks; each neuron's stored mean is its mean
    activation over *all* samples (the language-neutral value the ``mean`` mode writes)."""
    mean_all = acts.mean.mean(0)
    return NeuronSet.from_masks(masks, model, means={s: mean_all for s in masks}, method=method,
                                threshold=threshold, info=info)


# ---- deactivation table (paper 2 Table 1) -----------------------------------------------------

PplFn = Callable[[str | None, str], float]
"""``ppl(set_name or None, lang) -> perplexity``: None = the unmodified model."""


def direct_ppl(model: nn.Module, tokenizer, neurons: NeuronSet, texts: Mapping[str, list[str]],
               mode: str = "zero", max_length: int = 128) -> PplFn:
    """Perplexity with :func:`lmeval_regions.perplexity.perplexity` under
    :meth:`NeuronSet.intervene`."""

    def ppl(set_name: str | None, lang: str) -> float:
        if set_name is None:
            return perplexity(model, tokenizer, texts[lang], max_length)["ppl"]
        with neurons.intervene(model, set_name, mode):
            return perplexity(model, tokenizer, texts[lang], max_length)["ppl"]

    return ppl


def deactivation_table(ppl: PplFn, rows: list[str], langs: list[str]) -> dict[str, Any]:
    """Paper 2 Table 1: ``rows`` = deactivated sets, columns = evaluated ``langs``.

    Returns ``base`` (lang -> ppl), ``ppl`` and ``change`` (row -> lang -> relative increase,
    e.g. 0.12 = +12%), and a ``summary``: for rows that are languages also evaluated, whether
    the diagonal increase exceeds the mean off-diagonal increase of that row.
    """
    base = {l: ppl(None, l) for l in langs}
    table = {r: {l: ppl(r, l) for l in langs} for r in rows}
    change = {r: {l: table[r][l] / base[l] - 1.0 for l in langs} for r in rows}
    per_row = {}
    for r in rows:
        if r not in langs or len(langs) < 2:
            continue
        off = [change[r][l] for l in langs if l != r]
        per_row[r] = {"diagonal": change[r][r], "mean_off_diagonal": sum(off) / len(off),
                      "diagonal_exceeds": change[r][r] > sum(off) / len(off)}
    summary = {"rows_compared": len(per_row),
               "diagonal_exceeds_count": sum(v["diagonal_exceeds"] for v in per_row.values()),
               "per_row": per_row}
    return {"base": base, "ppl": table, "change": change, "summary": summary}


__all__ = ["similarity", "vectors", "pair_masks", "lrds_sads", "layerwise",
           "language_block_means", "contribution_scores", "zscores", "KeyNeurons",
           "key_neurons", "random_like", "lape", "neuron_set", "direct_ppl",
           "deactivation_table", "NeuronHooks"]
