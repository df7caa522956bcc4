"""Leaderboard-style grids: model × region interventions × tasks through lm-eval, written in
paper 1's Table 1 layout (rows = languages/tasks, columns = Base and Top/Bottom/Random at each
ratio).

The model is loaded once as ``hf-regions``; each condition applies its edits with the model's
own :meth:`~lmeval_regions.eval.model.HFRegionsLM.apply_edits`, runs ``lm_eval.simple_evaluate`` on the
same object, and restores the weights bit-exactly before the next condition. Regions are made
on the fly from an importance artefact (``select_from_importance``, saved beside the table for
provenance) or taken from region files.

Every condition gets the same lm-eval task metadata and task options (:class:`LmEvalConfig`),
composed as ``lm_eval`` composes them (model args, then ``--metadata`` over them), so a cell equals
the number of a plain ``lm_eval --model hf-regions --model_args ...,region=...`` run.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lmeval_regions.artefacts import file_digest, write_text_atomic
from lmeval_regions.errors import RegionsError
from lmeval_regions.eval.console import include_ours
from lmeval_regions.eval.model import HFRegionsLM
from lmeval_regions.eval.ppl_task import pooled_perplexity
from lmeval_regions.importance import Importance
from lmeval_regions.interventions import Intervention
from lmeval_regions.models import resolve_pretrained
from lmeval_regions.regions import (METHODS, Fused, SelectionConfig, check_ratio,
                                    select_from_importance)

WORD_PPL_NOTE = ("word_perplexity counts whitespace-separated words (as lm-eval does): for "
                 "scripts written without spaces (zh, ja, th, ...) a whole paragraph is one "
                 "'word', so values like 1e230 there are meaningless; compare "
                 "token_perplexity or bits_per_byte across languages.")
"""Said under every table of word perplexity."""
PREFERRED_METRICS = ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte",
                     "acc", "acc_norm", "exact_match")


@dataclass
class LmEvalConfig:
    """How lm-eval runs the tasks of a grid: the same for every condition, and the flags of
    plain ``lm_eval`` of the same names."""

    limit: float | None = None
    """Documents per task (lm_eval --limit; a value below 1 is a fraction); default all."""
    eval_batch_size: str = "1"
    """lm-eval's batch size (lm_eval --batch_size): an integer or auto."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Extra hf model_args, KEY=VALUE,... (e.g. add_bos_token=False, max_length=512)."""
    include_path: str | None = None
    """An extra folder of task YAMLs (lm_eval --include_path; ours are always included)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Task metadata, a JSON object as lm_eval --metadata (or KEY=VALUE,...): reaches the
    tasks' dataset loaders, merged over the model args, e.g. {"text_path": "/data/x.jsonl"}
    for text_ppl, {"udhr_heldout_start": 30} or {"udhr_path": FILE} for udhr_ppl."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt (lm_eval --num_fewshot); None: each task's own default.
    Tasks that fix 0 in their config (and perplexity tasks) ignore it, as in lm-eval."""
    fewshot_seed: int = 1234
    """Seed of the few-shot example sampler (the fourth value of lm_eval --seed)."""
    apply_chat_template: bool = False
    """Format prompts with the tokenizer's chat template (lm_eval --apply_chat_template)."""
    fewshot_as_multiturn: bool | None = None
    """Few-shot examples as a multi-turn chat (needs apply_chat_template); None: as
    apply_chat_template, like lm_eval."""
    system_instruction: str | None = None
    """System instruction put before every prompt (lm_eval --system_instruction)."""
    gen_kwargs: str | None = None
    """Generation arguments for generate_until tasks, k=v,k=v (lm_eval --gen_kwargs)."""
    bootstrap_iters: int = 100000
    """Bootstrap resamples for metric standard errors (lm_eval --bootstrap_iters; 0: none)."""

    def __post_init__(self) -> None:
        from lmeval_regions.parsing import key_values

        if isinstance(self.metadata, str):
            text = self.metadata.strip()
            if text.startswith(("{", "[")):
                try:
                    doc = json.loads(text)
                except json.JSONDecodeError as e:
                    raise RegionsError(f"metadata {self.metadata!r} is not JSON ({e}); expected "
                                       "an object such as '{\"text_path\": \"/data/x.jsonl\"}'"
                                       ) from None
                if not isinstance(doc, dict):
                    raise RegionsError(f"metadata {self.metadata!r} is not a JSON object; "
                                       "expected e.g. '{\"text_path\": \"/data/x.jsonl\"}'")
                self.metadata = doc
            else:
                self.metadata = key_values(text, what="metadata")
        self.model_args = key_values(self.model_args, what="model_args")
        if self.limit is not None and not self.limit > 0:
            raise RegionsError(f"--limit {self.limit} must be > 0 (documents per task, or a "
                               "fraction below 1)")
        bs = str(self.eval_batch_size)
        if bs != "auto" and not (bs.isdigit() and int(bs) > 0):
            raise RegionsError(f"--eval-batch-size '{bs}' must be a positive integer or auto")
        if self.num_fewshot is not None and (isinstance(self.num_fewshot, bool)
                                             or not isinstance(self.num_fewshot, int)
                                             or self.num_fewshot < 0):
            raise RegionsError(f"num_fewshot {self.num_fewshot!r} must be an integer >= 0")
        if self.bootstrap_iters < 0:
            raise RegionsError(f"bootstrap_iters {self.bootstrap_iters} must be >= 0")
        if self.fewshot_as_multiturn is None:
            self.fewshot_as_multiturn = self.apply_chat_template
        elif self.fewshot_as_multiturn and not self.apply_chat_template:
            raise RegionsError("fewshot_as_multiturn needs apply_chat_template")
        if self.gen_kwargs:
            bad = [kv for kv in self.gen_kwargs.split(",") if "=" not in kv]
            if bad:
                raise RegionsError(f"gen_kwargs '{self.gen_kwargs}': {bad} is not key=value "
                                   "(e.g. max_gen_toks=64,temperature=0)")

    def batch_size(self) -> int | str:
        bs = str(self.eval_batch_size)
        return bs if bs == "auto" else int(bs)

    def evaluate_kwargs(self) -> dict[str, Any]:
        """The ``lm_eval.simple_evaluate`` keyword arguments these options set."""
        from lm_eval.utils import simple_parse_args_string

        return {"num_fewshot": self.num_fewshot, "fewshot_random_seed": self.fewshot_seed,
                "apply_chat_template": self.apply_chat_template,
                "fewshot_as_multiturn": self.fewshot_as_multiturn,
                "system_instruction": self.system_instruction,
                "gen_kwargs": simple_parse_args_string(self.gen_kwargs) if self.gen_kwargs else None,
                "bootstrap_iters": self.bootstrap_iters}


