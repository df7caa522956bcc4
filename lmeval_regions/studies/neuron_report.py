"""Paper 2's analysis as files: plots, Markdown + JSON report, and sweeps over models.

:func:`analyse` turns an activation artefact into the metrics (similarity, LRDS/SADS whole
model and per layer, key neurons, SKLR, layer distribution, LAPE) and the neuron sets;
:func:`write_report` writes ``similarity.png``, ``layerwise.png``, ``key_layers.png``,
``neurons.json`` and ``README.md``; :func:`sweep` runs the same metrics over several models or
revisions and writes one table.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from lmeval_regions import neurons as N
from lmeval_regions.activations import SITE, Activations, capture
from lmeval_regions.artefacts import write_text_atomic
from lmeval_regions.models import load_model
from lmeval_regions.neurons import NeuronSet
from lmeval_regions.studies.plotting import MIN_FONT, save_figure, subplots
from lmeval_regions.studies.plotting import title as fig_title


def analyse(acts: Activations, model: nn.Module, config: N.NeuronAnalysisConfig | None = None
            ) -> tuple[dict[str, Any], NeuronSet]:
    """Metrics of one activation capture, and a :class:`NeuronSet` holding for every
    language its z-score key neurons (``{lang}``), an equal-size random baseline
    (``random-{lang}``, same count per layer) and LAPE's neurons (``lape-{lang}``, when the
    capture has activation probabilities). ``config``: thresholds, eps, LAPE rates, seed."""
    config = N.NeuronAnalysisConfig() if config is None else config
    sim = N.similarity(acts)
    whole = N.lrds_sads(sim, acts.langs, acts.ids)
    per_layer = N.layerwise(acts)
    key = N.key_neurons(acts, config)
    masks = dict(key.masks)
    masks |= {f"random-{l}": m for l, m in N.random_like(key.masks, config.seed).items()}
    lape_masks = N.lape(acts, config) if acts.active is not None else {}
    masks |= {f"lape-{l}": m for l, m in lape_masks.items()}
    selected_at = {l: SITE for l in key.masks}
    selected_at |= {f"lape-{l}": acts.active_site or "unknown" for l in lape_masks}
    info = {"languages": acts.languages, "config": asdict(config),
            "lape_site": acts.active_site if lape_masks else None,
            "sets": "lang = z-score key neurons; random-lang = same size per layer; "
                    "lape-lang = LAPE (Tang et al. 2024)"}
    ns = N.neuron_set(masks, acts, model, method="zscore",
                      threshold=None if config.percentile is not None else config.threshold,
                      info=info, selected_at=selected_at)
    n_total = acts.mean.shape[1] * acts.mean.shape[2]
    result = {
        "languages": acts.languages,
        "samples_per_language": {l: acts.langs.count(l) for l in acts.languages},
        "layers": acts.mean.shape[1], "neurons_per_layer": acts.mean.shape[2],
        "lrds": whole["lrds"], "sads": whole["sads"], "similarity_groups": whole,
        "layerwise": per_layer,
        "config": asdict(config),
        "threshold": config.threshold, "percentile": config.percentile,
        "z_cutoffs": key.cutoffs,
        "key_neurons": key.sizes,
        "key_share": {l: s / n_total for l, s in key.sizes.items()},
        "sklr": key.sklr,
        "key_layer_distribution": key.layer_distribution(),
        "lape_site": acts.active_site if lape_masks else None,
        "lape_neurons": {l: int(m.sum()) for l, m in lape_masks.items()},
        "lape_layer_distribution": {l: m.sum(1).tolist() for l, m in lape_masks.items()},
        "key_lape_overlap": {l: _jaccard(key.masks[l], lape_masks[l]) for l in lape_masks},
    }
    return result, ns


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    u = int((a | b).sum())
    return int((a & b).sum()) / u if u else float("nan")


# ---- plots ------------------------------------------------------------------------------------

def plot_similarity(sim: torch.Tensor, langs: list[str], path: str | Path, title: str = "",
                    context: str = "") -> None:
    """Heatmap of a ``(samples, samples)`` similarity map with language blocks outlined;
    ``context`` (model and settings) under the title."""
    path = Path(path)
    languages = list(dict.fromkeys(langs))
    fig, ax = subplots(figsize=(9, 8.5))
    im = ax.imshow(sim.numpy(), cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    edges, centers, start = [], [], 0
    for l in languages:
        n = langs.count(l)
        centers.append(start + n / 2 - 0.5)
        start += n
        edges.append(start - 0.5)
    for e in edges[:-1]:
        ax.axhline(e, color="white", lw=0.4)
        ax.axvline(e, color="white", lw=0.4)
    ax.set_xticks(centers, languages, fontsize=MIN_FONT, rotation=90)
    ax.set_yticks(centers, languages, fontsize=MIN_FONT)
    ax.set_xlabel("sample (grouped by language)")
    ax.set_ylabel("sample (grouped by language)")
    fig_title(fig, title or "Neuron activation similarity (samples grouped by language)",
              context)
    save_figure(fig, path)


def plot_layerwise(per_layer: list[dict[str, float]], path: str | Path, context: str = "") -> None:
    """LRDS and SADS of each layer's similarity map."""
    fig, ax = subplots(figsize=(7, 4.2))
    xs = [p["layer"] for p in per_layer]
    ax.plot(xs, [p["lrds"] for p in per_layer], "o-", label="LRDS")
    ax.plot(xs, [p["sads"] for p in per_layer], "s-", label="SADS")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("score (mean cosine difference)")
    ax.legend()
    fig_title(fig, "Layer-wise LRDS / SADS", context)
    save_figure(fig, path)


