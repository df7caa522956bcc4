"""Robustness of regions to the importance criterion, the corpus half and the corpus size.

For a loaded model, a corpus (``lang -> texts``) and held-out texts, :func:`run_robustness`
computes the importance *variants* ``criterion × {full corpus, first half, second half} ×
snapshots``, each as paper 1's core score (per-language importance summed over languages), and
reports

* how much their Top regions agree: the Jaccard overlap of every pair, per ratio, in total, per
  layer and per module kind (:func:`regions.overlap`);
* what removing them does, side by side (paper 1 Table 1): held-out perplexity with each
  variant's Top / Bottom region zeroed, and with Random regions (one per seed), as ratios to the
  unedited model (:mod:`lmeval_regions.perplexity`; every edit is restored before the next).

Cost: one pass per corpus half per language computes every criterion together (one forward and
one backward per batch); the full corpus is the sum of the halves' raw sums
(:class:`importance.PassState`), i.e. the full corpus cut into the halves' batches; a snapshot
at ``count`` sequences is the corpus' first ``count`` sequences of each language (paper 1's 10K
vs 100K), read in the same passes. Memory: per language, one raw copy of the scores per
criterion for each half and each snapshot, beside one running core score per variant; once
the cores are saved only their regions are kept (the effects run without the scores).

Output folder: ``importance/<criterion>.<variant>.safetensors`` (every variant's core score,
ordinary importance artefacts), ``report.json`` (every number), ``report.md``, and PNGs
(Jaccard heatmap, per-layer Jaccard, removal effects), each written atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from lmeval_regions.artefacts import write_text_atomic
from lmeval_regions.corpora import batches
from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.importance import (
    CRITERIA,
    Importance,
    ImportanceConfig,
    ImportancePass,
    PassState,
    combine,
)
from lmeval_regions.interventions import Editor
from lmeval_regions.perplexity import perplexities
from lmeval_regions.regions import check_ratio, overlap, select, select_from_importance
from lmeval_regions.studies.plotting import save_figure, subplots, title


@dataclass
class RobustnessConfig:
    """What the robustness report compares."""

    criteria: tuple[str, ...] = CRITERIA
    """Importance criteria compared (all computed in one pass per corpus half): sum_abs (paper
    1), abs_sum, fisher, magnitude, wanda."""
    ratios: tuple[float, ...] = (0.01,)
    """Region sizes per matrix (paper 1: 0.01, 0.03, 0.05)."""
    split_half: bool = True
    """Also score each language's first and second half of the texts separately (disjoint
    halves: does the region depend on which texts were read?)."""
    snapshots: tuple[int, ...] = ()
    """Sequence counts per language whose cumulative (prefix) importance is also compared
    (paper 1: 10K vs 100K samples)."""
    seeds: tuple[int, ...] = (0,)
    """Seeds of the Random regions (one Random row per seed and ratio)."""
    evaluate: bool = True
    """Measure the removal effect (held-out perplexity with each region zeroed)."""
    eval_max_length: int = field(default=256, metadata={"cli": False})
    """Tokens per held-out text in the perplexity evaluation (command line: --max-length)."""
    eval_batch_size: int = field(default=4, metadata={"cli": False})
    """Held-out texts per forward pass (command line: --batch-size)."""
    include_norms: bool = False
    """Also score the blocks' 1-D norm weights (not with wanda, which scores linear weights)."""
    out: str = "reports/robustness"
    """Report folder."""

    def __post_init__(self) -> None:
        self.criteria = tuple(self.criteria)
        for c in self.criteria:
            if c not in CRITERIA:
                raise RegionsError(f"criterion '{c}' is not one of {CRITERIA}."
                                   + did_you_mean(str(c), CRITERIA))
        if not self.criteria:
            raise RegionsError(f"criteria is empty; expected some of {CRITERIA}")
        self.ratios = tuple(check_ratio(r) for r in self.ratios)
        if not self.ratios:
            raise RegionsError("ratios is empty; e.g. 0.01 for 1% per matrix")
        self.snapshots = tuple(sorted(set(self.snapshots)))
        if any(s < 1 for s in self.snapshots):
            raise RegionsError(f"snapshots {self.snapshots} must be sequence counts >= 1")
        self.seeds = tuple(self.seeds)
        if self.evaluate and not self.seeds:
            raise RegionsError("seeds is empty; the Random baseline needs at least one seed")
        if self.eval_max_length < 2 or self.eval_batch_size < 1:
            raise RegionsError(f"eval_max_length={self.eval_max_length} must be >= 2 and "
                               f"eval_batch_size={self.eval_batch_size} >= 1")
        if self.include_norms and "wanda" in self.criteria:
            raise RegionsError("include_norms with criterion 'wanda': Wanda scores linear "
                               "weights only; drop one of them")