@dataclass
class Condition:
    """One column of the table: a label and the edits that make it (none for Base)."""

    label: str
    """Column header, e.g. ``Base`` or ``Top 1%``."""
    method: str | None = None
    """Selection method (top/bottom/middle/random) when made from importance."""
    ratio: float | None = None
    """Selection ratio when made from importance."""
    region: str | None = None
    """Region file (made or given) or entry spec; None for Base."""
    intervention: str = "zero"
    """Intervention applied to the region (paper 1 removes = zeroes)."""

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise RegionsError(f"method '{self.method}' is not one of {METHODS}")
        if self.ratio is not None:
            self.ratio = check_ratio(self.ratio)
        self.intervention = str(Intervention.parse(self.intervention))


def ratio_label(ratio: float) -> str:
    pct = ratio * 100
    return f"{pct:g}%"


def grid_conditions(methods: Sequence[str], ratios: Sequence[float], base: bool = True,
                    intervention: str = "zero") -> list[Condition]:
    """Base, then for each ratio each method (paper 1's column order)."""
    out = [Condition("Base")] if base else []
    for r in ratios:
        for m in methods:
            out.append(Condition(f"{m.capitalize()} {ratio_label(check_ratio(r))}", m, r,
                                 intervention=intervention))
    return out


def make_regions(conditions: list[Condition], importance_path: str | os.PathLike, model,
                 folder: Path, scope: str = "matrix", seed: int = 0,
                 fused: Fused = "split") -> None:
    """Select each condition's region from the importance file; save it in ``folder``."""
    imp = Importance.load(importance_path, model)
    folder.mkdir(parents=True, exist_ok=True)
    for c in conditions:
        if c.method is None or c.region is not None:
            continue
        path = folder / f"{c.method}_{c.ratio:g}_{scope}_{fused}_s{seed}.safetensors"
        select_from_importance(imp, c.method, c.ratio, scope, seed, fused).save(path)
        c.region = str(path)


