"""Subcommands of the dimensional-dependence study (paper 1 §3.3, Appendices C-E):
``dims-report`` (the whole study, :mod:`lmeval_regions.studies.dims_report`), ``dims`` (the
structured removal table of a region file), ``outliers`` and ``plot-region``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmeval_regions.artefacts import write_text_atomic
from lmeval_regions.cli.main import Command, Files
from lmeval_regions.cli.options import config_beside, config_inside
from lmeval_regions.corpora import CorpusConfig, HeldOutConfig
from lmeval_regions.dimensions import SETTINGS, OutlierConfig
from lmeval_regions.errors import RegionsError
from lmeval_regions.importance import ImportanceConfig
from lmeval_regions.models import ModelConfig
from lmeval_regions.regions import METHODS, SelectionConfig
from lmeval_regions.studies.dims_report import DimsReportConfig, run_dims_report

MODEL = ("model", ModelConfig)
CORPUS = ("corpus", CorpusConfig)
HELDOUT = ("heldout", HeldOutConfig)


def check_architecture(model: ModelConfig, needs: str = "projections") -> None:
    """Refuse, from the model's config alone (no weights: milliseconds), an architecture whose
    projections (or norms) the dimension studies cannot map."""
    from lmeval_regions.models import check_module_map, meta_model

    check_module_map(meta_model(model), needs=needs)


def run_report(s: dict[str, Any]) -> int:
    check_architecture(s["model"])
    run_dims_report(s["model"], s["corpus"], s["heldout"], s["importance"], s["outliers"],
                    s["report"], s["selection"])
    return 0


@dataclass
class DimsArgs:
    region: str = field(default="", metadata={"positional": True})
    """Region .safetensors whose dimensions are ranked."""
    out: str = ""
    """Output JSON file (one row per setting x method x N_d)."""
    settings: tuple[str, ...] = tuple(SETTINGS)
    """Removal settings (attn_heads+ffn_down, attn_heads, attn_hidden, ffn_hidden)."""
    methods: tuple[str, ...] = METHODS
    """How dimensions are picked from the region's counts (top, middle, bottom, random)."""
    n_dims: tuple[int, ...] = (1, 3, 5, 10)
    """Dimensions N_d removed per matrix per layer."""
    protect: tuple[int, ...] = ()
    """Hidden dims left untouched (e.g. the outliers: the 'w/o outliers' ablation)."""
    seed: int = 0
    """Seed of Random dimension picks."""

    def __post_init__(self) -> None:
        if not self.region:
            raise RegionsError("dims needs a region file (positional argument)")
        if not self.out:
            raise RegionsError("missing required option --out (the output JSON file)")
        for s in self.settings:
            if s not in SETTINGS:
                raise RegionsError(f"--settings: '{s}' is not one of {list(SETTINGS)}")


def run_dims(s: dict[str, Any]) -> int:
    from lmeval_regions.dimensions import removal_table
    from lmeval_regions.models import load_model
    from lmeval_regions.perplexity import make_evaluator
    from lmeval_regions.regions import Region

    args: DimsArgs = s["args"]
    corpus: CorpusConfig = s["corpus"]
    held: HeldOutConfig = s["heldout"]
    texts = held.texts(corpus)
    check_architecture(s["model"])
    model, tok = load_model(s["model"])
    region = Region.load(args.region, model)
    evaluate = make_evaluator(model, tok, texts, corpus.max_length, corpus.batch_size)
    rows = removal_table(model, region, evaluate, list(args.settings), list(args.methods),
                         list(args.n_dims), args.seed, list(args.protect) or None,
                         progress=print)
    write_text_atomic(args.out, json.dumps(rows, indent=1))
    return 0


@dataclass
class OutliersArgs:
    out: str | None = None
    """Also write the full report (per-layer maxima, norm z-scores) as JSON here."""


def run_outliers(s: dict[str, Any]) -> int:
    from lmeval_regions.dimensions import find_outliers
    from lmeval_regions.models import load_model

    corpus: CorpusConfig = s["corpus"]
    corpus.check()
    check_architecture(s["model"], needs="norms")
    model, tok = load_model(s["model"])
    bs = [b for stream in corpus.streams(tok).values() for b in stream]
    rep = find_outliers(model, bs, s["outliers"])
    if s["args"].out:
        write_text_atomic(s["args"].out, json.dumps(rep.to_dict(), indent=1))
    print(json.dumps({"dims": rep.dims, "norm_dims": [r["dim"] for r in rep.norm]}))
    return 0


