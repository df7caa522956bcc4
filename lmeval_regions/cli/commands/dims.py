"""CLI: dimensional dependence (paper 1 §3.3, Appendices C–E).

``dims-report``  the whole study on one model: importance -> Top region -> structured removal
                 table (4 settings x Top/Middle/Bottom/Random x N_d), outliers and the
                 with/without-outlier ablation, single-dimension sweep, single-parameter table,
                 generations, heatmaps; writes ``report.md``, ``report.json`` and PNGs to a folder.
``dims``         the structured removal table for a given region file.
``outliers``     massive-activation and norm-weight outlier dims.
``plot-region``  density heatmaps and distribution bars of a region file.

Perplexity here is pooled token perplexity (:func:`corpora.perplexity`) on held-out UDHR units.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any, Callable

from lmeval_regions.artefacts import write_text_atomic
from lmeval_regions.errors import RegionsError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RegionsError(f"'{text}' is not a comma-separated list of integers") from None


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def make_evaluator(model, tok, texts: dict[str, list[str]], max_length: int, batch_size: int = 4
                   ) -> Callable[[], dict[str, Any]]:
    """A callable giving pooled and per-language perplexity of ``texts`` (``lang -> texts``)."""
    import math

    from lmeval_regions.perplexity import perplexity

    def evaluate() -> dict[str, Any]:
        per, nll, n = {}, 0.0, 0
        for lang, tx in texts.items():
            r = perplexity(model, tok, tx, max_length=max_length, batch_size=batch_size)
            per[lang] = r["ppl"]
            nll += r["nll"]
            n += r["tokens"]
        return {"ppl": math.exp(nll / n) if n else float("nan"), "ppl_per_lang": per}

    return evaluate


def _texts(langs, start, n):
    from lmeval_regions.corpora import load_parallel

    data = load_parallel(langs=langs)
    for l, units in data.items():
        if start + n > len(units):
            raise RegionsError(f"units {start}..{start + n - 1} exceed the {len(units)} of '{l}'")
    return {l: [u["text"] for u in units[start:start + n]] for l, units in data.items()}


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def run_report(args: argparse.Namespace) -> int:
    import torch

    from lmeval_regions.corpora import batches
    from lmeval_regions.dimensions import dimension_sweep, generations, perturbation_table
    from lmeval_regions.dimensions import PAPER_LABELS, SETTINGS, hidden_dim_ranking, hidden_dims_region, removal_table
    from lmeval_regions.importance import Importance, ImportanceConfig, compute_importance
    from lmeval_regions.models import load_model
    from lmeval_regions.models import find_module_map
    from lmeval_regions.dimensions import OutlierConfig, find_outliers
    from lmeval_regions.studies.region_plots import plot_distribution, plot_region_heatmaps, plot_sweep
    from lmeval_regions.regions import select_from_importance

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(f"[{time.time() - t0:6.0f}s] {m}", flush=True)  # noqa: E731
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    mmap = find_module_map(model)
    langs = _strs(args.langs)
    imp_path = Path(args.importance) if args.importance else out / "importance.safetensors"
    if imp_path.exists():
        imp = Importance.load(imp_path, model)
        log(f"importance loaded from {imp_path}")
    else:
        train = _texts(langs, 0, args.train_units)
        parts = [b for l in langs for b in batches(tok, train[l], args.batch_size, args.max_length)]
        imp = compute_importance(model, parts, ImportanceConfig(), languages=langs, progress=False)
        imp.save(imp_path)
        log(f"importance over {imp.n_sequences} sequences -> {imp_path}")
    region = select_from_importance(imp, "top", args.ratio, "matrix")
    region.save(out / "region_top.safetensors")
    figs = plot_region_heatmaps(region, mmap, out, max_px=args.max_px)
    figs.append(plot_distribution(region, out / "distribution.png"))
    log(f"region {region.numel()} entries; {len(figs)} figures")

    evaluate = make_evaluator(model, tok, _texts(langs, args.eval_start, args.eval_units),
                              args.max_length, args.batch_size)
    base = evaluate()
    log(f"base ppl {base['ppl']:.4g}")

    probe = _texts(langs, 0, args.outlier_units)
    ob = [b for l in langs for b in batches(tok, probe[l], args.batch_size, args.max_length)]
    outl = find_outliers(model, ob, OutlierConfig(ratio=args.outlier_ratio), mmap)
    log(f"outlier dims {outl.dims}; norm outliers {[r['dim'] for r in outl.norm]}")

    n_dims = _ints(args.n_dims)
    table = removal_table(model, region, evaluate, n_dims=n_dims, mmap=mmap, progress=log)
    ablation = []
    if outl.dims:
        ablation = removal_table(model, region, evaluate, methods=["top"], n_dims=n_dims,
                                 protect_dims=outl.dims, mmap=mmap, progress=log)

    ranking = hidden_dim_ranking(region, model, mmap=mmap)
    top_dims = torch.sort(ranking, descending=True, stable=True).indices[:args.top_dims].tolist()
    rng = random.Random(0)
    rand_dims = rng.sample([d for d in range(mmap.hidden_size)
                            if d not in top_dims and d not in outl.dims], 2)
    cand = list(dict.fromkeys(outl.dims[:3] + top_dims + rand_dims))
    labels = {d: ("outlier" if d in outl.dims else "top" if d in top_dims else "random")
              for d in cand}
    sweep = dimension_sweep(model, cand, evaluate, "reinit", mmap=mmap, progress=log)
    figs.append(plot_sweep(sweep, out / "dim_sweep.png", labels=labels))
    single_dims = list(dict.fromkeys(outl.dims[:2] + top_dims[:2] + rand_dims))
    single = perturbation_table(model, single_dims, evaluate, layer=args.layer, mmap=mmap)
    log("single-parameter table done")
    worst = max((r for r in sweep if r["dim"] is not None), key=lambda r: r["ppl"])["dim"]
    gens = generations(model, tok, args.prompt, {
        f"reinit dim {worst} (all layers)": [(hidden_dims_region(model, [worst], mmap=mmap), "reinit")],
        f"reinit dim {rand_dims[0]} (all layers)": [
            (hidden_dims_region(model, [rand_dims[0]], mmap=mmap), "reinit")],
    }, max_new_tokens=args.new_tokens)

    # Describe the importance as it was made (a reused file may differ from this run's flags).
    imp_langs = imp.languages or langs
    imp_desc = (f"{imp.n_sequences} sequences, {imp.n_tokens} tokens" if imp.n_sequences
                else f"units 0..{args.train_units - 1}")
    doc = {"model": args.model, "langs": langs, "importance": {
               "file": str(imp_path), "languages": imp_langs, "n_sequences": imp.n_sequences,
               "n_tokens": imp.n_tokens, "mode": imp.mode},
           "eval_units": [args.eval_start, args.eval_start + args.eval_units - 1],
           "max_length": args.max_length, "ratio": args.ratio, "region_entries": region.numel(),
           "base": base, "outliers": outl.to_dict(), "removal": table, "ablation_wo_outliers": ablation,
           "top_hidden_dims": top_dims, "random_dims": rand_dims, "sweep": sweep,
           "single_parameter": single, "generations": gens, "figures": [p.name for p in figs],
           "seconds": round(time.time() - t0, 1)}
    write_text_atomic(out / "report.json", json.dumps(doc, indent=1, sort_keys=True))

    md = [f"# Dimensional dependence: {args.model}", "",
          f"Region: Top {args.ratio:g} per matrix of |θ·∇L| ({imp.mode}) over "
          f"{', '.join(imp_langs)} ({imp_desc}); {region.numel()} entries. Perplexity: pooled token "
          f"PPL on units {args.eval_start}..{args.eval_start + args.eval_units - 1}, "
          f"{args.max_length} tokens. Base PPL **{base['ppl']:.4g}**.", "",
          "## Structured removal (zero N_d dims per matrix per layer)", ""]
    for s in SETTINGS:
        md += [f"### {s}: {PAPER_LABELS[s]}", ""]
        rows = []
        for n in n_dims:
            r = {x["method"]: x["ppl"] for x in table if x["setting"] == s and x["n_dims"] == n}
            wo = [x["ppl"] for x in ablation if x["setting"] == s and x["n_dims"] == n]
            rows.append([n, r["top"], r["middle"], r["bottom"], r["random"], wo[0] if wo else "-"])
        md += [_md_table(["N_d", "Top", "Middle", "Bottom", "Random", "Top w/o outliers"], rows), ""]
    md += ["## Outlier dimensions", "",
           f"Massive activations (max |h| >= {args.outlier_ratio:g} x layer median): "
           + (", ".join(f"{r['dim']} (x{r['max_ratio']:.0f}, {len(r['layers'])} layers)"
                        for r in outl.massive) or "none"),
           "", "Norm-weight outliers (robust z >= 10): "
           + (", ".join(f"{r['dim']} (z {r['max_z']:.0f}, {len(r['norms'])} norms)"
                        for r in outl.norm[:10]) or "none"), "",
           "## Single-dimension sweep (re-init dim d in every layer)", "",
           _md_table(["dim", "kind", "PPL"], [[r["dim"] if r["dim"] is not None else "-",
                                              labels.get(r["dim"], "none"), r["ppl"]] for r in sweep]),
           "", "![sweep](dim_sweep.png)", "",
           f"## Single-parameter perturbation (layer {args.layer} input norm)", "",
           _md_table(["perturbation", "parameter", "PPL"],
                     [[r["perturbation"], r["parameter"], r["ppl"]] for r in single]), "",
           f"## Generation under perturbation: \"{args.prompt}\"", ""]
    md += [f"- **{k}**: {v!r}" for k, v in gens.items()]
    md += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figs]
    md += ["", f"_{time.time() - t0:.0f} s_"]
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")
    log(f"report -> {out / 'report.md'}")
    return 0


def run_outliers(args: argparse.Namespace) -> int:
    from lmeval_regions.corpora import batches
    from lmeval_regions.models import load_model
    from lmeval_regions.dimensions import OutlierConfig, find_outliers

    model, tok = load_model(args.model)
    langs = _strs(args.langs)
    texts = _texts(langs, 0, args.units)
    bs = [b for l in langs for b in batches(tok, texts[l], 4, args.max_length)]
    rep = find_outliers(model, bs, OutlierConfig(ratio=args.ratio, norm_z=args.norm_z))
    text = json.dumps(rep.to_dict(), indent=1)
    if args.out:
        write_text_atomic(args.out, text)
    print(json.dumps({"dims": rep.dims, "norm_dims": [r["dim"] for r in rep.norm]}))
    return 0


def run_dims(args: argparse.Namespace) -> int:
    from lmeval_regions.dimensions import removal_table
    from lmeval_regions.models import load_model
    from lmeval_regions.regions import Region

    model, tok = load_model(args.model)
    region = Region.load(args.region, model)
    evaluate = make_evaluator(model, tok, _texts(_strs(args.langs), args.eval_start, args.eval_units),
                              args.max_length)
    rows = removal_table(model, region, evaluate, _strs(args.settings), _strs(args.methods),
                         _ints(args.n_dims), args.seed, _ints(args.protect) or None,
                         progress=print)
    write_text_atomic(args.out, json.dumps(rows, indent=1))
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from lmeval_regions.models import load_model
    from lmeval_regions.models import find_module_map
    from lmeval_regions.studies.region_plots import plot_distribution, plot_region_heatmaps
    from lmeval_regions.regions import Region

    model, _ = load_model(args.model)
    region = Region.load(args.region, model)
    paths = plot_region_heatmaps(region, find_module_map(model), args.out, max_px=args.max_px)
    paths.append(plot_distribution(region, Path(args.out) / "distribution.png"))
    print("\n".join(str(p) for p in paths))
    return 0


def _common(p: argparse.ArgumentParser, langs: str = "ar,es,ru,zh,ko,vi") -> None:
    p.add_argument("--model", default="gemma-3-270m", help="embedded name or local folder")
    p.add_argument("--langs", default=langs, help="UDHR languages, comma-separated")
    p.add_argument("--max-length", type=int, default=128, help="tokens per unit")


def register(sub) -> None:
    p = sub.add_parser("dims-report", help="full dimensional-dependence study -> report folder")
    _common(p)
    p.add_argument("--out", required=True, help="report folder (md, json, png)")
    p.add_argument("--importance", help="importance artefact to reuse (default: OUT/importance."
                                        "safetensors, computed when missing)")
    p.add_argument("--train-units", type=int, default=10)
    p.add_argument("--eval-start", type=int, default=25)
    p.add_argument("--eval-units", type=int, default=2)
    p.add_argument("--outlier-units", type=int, default=2)
    p.add_argument("--outlier-ratio", type=float, default=100.0)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--n-dims", default="1,3,5,10")
    p.add_argument("--top-dims", type=int, default=5)
    p.add_argument("--layer", type=int, default=1, help="layer of the single-parameter table")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-px", type=int, default=128)
    p.add_argument("--prompt", default="Fudan University is located in")
    p.add_argument("--new-tokens", type=int, default=16)
    p.set_defaults(func=run_report)

    p = sub.add_parser("dims", help="structured removal table of a region file")
    _common(p)
    p.add_argument("region")
    p.add_argument("--out", required=True, help="JSON file")
    p.add_argument("--settings", default="attn_heads+ffn_down,attn_heads,attn_hidden,ffn_hidden")
    p.add_argument("--methods", default="top,middle,bottom,random")
    p.add_argument("--n-dims", default="1,3,5,10")
    p.add_argument("--protect", default="", help="hidden dims to leave untouched (w/o outliers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-start", type=int, default=25)
    p.add_argument("--eval-units", type=int, default=2)
    p.set_defaults(func=run_dims)

    p = sub.add_parser("outliers", help="massive-activation and norm-weight outlier dims")
    _common(p)
    p.add_argument("--units", type=int, default=2)
    p.add_argument("--ratio", type=float, default=100.0)
    p.add_argument("--norm-z", type=float, default=10.0)
    p.add_argument("--out", help="JSON file")
    p.set_defaults(func=run_outliers)

    p = sub.add_parser("plot-region", help="region density heatmaps and distribution (PNG)")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("region")
    p.add_argument("--out", required=True, help="folder")
    p.add_argument("--max-px", type=int, default=128)
    p.set_defaults(func=run_plot)