def metric_of(task_result: dict[str, Any], metric: str) -> tuple[str, float] | None:
    """``(metric, value)`` of one task's results; ``metric='auto'`` picks the first of
    :data:`PREFERRED_METRICS` present."""
    names = PREFERRED_METRICS if metric == "auto" else (metric,)
    for m in names:
        for key, v in task_result.items():
            if key.split(",")[0] == m and isinstance(v, (int, float)):
                return m, float(v)
    return None


@dataclass
class Table:
    """Rows × columns of one metric; ``cells[row][column]``."""

    metric: str
    columns: list[str]
    rows: list[str]
    cells: dict[str, dict[str, float]]
    meta: dict[str, Any] = field(default_factory=dict)

    def markdown(self, digits: int = 2) -> str:
        def fmt(v: float | None) -> str:
            if v is None:
                return "–"
            if math.isinf(v) or math.isnan(v):
                return str(v)
            return f"{v:.{digits}e}" if abs(v) >= 1e5 else f"{v:.{digits}f}"

        head = f"| {self.meta.get('row_title', 'Language')} | " + " | ".join(self.columns) + " |"
        lines = [head, "|" + "---|" * (len(self.columns) + 1)]
        for r in self.rows:
            lines.append(f"| {r} | " + " | ".join(fmt(self.cells[r].get(c)) for c in self.columns) + " |")
        note = (f"\n{self.metric} (lower is better)" if "perplexity" in self.metric
                else f"\n{self.metric}")
        if self.metric == "word_perplexity":
            note += ("\n\n" + WORD_PPL_NOTE)
        return "\n".join(lines) + "\n" + note + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "columns": self.columns, "rows": self.rows,
                "cells": self.cells, "meta": self.meta}


def _row_labels(tasks: list[str]) -> dict[str, str]:
    """Strip the common prefix (``udhr_ppl_ar`` -> ``ar``) when it leaves every name non-empty."""
    if len(tasks) < 2:
        return {t: t for t in tasks}
    prefix = os.path.commonprefix(tasks)
    prefix = prefix[:prefix.rfind("_") + 1] if "_" in prefix else ""
    return {t: (t[len(prefix):] or t) for t in tasks}


def build_table(per_condition: dict[str, dict[str, Any]], metric: str = "auto") -> Table:
    """A :class:`Table` from ``{column label: simple_evaluate results}``."""
    columns = list(per_condition)
    leaves: list[str] = []
    for res in per_condition.values():
        groups = set(res.get("groups", {}))
        for t in res["results"]:
            if t not in groups and t not in leaves:
                leaves.append(t)
    chosen = None
    cells: dict[str, dict[str, float]] = {}
    labels = _row_labels(leaves)
    for col, res in per_condition.items():
        for t in leaves:
            got = metric_of(res["results"].get(t, {}), chosen or metric)
            if got is None:
                continue
            chosen = chosen or got[0]
            cells.setdefault(labels[t], {})[col] = got[1]
    if chosen is None:
        raise RegionsError(f"no task result has the metric '{metric}'"
                           + ("" if metric != "auto" else f" (tried {PREFERRED_METRICS})"))
    rows = [labels[t] for t in leaves if labels[t] in cells]
    # A pooled row for each perplexity group (lm-eval's own group value is a mean of ratios).
    for col, res in per_condition.items():
        for g in res.get("groups", {}):
            pooled = _pooled(res, g)
            if pooled is not None and chosen in pooled:
                cells.setdefault(f"{g} (pooled)", {})[col] = float(pooled[chosen])
    rows += sorted(r for r in cells if r.endswith("(pooled)") and r not in rows)
    return Table(chosen, columns, rows, cells)


def _pooled(results: dict[str, Any], group: str) -> dict[str, float] | None:
    try:
        return pooled_perplexity(results, group=group)
    except (RegionsError, KeyError):
        return None  # not one of our perplexity groups