def variant_names(config: RobustnessConfig) -> list[str]:
    """``full``, then ``half1``/``half2`` (split-half), then ``n<count>`` per snapshot."""
    return (["full"] + (["half1", "half2"] if config.split_half else [])
            + [f"n{c}" for c in config.snapshots])


def _language_states(run: ImportancePass, tokenizer, texts: Sequence[str],
                     config: RobustnessConfig, batch_size: int, max_length: int
                     ) -> dict[str, PassState]:
    """Raw sums of one language per variant, one pass per half (or one over all texts)."""
    cut = math.ceil(len(texts) / 2) if config.split_half else len(texts)
    parts = [list(texts[:cut])] + ([list(texts[cut:])] if config.split_half else [])
    pending = list(config.snapshots)
    states: dict[str, PassState] = {}
    done: PassState | None = None  # the parts already read, summed
    for i, part in enumerate(parts):
        run.reset()
        offset = done.n_sequences if done else 0
        for b in batches(tokenizer, part, batch_size, max_length):
            run.step(b)
            while pending and offset + run.n_sequences >= pending[0]:
                s = run.state()
                states[f"n{pending.pop(0)}"] = s if done is None else done + s
        part_state = run.state()
        if config.split_half:
            states[f"half{i + 1}"] = part_state
        done = part_state if done is None else done + part_state
    states["full"] = done
    return states


def _core_importances(model, tokenizer, corpus, config, batch_size, max_length, folder: Path
                      ) -> dict[str, Importance]:
    """``"<criterion>/<variant>" -> core importance`` (Σ over languages), each saved.

    Each label's sum is kept running, languages added in corpus order as :func:`combine` adds
    them (the same fp32 sums): memory is one score buffer per label (criteria x variants x
    parameters x 4 B: 15 x 0.4 GB on Gemma-3-270M), not one per label and language (90 x 0.4 GB
    held until the end before)."""
    icfg = ImportanceConfig(criteria=config.criteria, include_norms=config.include_norms)
    per_label: dict[str, Importance] = {}
    with ImportancePass(model, icfg) as run:
        for lang, texts in corpus.items():
            states = _language_states(run, tokenizer, texts, config, batch_size, max_length)
            for variant in list(states):
                state = states.pop(variant)
                snap = int(variant[1:]) if variant.startswith("n") else None
                for imp in run.finish(state, snap, languages=[lang]):
                    label = f"{imp.criterion}/{variant}"
                    so_far = per_label.pop(label, None)
                    per_label[label] = imp if so_far is None else combine([so_far, imp])
                    del so_far, imp
                del state
    out = {}
    for c in config.criteria:  # criterion-major order, variants in variant_names order
        for v in variant_names(config):
            core = per_label.pop(f"{c}/{v}")
            core.extra["variant"] = v
            core.save(folder / f"{c}.{v}.safetensors")
            out[f"{c}/{v}"] = core
    return out


@dataclass
class _Variant:
    """What the report keeps of one variant once its scores are saved: its provenance and its
    regions (``ratio -> method -> Region``), a few MB instead of one score per parameter."""

    meta: dict[str, Any]
    regions: dict[float, dict[str, Any]]