@dataclass
class PlotRegionArgs:
    region: str = field(default="", metadata={"positional": True})
    """Region .safetensors to draw."""
    out: str = ""
    """Output folder for heatmap_<role>.png and distribution.png."""
    max_px: int = 128
    """Largest side, in pixels, of each heatmap panel."""

    def __post_init__(self) -> None:
        if not self.region:
            raise RegionsError("plot-region needs a region file (positional argument)")
        if not self.out:
            raise RegionsError("missing required option --out (the output folder)")


def run_plot(s: dict[str, Any]) -> int:
    from lmeval_regions.models import find_module_map, load_model
    from lmeval_regions.regions import Region
    from lmeval_regions.studies.region_plots import plot_distribution, plot_region_heatmaps

    args: PlotRegionArgs = s["args"]
    check_architecture(s["model"])
    model, _ = load_model(s["model"])
    region = Region.load(args.region, model)
    region.spec.setdefault("model_name", s["model"].model)  # figure titles name the model
    paths = plot_region_heatmaps(region, find_module_map(model), args.out, max_px=args.max_px)
    paths.append(plot_distribution(region, Path(args.out) / "distribution.png"))
    print("\n".join(str(p) for p in paths))
    return 0


COMMANDS = [
    Command("dims-report", "the whole dimensional-dependence study -> a report folder",
            "Importance over the corpus -> Top region -> structured-removal table (4 settings x\n"
            "Top/Middle/Bottom/Random x N_d), outlier dims and the w/o-outlier ablation,\n"
            "single-dimension sweep, single-parameter table, generations, heatmaps.\n"
            "Perplexity: pooled token perplexity on the held-out units.\n\n"
            "example: lmeval-regions dims-report --model gemma-3-270m --max-length 128 \\\n"
            "             --eval-units 2 --importance core.safetensors --out reports/dims",
            [MODEL, CORPUS, HELDOUT, ("importance", ImportanceConfig),
             ("outliers", OutlierConfig), ("selection", SelectionConfig),
             ("report", DimsReportConfig)], run_report,
            lambda s: config_inside(s["report"].out),
            lambda s: Files(inputs=[s["report"].importance] if s["report"].importance else [],
                            folders=[s["report"].out], model=s["model"])),
    Command("dims", "structured removal table of a region file",
            "Zero N_d whole rows/columns per matrix per layer, picked from a region's counts,\n"
            "for each setting x method x N_d; held-out perplexity after each "
            "(weights restored).\n\n"
            "example: lmeval-regions dims top1.safetensors --eval-units 2 --n-dims 1,3 "
            "--out dims.json",
            [MODEL, CORPUS, HELDOUT, ("args", DimsArgs)], run_dims,
            lambda s: config_beside(s["args"].out),
            lambda s: Files(inputs=[s["args"].region], outputs=[s["args"].out],
                            model=s["model"])),
    Command("outliers", "massive-activation and norm-weight outlier dims",
            "Run the corpus with hidden states and report hidden dims whose max |h| reaches\n"
            "--outlier-ratio x the layer median, and norm weights with robust z >= --norm-z.\n\n"
            "example: lmeval-regions outliers --units 2 --out outliers.json",
            [MODEL, CORPUS, ("outliers", OutlierConfig), ("args", OutliersArgs)], run_outliers,
            lambda s: config_beside(s["args"].out) if s["args"].out else None,
            lambda s: Files(outputs=[s["args"].out] if s["args"].out else [])),
    Command("plot-region", "region density heatmaps and distribution (PNG)",
            "Draw a region: 3x3 density heatmaps per projection role and layer, and its\n"
            "distribution over layers and modules.\n\n"
            "example: lmeval-regions plot-region top1.safetensors --out plots/",
            [MODEL, ("args", PlotRegionArgs)], run_plot,
            lambda s: config_inside(s["args"].out),
            lambda s: Files(inputs=[s["args"].region], folders=[s["args"].out],
                            model=s["model"])),
]