def run_grid(pretrained: str, conditions: list[Condition], tasks: list[str], out: Path,
             importance: str | None = None, selection: SelectionConfig | None = None,
             lm_eval_config: LmEvalConfig | None = None, model_args: dict[str, Any] | None = None,
             metric: str = "auto", device: str = "cpu", log=print, resume: bool = False,
             task_metadata: dict[str, Any] | None = None) -> Table:
    """Evaluate every condition on ``tasks`` and write ``out/table.md``, ``out/table.json``
    and each condition's lm-eval results under ``out/results/``.

    ``model_args``: how the model is loaded (``dtype``, ``revision``, ... as
    :meth:`ModelConfig.hf_model_args` gives them); ``lm_eval_config``: limit, batch size, extra
    model args, task metadata and options, the same for every condition; ``selection``: how
    regions made from ``importance`` are selected (scope, seed, fused projections).
    With ``resume``, a condition whose results file exists and was made with the same model,
    tasks, options and region (by content digest) is read back instead of re-run. Task
    metadata is, as in ``lm_eval``, the model args with ``--metadata`` and then
    ``task_metadata`` (a dict, e.g. ``udhr_path``) over them; it reaches the tasks' dataset
    loaders."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise RegionsError("no tasks given (e.g. --tasks udhr_ppl)")
    options = lm_eval_config or LmEvalConfig()
    selection = selection or SelectionConfig()
    scope, seed, fused = selection.scope, selection.seed, selection.fused
    limit, batch_size = options.limit, options.batch_size()
    needs = [c.label for c in conditions if c.method is not None and c.region is None]
    if needs and importance is None:
        raise RegionsError(f"conditions {needs} select regions from importance: pass --importance "
                           "CORE.safetensors, or give region files (--regions)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = resolve_pretrained(pretrained)
    hf_args = {"pretrained": path, "dtype": "float32", **(model_args or {}), **options.model_args}
    args = {**hf_args, "device": device, "batch_size": batch_size}
    lm = HFRegionsLM(**args)
    if needs:
        make_regions(conditions, importance, lm.model, out / "regions", scope, seed, fused)
    # lm_eval merges model_args into task metadata (its CLI: model_args | --metadata); an LM
    # object passed to simple_evaluate gets none, so compose them here the same way.
    meta = {**hf_args, **options.metadata, **(task_metadata or {})}
    manager = TaskManager(include_path=include_ours(options.include_path), metadata=meta)
    run_kwargs = options.evaluate_kwargs()
    per_condition: dict[str, dict[str, Any]] = {}
    timings = {}
    for c in conditions:
        t0 = time.perf_counter()
        result_file = out / "results" / f"{_slug(c.label)}.json"
        key = _condition_key(c, path, tasks, limit, {**args, **meta, **run_kwargs})
        if resume and result_file.exists():
            old = json.loads(result_file.read_text(encoding="utf-8"))
            if old.get("lmeval_regions_key") == key:
                per_condition[c.label] = old
                timings[c.label] = old.get("lmeval_regions_seconds", 0.0)
                log(f"[table] {c.label}: reused {result_file}")
                continue
        if c.region is not None:
            lm.apply_edits(f"{c.region}@{c.intervention}")
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                          limit=limit, batch_size=batch_size, device=device,
                                          **run_kwargs)
        finally:
            lm.restore_edits()
        timings[c.label] = round(time.perf_counter() - t0, 1)
        res.pop("samples", None)
        res["lmeval_regions_key"] = key
        res["lmeval_regions_seconds"] = timings[c.label]
        write_text_atomic(result_file, json.dumps(res, indent=1, default=str))
        per_condition[c.label] = res
        log(f"[table] {c.label}: {timings[c.label]} s")
    table = build_table(per_condition, metric)
    table.meta.update({"model": pretrained, "tasks": tasks, "limit": limit, "scope": scope,
                       "seed": seed, "fused": fused, "importance": importance,
                       "task_metadata": meta, "options": asdict(options), "seconds": timings,
                       "conditions": [asdict(c) for c in conditions]})
    write_text_atomic(out / "table.md", table.markdown())
    write_text_atomic(out / "table.json", json.dumps(table.to_json(), indent=1, default=str))
    return table


def _condition_key(c: Condition, path: str, tasks: list[str], limit, args: dict) -> str:
    """What a condition's result depends on, as one string (for ``resume``)."""
    region = c.region
    if region and Path(region).is_file():
        region = file_digest(region)
    return json.dumps({"model": str(path), "tasks": tasks, "limit": limit, "region": region,
                       "intervention": c.intervention,
                       "args": {k: str(v) for k, v in sorted(args.items())}}, sort_keys=True)


def _slug(label: str) -> str:
    return label.lower().replace("%", "pct").replace(" ", "_").replace(".", "p")