def _variants(cores: dict[str, Importance], config: RobustnessConfig) -> dict[str, _Variant]:
    """Each core importance reduced to its Top (and, to evaluate, Bottom) regions; ``cores``
    is emptied as it goes, so the effects run without the scores in memory."""
    methods = ("top", "bottom") if config.evaluate else ("top",)
    out = {}
    for label in list(cores):
        imp = cores.pop(label)
        meta = {"criterion": imp.criterion, "variant": imp.extra["variant"],
                "snapshot": imp.snapshot, "n_sequences": imp.n_sequences,
                "n_tokens": imp.n_tokens, "n_skipped": imp.n_skipped,
                "file": f"importance/{imp.criterion}.{imp.extra['variant']}.safetensors"}
        out[label] = _Variant(meta, {r: {m: select_from_importance(imp, m, r) for m in methods}
                                     for r in config.ratios})
        del imp
    return out


def _jaccards(tops: Mapping[str, Any]) -> dict[str, Any]:
    """Total Jaccard matrix of the labels' regions, and per-layer/per-module values per pair."""
    labels = list(tops)
    matrix = [[1.0] * len(labels) for _ in labels]
    pairs = {}
    for i, a in enumerate(labels):
        for j in range(i + 1, len(labels)):
            b = labels[j]
            o = overlap(tops[a], tops[b])
            matrix[i][j] = matrix[j][i] = o["jaccard"]
            pairs[f"{a} ~ {b}"] = {"jaccard": o["jaccard"], "per_layer": o["per_layer"],
                                   "per_module": o["per_module"]}
    return {"labels": labels, "matrix": matrix, "pairs": pairs}


def _effects(model, tokenizer, heldout, variants: Mapping[str, _Variant], randoms,
             ratio: float, config: RobustnessConfig) -> dict[str, Any]:
    """Pooled and per-language perplexity ratios to the unedited model, per region
    (``randoms``: ``seed -> Random region`` at ``ratio``)."""
    def ppl():
        return perplexities(model, tokenizer, heldout, config.eval_max_length,
                            config.eval_batch_size)

    def ratios(r, base):
        return {"ppl_ratio": r["ppl"] / base["ppl"],
                "per_lang": {l: r["ppl_per_lang"][l] / base["ppl_per_lang"][l]
                             for l in base["ppl_per_lang"]}}

    base = ppl()
    regions = {f"Random s{s}": randoms[s] for s in config.seeds}
    for label, v in variants.items():
        regions[f"{label} Top"] = v.regions[ratio]["top"]
        regions[f"{label} Bottom"] = v.regions[ratio]["bottom"]
    rows = {}
    for name, region in regions.items():
        with Editor(model) as ed:  # restored bit-exactly on leaving the block
            ed.apply(region, "zero")
            rows[name] = ratios(ppl(), base)
    return {"base": {"ppl": base["ppl"], "ppl_per_lang": base["ppl_per_lang"]}, "rows": rows}


def _context(report: dict[str, Any]) -> str:
    """The model and settings of the report, for figure titles."""
    cfg = report["config"]
    return (f"{report['model']}; languages {','.join(report['languages'])}; batch "
            f"{report['batch_size']} x {report['max_length']} tokens; split-half "
            f"{cfg['split_half']}; snapshots {list(cfg['snapshots']) or 'none'}")


