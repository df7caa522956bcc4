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
  language's samples of ``(â_ik + eps)(â_jk + eps)`` (â normalised), i.e. k's share of the
  language's mean within-language cosine; ``eps`` = 1e-5 as paper 2's release
  (``hs / ‖hs‖ + 10e-6``), 0 for Eq. 10-11 exactly.
* **z-scores** across languages (Eq. 12-14, population std); **key neurons** of l: z > threshold
  (default 2), or the top ``percentile`` share of l's z-scores (the release's ``threshold < 1``
  mode). **SKLR**: the sum over languages of their key-region sizes.
* **LAPE** (Tang et al., 2024): activation probability p(l, k) of each neuron per language;
  neurons whose normalised distribution over languages has the lowest entropy (bottom
  ``top_rate``), among those with a high probability somewhere, are assigned to the languages
  where p exceeds the ``activation_bar_ratio`` quantile. Quantiles come from two order
  statistics (:func:`quantile`), so there is no size limit (``torch.quantile`` refuses more
  than 2^24 values; 70B x 30 languages is 69M).

:class:`NeuronAnalysisConfig` holds every option of both selections. Both return masks that
:func:`neuron_set` turns into a :class:`~lmeval_regions.neurons.sets.NeuronSet`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from lmeval_regions.activations import Activations
from lmeval_regions.errors import RegionsError
from lmeval_regions.neurons.sets import NeuronHooks, NeuronSet
from lmeval_regions.perplexity import perplexity

ZSCORE_EPS = 1e-5
"""Paper 2's release adds ``10e-6`` (= 1e-5) to every normalised activation before the
contributions (``run.py``: ``hs / np.linalg.norm(hs, ...) + 10e-6``)."""


@dataclass
class NeuronAnalysisConfig:
    """How key neurons (paper 2, z-scores) and LAPE neurons (Tang et al., 2024) are chosen."""

    threshold: float = 2.0
    """z-score above which a neuron is a key neuron of a language (paper 2: 2)."""
    percentile: float | None = None
    """Instead of ``threshold``: the share (0-1) of each language's neurons with the highest
    z-scores, e.g. 0.01 (paper 2's release, its ``threshold < 1`` mode)."""
    eps: float = ZSCORE_EPS
    """Added to every entry of the L2-normalised activation vectors before the contributions
    (paper 2's release: 1e-5); 0 computes Eq. 10-11 exactly."""
    seed: int = 0
    """Seed of the equal-size random baseline sets."""
    top_rate: float = 0.01
    """LAPE: share of all neurons kept, those of lowest entropy over languages (release: 0.01)."""
    filter_rate: float = 0.95
    """LAPE: a neuron is considered only if its activation probability exceeds this quantile of
    all probabilities in some language (release: 0.95)."""
    activation_bar_ratio: float = 0.95
    """LAPE: a kept neuron belongs to each language where its probability exceeds this quantile
    of all probabilities (release: 0.95)."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise RegionsError(f"z threshold must be a finite number, got {self.threshold}")
        if self.percentile is not None and not 0.0 < self.percentile < 1.0:
            raise RegionsError(f"percentile must be a share in (0, 1), e.g. 0.01 for the top "
                               f"1%, got {self.percentile}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise RegionsError(f"eps must be a finite number >= 0, got {self.eps}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise RegionsError(f"seed must be an integer >= 0, got {self.seed}")
        for name in ("top_rate", "filter_rate", "activation_bar_ratio"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise RegionsError(f"{name} must be in (0, 1), got {v}")


def _config(config: "NeuronAnalysisConfig | None") -> NeuronAnalysisConfig:
    if config is None:
        return NeuronAnalysisConfig()
    if not isinstance(config, NeuronAnalysisConfig):
        raise RegionsError(f"expected a NeuronAnalysisConfig (e.g. NeuronAnalysisConfig("
                           f"threshold=2.0)), got {config!r}")
    return config


# ---- quantiles without a size limit ------------------------------------------------------------

def quantile(x: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of all values of ``x`` with linear interpolation, as
    ``torch.quantile(x.double().flatten(), q)`` (bit-equal), but with no size limit.

    The two order statistics around rank ``q * (n - 1)``: the lower from ``kthvalue`` (a
    selection, not a sort), the next one as the lower again if it repeats past that rank, else
    the smallest larger value; interpolated in float64. Memory: one copy of ``x``.
    """
    if not 0.0 <= q <= 1.0:
        raise RegionsError(f"quantile q must be in [0, 1], got {q}")
    flat = x.reshape(-1)
    if not flat.is_floating_point():
        flat = flat.double()
    n = flat.numel()
    if n == 0:
        raise RegionsError("quantile of an empty tensor")
    if bool(flat.isnan().any()):
        raise RegionsError("quantile of values containing NaN")
    rank = torch.tensor(q, dtype=torch.float64) * (n - 1)
    lo = int(rank.floor())
    hi = int(rank.ceil())
    v_lo = flat.kthvalue(lo + 1).values
    if hi == lo or int((flat <= v_lo).sum()) > hi:
        v_hi = v_lo
    else:
        v_hi = flat.masked_fill(flat <= v_lo, math.inf).min()
    return float(torch.lerp(v_lo.double(), v_hi.double(), rank - lo))


