"""The dimensional-dependence study on one model (paper 1 §3.3, Appendices C-E), as a report.

importance -> Top region -> structured-removal table (4 settings x Top/Middle/Bottom/Random x
N_d), outlier dimensions and the with/without-outlier ablation, single-dimension sweep,
single-parameter table, generations under perturbation, region heatmaps; written as
``report.md``, ``report.json`` and PNGs into a folder. Perplexity is the pooled direct token
perplexity (:mod:`lmeval_regions.perplexity`) on the held-out units.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lmeval_regions.artefacts import write_text_atomic
from lmeval_regions.corpora import CorpusConfig, HeldOutConfig
from lmeval_regions.dimensions import (
    PAPER_LABELS,
    SETTINGS,
    OutlierConfig,
    dimension_sweep,
    find_outliers,
    generations,
    hidden_dim_ranking,
    hidden_dims_region,
    perturbation_table,
    removal_table,
)
from lmeval_regions.errors import RegionsError
from lmeval_regions.importance import Importance, ImportanceConfig, compute_importance
from lmeval_regions.models import ModelConfig, find_module_map, load_model
from lmeval_regions.paper import DEFAULT_RATIO
from lmeval_regions.perplexity import make_evaluator
from lmeval_regions.regions import SelectionConfig, check_ratio, select_from_importance
from lmeval_regions.studies.region_plots import plot_distribution, plot_region_heatmaps, plot_sweep


@dataclass
class DimsReportConfig:
    """What the dimensional-dependence report computes and where it goes."""

    out: str
    """Report folder (report.md, report.json, PNGs, the region and, unless --importance is
    given, the importance it computes)."""
    importance: str | None = None
    """Importance artefact to reuse (default: OUT/importance.safetensors, computed over the
    corpus when missing)."""
    ratio: float = DEFAULT_RATIO
    """Size of the Top region per matrix whose dimensions are ranked."""
    n_dims: tuple[int, ...] = (1, 3, 5, 10)
    """Dimensions N_d removed per matrix per layer in the structured-removal table."""
    top_dims: int = 5
    """Hidden dimensions of the region's model-wide ranking swept one by one."""
    layer: int = 1
    """Layer of the single-parameter (input norm) perturbation table."""
    outlier_units: int = 2
    """Corpus units per language run to find massive-activation outlier dims."""
    max_px: int = 128
    """Largest side, in pixels, of each region density heatmap panel."""
    prompt: str = "Fudan University is located in"
    """Prompt of the generations under perturbation (paper 1 Appendix E)."""
    new_tokens: int = 16
    """Tokens generated per prompt."""

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        for name in ("top_dims", "outlier_units", "max_px", "new_tokens"):
            if getattr(self, name) < 1:
                raise RegionsError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if not self.n_dims or min(self.n_dims) < 1:
            raise RegionsError(f"--n-dims {self.n_dims} must list positive integers, e.g. 1,3,5,10")
        if self.layer < 0:
            raise RegionsError(f"--layer {self.layer} must be >= 0")


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def run_dims_report(model_cfg: ModelConfig, corpus: CorpusConfig, heldout: HeldOutConfig,
                    importance: ImportanceConfig, outliers: OutlierConfig,
                    cfg: DimsReportConfig,
                    selection: SelectionConfig | None = None) -> dict[str, Any]:
    """Run the whole study; return (and write) the report's numbers."""
    selection = selection or SelectionConfig()
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(f"[{time.time() - t0:6.0f}s] {m}", flush=True)  # noqa: E731
    torch.manual_seed(0)
    model, tok = load_model(model_cfg)
    mmap = find_module_map(model)
    langs = list(corpus.langs)
    imp_path = Path(cfg.importance) if cfg.importance else out / "importance.safetensors"
    if imp_path.exists():
        imp = Importance.load(imp_path, model)
        log(f"importance loaded from {imp_path}")
    else:
        streams = corpus.streams(tok)
        parts = [b for stream in streams.values() for b in stream]
        imp = compute_importance(model, parts, importance, languages=langs, progress=False,
                                 sources=[s.provenance for s in streams.values()])
        imp.save(imp_path)
        log(f"importance over {imp.n_sequences} sequences -> {imp_path}")
    region = select_from_importance(imp, "top", cfg.ratio, selection.scope, selection.seed,
                                    selection.fused)
    region.spec["model_name"] = model_cfg.model  # figure titles name the model
    region.save(out / "region_top.safetensors")
    figs = plot_region_heatmaps(region, mmap, out, max_px=cfg.max_px)
    figs.append(plot_distribution(region, out / "distribution.png"))
    log(f"region {region.numel()} entries; {len(figs)} figures")

    held_texts = heldout.texts(corpus)
    n_held = min(len(t) for t in held_texts.values())
    eval_span = [heldout.eval_start, heldout.eval_start + n_held - 1]
    evaluate = make_evaluator(model, tok, held_texts, corpus.max_length, corpus.batch_size)
    base = evaluate()
    log(f"base ppl {base['ppl']:.4g}")

    probe = replace(corpus, units=cfg.outlier_units, pack=False, tokens=None, samples=None)
    ob = [b for stream in probe.streams(tok).values() for b in stream]
    outl = find_outliers(model, ob, outliers, mmap)
    log(f"outlier dims {outl.dims}; norm outliers {[r['dim'] for r in outl.norm]}")

    n_dims = list(cfg.n_dims)
    table = removal_table(model, region, evaluate, n_dims=n_dims, mmap=mmap, progress=log)
    ablation = []
    if outl.dims:
        ablation = removal_table(model, region, evaluate, methods=["top"], n_dims=n_dims,
                                 protect_dims=outl.dims, mmap=mmap, progress=log)

    ranking = hidden_dim_ranking(region, model, mmap=mmap)
    top_dims = torch.sort(ranking, descending=True, stable=True).indices[:cfg.top_dims].tolist()
    rng = random.Random(0)
    rand_dims = rng.sample([d for d in range(mmap.hidden_size)
                            if d not in top_dims and d not in outl.dims], 2)
    cand = list(dict.fromkeys(outl.dims[:3] + top_dims + rand_dims))
    labels = {d: ("outlier" if d in outl.dims else "top" if d in top_dims else "random")
              for d in cand}
    sweep = dimension_sweep(model, cand, evaluate, "reinit", mmap=mmap, progress=log)
    figs.append(plot_sweep(sweep, out / "dim_sweep.png", labels=labels,
                           context=f"{model_cfg.model}; perplexity over units "
                                   f"{eval_span[0]}..{eval_span[1]} of {','.join(langs)}, "
                                   f"{corpus.max_length} tokens"))
    single_dims = list(dict.fromkeys(outl.dims[:2] + top_dims[:2] + rand_dims))
    single = perturbation_table(model, single_dims, evaluate, layer=cfg.layer, mmap=mmap)
    log("single-parameter table done")
    worst = max((r for r in sweep if r["dim"] is not None), key=lambda r: r["ppl"])["dim"]
    gens = generations(model, tok, cfg.prompt, {
        f"reinit dim {worst} (all layers)": [
            (hidden_dims_region(model, [worst], mmap=mmap), "reinit")],
        f"reinit dim {rand_dims[0]} (all layers)": [
            (hidden_dims_region(model, [rand_dims[0]], mmap=mmap), "reinit")],
    }, max_new_tokens=cfg.new_tokens)

    # Describe the importance as it was made (a reused file may differ from this run's flags).
    imp_langs = imp.languages or langs
    imp_desc = (f"{imp.n_sequences} sequences, {imp.n_tokens} tokens" if imp.n_sequences
                else f"units {corpus.skip}..{corpus.skip + corpus.units - 1}")
    doc = {"model": model_cfg.model, "langs": langs, "importance": {
               "file": str(imp_path), "languages": imp_langs, "n_sequences": imp.n_sequences,
               "n_tokens": imp.n_tokens, "criterion": imp.criterion},
           "eval_units": eval_span,
           "max_length": corpus.max_length, "ratio": cfg.ratio, "region_entries": region.numel(),
           "base": base, "outliers": outl.to_dict(), "removal": table,
           "ablation_wo_outliers": ablation,
           "top_hidden_dims": top_dims, "random_dims": rand_dims, "sweep": sweep,
           "single_parameter": single, "generations": gens, "figures": [p.name for p in figs],
           "seconds": round(time.time() - t0, 1)}
    write_text_atomic(out / "report.json", json.dumps(doc, indent=1, sort_keys=True))

    md = [f"# Dimensional dependence: {model_cfg.model}", "",
          f"Region: Top {cfg.ratio:g} per matrix of importance ({imp.criterion}) over "
          f"{', '.join(imp_langs)} ({imp_desc}); {region.numel()} entries. "
          "Perplexity: pooled token "
          f"PPL on units {eval_span[0]}..{eval_span[1]} of {', '.join(held_texts)}, "
          f"{corpus.max_length} tokens. Base PPL **{base['ppl']:.4g}**.", "",
          "## Structured removal (zero N_d dims per matrix per layer)", ""]
    for s in SETTINGS:
        md += [f"### {s}: {PAPER_LABELS[s]}", ""]
        rows = []
        for n in n_dims:
            r = {x["method"]: x["ppl"] for x in table if x["setting"] == s and x["n_dims"] == n}
            wo = [x["ppl"] for x in ablation if x["setting"] == s and x["n_dims"] == n]
            rows.append([n, r["top"], r["middle"], r["bottom"], r["random"], wo[0] if wo else "-"])
        md += [_md_table(["N_d", "Top", "Middle", "Bottom", "Random", "Top w/o outliers"], rows),
               ""]
    md += ["## Outlier dimensions", "",
           f"Massive activations (max |h| >= {outliers.ratio:g} x layer median): "
           + (", ".join(f"{r['dim']} (x{r['max_ratio']:.0f}, {len(r['layers'])} layers)"
                        for r in outl.massive) or "none"),
           "", "Norm-weight outliers (robust z >= 10): "
           + (", ".join(f"{r['dim']} (z {r['max_z']:.0f}, {len(r['norms'])} norms)"
                        for r in outl.norm[:10]) or "none"), "",
           "## Single-dimension sweep (re-init dim d in every layer)", "",
           _md_table(["dim", "kind", "PPL"], [[r["dim"] if r["dim"] is not None else "-",
                                              labels.get(r["dim"], "none"), r["ppl"]]
                                              for r in sweep]),
           "", "![sweep](dim_sweep.png)", "",
           f"## Single-parameter perturbation (layer {cfg.layer} input norm)", "",
           _md_table(["perturbation", "parameter", "PPL"],
                     [[r["perturbation"], r["parameter"], r["ppl"]] for r in single]), "",
           f"## Generation under perturbation: \"{cfg.prompt}\"", ""]
    md += [f"- **{k}**: {v!r}" for k, v in gens.items()]
    md += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figs]
    md += ["", f"_{time.time() - t0:.0f} s_"]
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")
    log(f"report -> {out / 'report.md'}")
    return doc