def _plots(report: dict[str, Any], folder: Path) -> list[str]:
    made = []
    context = _context(report)
    for key, jac in report["jaccard"].items():
        labels = jac["labels"]
        size = 1.2 + 0.45 * len(labels)
        fig, ax = subplots(figsize=(size + 1.5, size))
        im = ax.imshow(jac["matrix"], vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("importance variant (criterion/corpus part)")
        ax.set_ylabel("importance variant")
        fig.colorbar(im, ax=ax, label="Jaccard of Top regions")
        title(fig, f"Overlap of Top {key} per matrix regions between variants", context)
        name = f"jaccard_{key}.png"
        save_figure(fig, folder / name, dpi=110)
        made.append(name)
        # per layer: split-half agreement of each criterion (dashed), and each criterion's
        # full-corpus region against the first label's (the paper's estimator by default)
        ref = labels[0]
        fig, ax = subplots(figsize=(8, 3.5))
        for pair, v in jac["pairs"].items():
            a, b = pair.split(" ~ ")
            halves = a.endswith("/half1") and b == a[:-1] + "2"
            if not (halves or (a == ref and b.endswith("/full"))):
                continue
            layers = sorted((int(l), x) for l, x in v["per_layer"].items() if l != "None")
            ax.plot([l for l, _ in layers], [x for _, x in layers], marker="o",
                    ls="--" if halves else "-", label=pair)
        ax.set_xlabel("layer")
        ax.set_ylabel("Jaccard of Top regions")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        title(fig, f"Top {key} per matrix, per layer: split-half agreement (dashed) and each "
                   f"criterion vs {ref}", context)
        name = f"jaccard_layers_{key}.png"
        save_figure(fig, folder / name, dpi=110)
        made.append(name)
    for key, eff in report.get("effects", {}).items():
        rows = eff["rows"]
        labels = [k[:-4] for k in rows if k.endswith(" Top")]
        fig, ax = subplots(figsize=(max(6, 0.5 * len(labels) + 2), 3.8))
        xs = range(len(labels))
        # the increase ratio - 1 (paper 1's reading) on a symlog axis: a 1e-4 change and a
        # 1e4-fold one both stay visible
        ax.bar([x - 0.2 for x in xs], [rows[f"{l} Top"]["ppl_ratio"] - 1 for l in labels], 0.4,
               label="Top zeroed")
        ax.bar([x + 0.2 for x in xs], [rows[f"{l} Bottom"]["ppl_ratio"] - 1 for l in labels],
               0.4, label="Bottom zeroed")
        for k, v in rows.items():
            if k.startswith("Random"):
                ax.axhline(v["ppl_ratio"] - 1, color="k", ls=":", lw=1)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(list(xs), labels, rotation=90, fontsize=7)
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xlabel("importance variant")
        ax.set_ylabel("perplexity / base - 1 (dotted: Random)")
        ax.legend(fontsize=7)
        title(fig, f"Removing {key} per matrix (zeroed): held-out perplexity change", context)
        name = f"effects_{key}.png"
        save_figure(fig, folder / name, dpi=110)
        made.append(name)
    return made


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.3g}"