def _above(x: torch.Tensor, t: float, chunk: int = 1 << 22) -> torch.Tensor:
    """``x > t`` compared in float64 (a float32 comparison would round ``t``), in chunks of the
    last dimension so no float64 copy of a large ``x`` is made."""
    parts = [c.double() > t for c in x.split(chunk, dim=-1)]
    return torch.cat(parts, dim=-1)


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

def contribution_scores(acts: Activations, eps: float = ZSCORE_EPS) -> torch.Tensor:
    """``(languages, layers*neurons)`` contribution of each neuron to each language's mean
    pairwise cosine (Eq. 10-11): mean over pairs i<j of ``(â_ik + eps)(â_jk + eps)``, â the
    sample's L2-normalised vector over all layers (``eps`` as paper 2's release; 0 = Eq. 11)."""
    v = vectors(acts) + eps
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
        threshold: the z threshold (when selecting by threshold).
        percentile: the top share per language (when selecting by percentile), else None.
        cutoffs: ``lang -> z`` above which that language's neurons were taken (the threshold,
            or the language's ``1 - percentile`` quantile of z).
    """

    masks: dict[str, torch.Tensor]
    z: torch.Tensor
    threshold: float
    percentile: float | None = None
    cutoffs: dict[str, float] | None = None

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


def key_neurons(acts: Activations, config: NeuronAnalysisConfig | None = None) -> KeyNeurons:
    """Paper 2's key linguistic regions: neurons whose contribution z-score for a language
    exceeds ``config.threshold`` or, with ``config.percentile``, is above that language's
    ``1 - percentile`` quantile of z (strictly, as the release)."""
    config = _config(config)
    if len(acts.languages) < 2:
        raise RegionsError("key neurons need >= 2 languages (z-scores are across languages)")
    n_l, n_k = acts.mean.shape[1], acts.mean.shape[2]
    z = zscores(contribution_scores(acts, config.eps)).reshape(len(acts.languages), n_l, n_k)
    if config.percentile is None:
        cutoffs = {l: float(config.threshold) for l in acts.languages}
    else:
        cutoffs = {l: quantile(z[i], 1.0 - config.percentile)
                   for i, l in enumerate(acts.languages)}
    masks = {l: _above(z[i], cutoffs[l]) for i, l in enumerate(acts.languages)}
    return KeyNeurons(masks, z, float(config.threshold), config.percentile, cutoffs)


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


def lape_neurons(probs: torch.Tensor, languages: Iterable[str],
                 config: NeuronAnalysisConfig | None = None, chunk: int = 1 << 18
                 ) -> dict[str, torch.Tensor]:
    """LAPE language-specific neurons (Tang et al., 2024) from activation probabilities.

    Args:
        probs: ``(languages, layers, neurons)`` p(l, k), the share of language l's tokens where
            neuron k is active (:meth:`Activations.probabilities`,
            :func:`~lmeval_regions.activations.activation_probabilities`).
        languages: the language of each row.
        config: ``top_rate``, ``filter_rate``, ``activation_bar_ratio``.
        chunk: neurons per step of the entropy pass (bounds its float64 temporaries).

    Returns ``lang -> (layers, neurons)`` bool. Neurons never above the ``filter_rate``
    quantile of all p are dropped; of the rest, the ``top_rate`` share (of all neurons) with
    the lowest entropy of p(·, k)/Σ_l p(l, k) is kept, and each kept neuron belongs to every
    language where p exceeds the ``activation_bar_ratio`` quantile. Memory: ``probs``, one
    copy of it inside :func:`quantile`, 8 bytes per neuron (entropy) and the output masks
    (1 byte per neuron and language): about 0.6 GB for 80 layers x 28672 neurons x 30
    languages in fp32.
    """
    config = _config(config)
    languages = list(languages)
    if probs.dim() != 3 or probs.shape[0] != len(languages):
        raise RegionsError(f"probs must be (languages, layers, neurons) with one row per "
                           f"language; got {tuple(probs.shape)} for {len(languages)} languages")
    n_l, n_k = probs.shape[1], probs.shape[2]
    p = probs.reshape(len(languages), -1)  # (languages, neurons), a view
    n = p.shape[1]
    top_prob = quantile(p, config.filter_rate)
    entropy = torch.empty(n, dtype=torch.float64)
    for a in range(0, n, chunk):
        c = p[:, a:a + chunk].double()
        dist = c / c.sum(0, keepdim=True).clamp(min=1e-30)
        e = -(dist * torch.log(dist.clamp(min=1e-30))).sum(0)
        # neurons with no probability above the filter quantile in any language are out
        e[~(c > top_prob).any(0)] = math.inf
        entropy[a:a + chunk] = e
    k = max(1, round(config.top_rate * n))
    k = min(k, int(torch.isfinite(entropy).sum()))
    chosen = torch.topk(entropy, k, largest=False).indices
    bar = top_prob if config.activation_bar_ratio == config.filter_rate else \
        quantile(p, config.activation_bar_ratio)
    out = {}
    for i, lang in enumerate(languages):
        m = torch.zeros(n, dtype=torch.bool)
        m[chosen[_above(p[i, chosen], bar)]] = True
        out[lang] = m.reshape(n_l, n_k)
    return out


def lape(acts: Activations, config: NeuronAnalysisConfig | None = None
         ) -> dict[str, torch.Tensor]:
    """:func:`lape_neurons` of in-memory activations (``lang -> (layers, neurons)`` bool);
    p(l, k) is token-weighted over the language's samples, at ``acts.active_site``."""
    return lape_neurons(acts.probabilities(), acts.languages, config)


def neuron_set(masks: Mapping[str, torch.Tensor], acts: Activations, model: nn.Module,
               method: str, threshold: float | None, info: dict[str, Any] | None = None,
               selected_at: Mapping[str, str] | None = None) -> NeuronSet:
    """A :class:`NeuronSet` over ``model`` from masks; each neuron's stored mean is its mean
    activation over *all* samples (the language-neutral value the ``mean`` mode writes).
    ``selected_at``: ``set -> site`` of the statistic that chose it (see :class:`NeuronSet`)."""
    mean_all = acts.mean.mean(0)
    return NeuronSet.from_masks(masks, model, means={s: mean_all for s in masks}, method=method,
                                threshold=threshold, info=info, selected_at=selected_at)


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


__all__ = ["ZSCORE_EPS", "NeuronAnalysisConfig", "quantile", "similarity", "vectors",
           "pair_masks", "lrds_sads", "layerwise", "language_block_means",
           "contribution_scores", "zscores", "KeyNeurons", "key_neurons", "random_like", "lape",
           "lape_neurons", "neuron_set", "direct_ppl", "deactivation_table", "NeuronHooks"]