def plot_layer_distribution(dist: Mapping[str, list[int]], path: str | Path,
                            context: str = "") -> None:
    """Key neurons per layer, one row per language (heatmap) plus the total (line)."""
    langs = list(dist)
    mat = torch.tensor([dist[l] for l in langs], dtype=torch.float32)
    fig, (a1, a2) = subplots(2, 1, figsize=(8, 3.5 + 0.2 * len(langs)),
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    im = a1.imshow(mat.numpy(), aspect="auto", cmap="Reds", interpolation="nearest")
    a1.set_yticks(range(len(langs)), langs, fontsize=MIN_FONT)
    a1.set_ylabel("language")
    fig.colorbar(im, ax=a1, label="key neurons")
    a2.plot(range(mat.shape[1]), mat.sum(0).numpy(), "o-")
    a2.set_xlabel("layer")
    a2.set_ylabel("all languages")
    fig_title(fig, "Layer distribution of key neurons", context)
    save_figure(fig, path)


def report_context(result: Mapping[str, Any], model: str = "") -> str:
    """The model and settings of an analysis, for figure titles."""
    langs = result.get("languages") or []
    samples = sorted(set((result.get("samples_per_language") or {}).values()))
    bits = [model] if model else []
    bits += [f"{len(langs)} languages", f"{'/'.join(map(str, samples))} samples per language",
             f"{result.get('layers', '?')} layers x {result.get('neurons_per_layer', '?')} "
             f"neurons", f"key neurons: {_rule(result)}"]
    return "; ".join(bits)


# ---- report -----------------------------------------------------------------------------------

def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _rule(result: Mapping[str, Any]) -> str:
    if result.get("percentile") is not None:
        return f"top {100 * result['percentile']:g}% of each language's z-scores"
    return f"z > {result['threshold']:g}"


def write_report(out: str | Path, result: Mapping[str, Any], acts: Activations | None = None,
                 table: Mapping[str, Any] | None = None, model: str = "") -> Path:
    """Write plots (when ``acts`` given), ``neurons.json`` and ``README.md`` into ``out``;
    ``model`` (its name) goes into the figure titles."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = dict(result)
    if table is not None:
        doc["deactivation"] = table
    if acts is not None:
        context = report_context(result, model)
        plot_similarity(N.similarity(acts), acts.langs, out / "similarity.png", context=context)
        plot_layerwise(result["layerwise"], out / "layerwise.png", context)
        plot_layer_distribution(result["key_layer_distribution"], out / "key_layers.png",
                                context)
    write_text_atomic(out / "neurons.json", json.dumps(doc, indent=1, sort_keys=True))
    md = ["# Neuron analysis (paper 2)", "",
          f"Languages ({len(result['languages'])}): {', '.join(result['languages'])}; "
          f"samples per language: {sorted(set(result['samples_per_language'].values()))}; "
          f"{result['layers']} layers x {result['neurons_per_layer']} neurons.", "",
          f"- LRDS = **{_fmt(result['lrds'])}**, SADS = **{_fmt(result['sads'])}**",
          f"- key neurons ({_rule(result)}): SKLR = {result['sklr']}",
          f"- LAPE active site: {result.get('lape_site') or '-'}", ""]
    if acts is not None:
        md += ["![similarity](similarity.png)", "", "![layerwise](layerwise.png)", "",
               "![key layers](key_layers.png)", ""]
    md += ["| layer | LRDS | SADS |", "|---|---|---|"]
    md += [f"| {p['layer']} | {_fmt(p['lrds'])} | {_fmt(p['sads'])} |" for p in result["layerwise"]]
    md += ["", "| language | key neurons | LAPE neurons | Jaccard(key, LAPE) |",
           "|---|---|---|---|"]
    for l in result["languages"]:
        md.append(f"| {l} | {result['key_neurons'][l]} | {result['lape_neurons'].get(l, '-')} | "
                  f"{_fmt(result['key_lape_overlap'].get(l, float('nan')))} |")
    if table is not None:
        md += ["", "## Deactivation (perplexity change, %)", "",
               "Rows: deactivated set; columns: evaluated language.", ""]
        cols = list(table["base"])
        md.append("| deactivated | " + " | ".join(cols) + " |")
        md.append("|---" * (len(cols) + 1) + "|")
        md.append("| (none: ppl) | " + " | ".join(f"{table['base'][c]:.2f}" for c in cols) + " |")
        for r, row in table["change"].items():
            md.append(f"| {r} | " + " | ".join(f"{100 * row[c]:+.1f}" for c in cols) + " |")
        s = table["summary"]
        md += ["", f"Diagonal increase exceeds the row's mean off-diagonal increase for "
                   f"**{s['diagonal_exceeds_count']} of {s['rows_compared']}** languages."]
    write_text_atomic(out / "README.md", "\n".join(md) + "\n")
    return out


# ---- sweeps -----------------------------------------------------------------------------------

def sweep(models: list[str], corpus: Mapping[str, list[dict]], out: str | Path,
          load: Callable[[str], tuple[nn.Module, Any]] | None = None,
          analysis: N.NeuronAnalysisConfig | None = None, config=None) -> list[dict[str, Any]]:
    """LRDS, SADS, SKLR and key-neuron share for each model (name, folder or revision spec
    accepted by ``load``), captured on the same ``corpus`` with ``config``
    (:class:`~lmeval_regions.activations.ActivationConfig`); key neurons by ``analysis``.
    Writes ``sweep.json`` and ``sweep.md`` into ``out`` and each capture as
    ``activations-<i>.safetensors``."""
    load = load or load_model
    out = Path(out)
    rows = []
    for i, name in enumerate(models):
        model, tok = load(name)
        path = out / f"activations-{i}.safetensors"
        capture(model, tok, corpus, path, config)
        acts = Activations.load(path)
        key = N.key_neurons(acts, analysis)
        r = N.lrds_sads(N.similarity(acts), acts.langs, acts.ids)
        n_total = acts.mean.shape[1] * acts.mean.shape[2]
        rows.append({"model": name, "lrds": r["lrds"], "sads": r["sads"], "sklr": key.sklr,
                     "sklr_share": key.sklr / n_total, "layers": acts.mean.shape[1],
                     "neurons": n_total})
        del model
    write_text_atomic(out / "sweep.json", json.dumps(rows, indent=1))
    md = ["| model | LRDS | SADS | SKLR | SKLR share | layers |", "|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {_fmt(r['lrds'])} | {_fmt(r['sads'])} | {r['sklr']} | "
           f"{r['sklr_share']:.4f} | {r['layers']} |" for r in rows]
    write_text_atomic(out / "sweep.md", "\n".join(md) + "\n")
    return rows