def _markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = ["# Robustness of regions: criterion, corpus half, corpus size", "",
             f"Model `{report['model']}`; languages {', '.join(report['languages'])}; "
             f"criteria {', '.join(cfg['criteria'])}; split-half {cfg['split_half']}; "
             f"snapshots {list(cfg['snapshots']) or 'none'}; batch size {report['batch_size']}, "
             f"max length {report['max_length']}. Each variant is paper 1's core score (Σ over "
             "languages of per-language importance); regions are selected per matrix.", "",
             "## Variants", "", "| variant | criterion | sequences | tokens | file |",
             "|---|---|---:|---:|---|"]
    for label, v in report["variants"].items():
        lines.append(f"| {label} | {v['criterion']} | {v['n_sequences']} | {v['n_tokens']} | "
                     f"`{v['file']}` |")
    for key, jac in report["jaccard"].items():
        labels = jac["labels"]
        lines += ["", f"## Jaccard of Top {key} regions", "",
                  "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for lab, row in zip(labels, jac["matrix"]):
            lines.append(f"| {lab} | " + " | ".join(_fmt(x) for x in row) + " |")
        lines += ["", f"![Jaccard](jaccard_{key}.png) ![per layer](jaccard_layers_{key}.png)"]
        halves = {p: v for p, v in jac["pairs"].items()
                  if p.split(" ~ ")[0].endswith("/half1") and p.endswith("/half2")}
        if halves:
            mods = sorted({m for v in halves.values() for m in v["per_module"]})
            lines += ["", "Split-half agreement per module (first vs second half):", "",
                      "| pair | total | " + " | ".join(mods) + " |", "|---" * (len(mods) + 2) + "|"]
            for p, v in halves.items():
                lines.append(f"| {p} | {_fmt(v['jaccard'])} | "
                             + " | ".join(_fmt(v["per_module"].get(m, float("nan")))
                                          for m in mods) + " |")
    for key, eff in report.get("effects", {}).items():
        langs = list(eff["base"]["ppl_per_lang"])
        lines += ["", f"## Removing {key} per matrix (perplexity / base)", "",
                  f"Base pooled perplexity {_fmt(eff['base']['ppl'])}.", "",
                  "| region | pooled | " + " | ".join(langs) + " |",
                  "|---" * (len(langs) + 2) + "|"]
        for name, r in eff["rows"].items():
            lines.append(f"| {name} | {_fmt(r['ppl_ratio'])} | "
                         + " | ".join(_fmt(r["per_lang"][l]) for l in langs) + " |")
        lines += ["", f"![effects](effects_{key}.png)"]
    lines += ["", "Every number: [`report.json`](report.json).", ""]
    return "\n".join(lines)


def run_robustness(model, tokenizer, corpus: Mapping[str, Sequence[str]],
                   heldout: Mapping[str, Sequence[str]] | None = None,
                   config: RobustnessConfig | None = None, batch_size: int = 4,
                   max_length: int = 256) -> dict[str, Any]:
    """Compute every importance variant, compare their regions, measure their removal, and
    write the report into ``config.out``; returns the report's numbers.

    ``corpus``: ``lang -> texts`` the importance reads (``batch_size``/``max_length`` as
    ``CorpusConfig``'s); ``heldout``: ``lang -> texts`` the perplexity is measured on (needed
    when ``config.evaluate``). The model's weights are unchanged afterwards.
    """
    config = config or RobustnessConfig()
    corpus = {l: list(t) for l, t in corpus.items()}
    if not corpus:
        raise RegionsError("the corpus names no language; expected lang -> texts")
    for lang, texts in corpus.items():
        if len(texts) < (2 if config.split_half else 1):
            raise RegionsError(f"language '{lang}' has {len(texts)} texts; split-half needs "
                               "at least 2")
        if config.snapshots and config.snapshots[-1] > len(texts):
            raise RegionsError(f"snapshot at {config.snapshots[-1]} sequences, but language "
                               f"'{lang}' has {len(texts)} texts")
    if config.evaluate and not heldout:
        raise RegionsError("evaluate=True needs held-out texts (lang -> texts)")
    folder = Path(config.out)
    cores = _core_importances(model, tokenizer, corpus, config, batch_size, max_length,
                              folder / "importance")
    # Random regions need only the matrices' shapes: taken from the first core before the
    # scores are dropped
    first = next(iter(cores.values())).scores
    randoms = {r: {s: select(first, "random", r, seed=s) for s in config.seeds}
               for r in config.ratios} if config.evaluate else {}
    del first
    variants = _variants(cores, config)
    report: dict[str, Any] = {
        "config": asdict(config),
        "model": getattr(getattr(model, "config", None), "_name_or_path", "") or
        type(model).__name__,
        "languages": list(corpus), "batch_size": batch_size, "max_length": max_length,
        "variants": {label: v.meta for label, v in variants.items()},
        "jaccard": {}, "effects": {},
    }
    for ratio in config.ratios:
        key = f"{ratio:g}"
        report["jaccard"][key] = _jaccards({l: v.regions[ratio]["top"]
                                            for l, v in variants.items()})
        if config.evaluate:
            report["effects"][key] = _effects(model, tokenizer, {l: list(t) for l, t in
                                                                 heldout.items()},
                                              variants, randoms[ratio], ratio, config)
    report["plots"] = _plots(report, folder)
    write_text_atomic(folder / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    write_text_atomic(folder / "report.md", _markdown(report))
    return report
