"""Leaderboard-style grids: model × region interventions × tasks through lm-eval, written in
paper 1's Table 1 layout (rows = languages/tasks, columns = Base and Top/Bottom/Random at each
ratio).

The model is loaded once as ``hf-regions`` (:class:`GridSession`, which several grids of one
run can share, and only when some condition is not read back from earlier results); each
condition applies its edits with the model's own
:meth:`~lmeval_regions.eval.model.HFRegionsLM.apply_edits`, runs ``lm_eval.simple_evaluate``
on the same object with the same task objects, and restores the weights bit-exactly before the
next condition. Regions are selected from an importance artefact read tensor by tensor
(``select_file``, saved beside the table for provenance and reused while the file is
unchanged) or taken from region files.

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
from typing import TYPE_CHECKING, Any, Sequence

from lmeval_regions.artefacts import (
    check_fingerprint,
    file_digest,
    read_metadata,
    write_text_atomic,
)
from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.eval.console import include_ours
from lmeval_regions.interventions import Intervention
from lmeval_regions.models import resolve_pretrained
from lmeval_regions.regions import METHODS, Fused, SelectionConfig, check_ratio, select_file

if TYPE_CHECKING:  # lm-eval, transformers and datasets load when a grid runs, not at import
    from lmeval_regions.eval.model import HFRegionsLM

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
    method_batch_size: dict[str, Any] = field(default_factory=dict)
    """lm-eval's batch size of the columns made by these selection methods, METHOD=N,...
    (e.g. top=1; base=N: the Base column), over --eval-batch-size. Batching changes the
    summation order of the matrix products; where a region breaks the model (Top:
    perplexities of 1e7 and more) exp() of the mean NLL amplifies that rounding ~30x (3e-5
    relative on Gemma-3-270M), and a ratio to Base of a region that barely moves it (Bottom:
    ppl/Base - 1 ~ 1e-5) keeps only a digit or two of it; batch 1 gives the plain lm_eval
    run's values bit for bit."""
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
        self.method_batch_size = key_values(self.method_batch_size, what="method_batch_size")
        for m, n in self.method_batch_size.items():
            if m not in COLUMNS:
                raise RegionsError(f"--method-batch-size: '{m}' is not one of {COLUMNS}."
                                   + did_you_mean(m, COLUMNS))
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise RegionsError(f"--method-batch-size {m}={n!r}: the batch size must be a "
                                   "positive integer")
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

    def batch_size(self, column: str | None = None) -> int | str:
        """lm-eval's batch size of a column: made by selection method ``column``, ``base``
        (no region), or None (any other column: a given region or entry spec)."""
        if column in self.method_batch_size:
            return int(self.method_batch_size[column])
        bs = str(self.eval_batch_size)
        return bs if bs == "auto" else int(bs)

    def evaluate_kwargs(self) -> dict[str, Any]:
        """The ``lm_eval.simple_evaluate`` keyword arguments these options set."""
        from lm_eval.utils import simple_parse_args_string

        return {"num_fewshot": self.num_fewshot, "fewshot_random_seed": self.fewshot_seed,
                "apply_chat_template": self.apply_chat_template,
                "fewshot_as_multiturn": self.fewshot_as_multiturn,
                "system_instruction": self.system_instruction,
                "gen_kwargs": (simple_parse_args_string(self.gen_kwargs) if self.gen_kwargs
                               else None),
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


COLUMNS = (*METHODS, "base")
"""Columns whose lm-eval batch size can be set apart (--method-batch-size)."""


def column_kind(c: "Condition") -> str | None:
    """The :data:`COLUMNS` entry of a condition: its selection method, ``base`` for the
    column without a region, None for a given region or entry spec."""
    if c.method is not None:
        return c.method
    return "base" if c.region is None else None


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


def make_regions(conditions: list[Condition], importance_path: str | os.PathLike, model=None,
                 folder: Path | None = None, scope: str = "matrix", seed: int = 0,
                 fused: Fused = "split", log=None) -> None:
    """Select each condition's region from the importance file (read tensor by tensor, no
    model needed) and save it in ``folder``; a region already there that was selected the same
    way from the same file (path, size, modification time) is reused, not selected again.
    With ``model``, the importance is checked to be of that model first."""
    if folder is None:
        raise RegionsError("make_regions needs the folder the regions are saved in")
    if model is not None:
        check_fingerprint(read_metadata(importance_path, "importance")["model"], model,
                          what=f"importance file '{importance_path}'")
    folder.mkdir(parents=True, exist_ok=True)
    source = _file_stamp(importance_path)
    for c in conditions:
        if c.method is None or c.region is not None:
            continue
        path = folder / f"{c.method}_{c.ratio:g}_{scope}_{fused}_s{seed}.safetensors"
        want = {"method": c.method, "ratio": c.ratio, "scope": scope, "seed": seed,
                "fused": fused, "importance_file": source}
        if not (path.exists() and _region_made(path, want)):
            region = select_file(importance_path, c.method, c.ratio, scope, seed, fused=fused)
            region.spec["importance_file"] = source
            region.save(path)
        elif log is not None:
            log(f"[table] {c.label}: reused region {path}")
        c.region = str(path)


def _file_stamp(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a file's version without reading it (a 7B importance is 13-26 GB)."""
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _region_made(path: Path, want: dict[str, Any]) -> bool:
    """Whether the region file at ``path`` was selected as ``want`` says."""
    try:
        spec = read_metadata(path, "region").get("spec", {})
    except RegionsError:
        return False
    return all(spec.get(k) == v for k, v in want.items())


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
            lines.append(f"| {r} | " + " | ".join(fmt(self.cells[r].get(c)) for c in self.columns)
                         + " |")
        note = (f"\n{self.metric} (lower is better)" if "perplexity" in self.metric
                else f"\n{self.metric}")
        if self.metric == "word_perplexity":
            note += ("\n\n" + WORD_PPL_NOTE)
        if "limit" in self.meta:  # a grid's table says what it evaluated
            limit = self.meta["limit"]
            if limit is None:
                docs = "every document of each task (no --limit)"
            elif limit >= 1:
                docs = f"--limit {limit:g}: the first {limit:g} documents of each task"
            else:
                docs = f"--limit {limit:g}: that fraction of each task's documents"
            options = self.meta.get("options") or {}
            batch = options.get("eval_batch_size")
            per_method = "".join(f" ({m.capitalize()} columns: {n})" for m, n in
                                 (options.get("method_batch_size") or {}).items())
            note += (f"\n\nModel {self.meta.get('model')}; {docs}"
                     + (f"; lm-eval batch size {batch}{per_method}" if batch is not None
                        else "") + ".")
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
    from lmeval_regions.eval.ppl_task import pooled_perplexity

    try:
        return pooled_perplexity(results, group=group)
    except (RegionsError, KeyError):
        return None  # not one of our perplexity groups


class GridSession:
    """One model for every grid of a run: loaded on first use (never when every condition is
    read back from results), then each condition edits it and restores it bit-exactly. lm-eval's
    tasks are built once per task name and reused by every condition (their documents do not
    change between conditions), and lm-eval's environment report (``pip list``, ... one
    subprocess per call) is taken once.

    ``pretrained``, ``lm_eval_config``, ``model_args``, ``device`` and ``task_metadata`` are
    :func:`run_grid`'s; :attr:`lm` is the model (an ``hf-regions`` LM), also usable outside a
    grid (e.g. ``session.lm.model`` for an importance pass)."""

    def __init__(self, pretrained: str, lm_eval_config: LmEvalConfig | None = None,
                 model_args: dict[str, Any] | None = None, device: str = "cpu",
                 task_metadata: dict[str, Any] | None = None) -> None:
        self.pretrained = pretrained
        self.path = resolve_pretrained(pretrained)
        self.options = lm_eval_config or LmEvalConfig()
        self.device = device
        self.hf_args = {"pretrained": self.path, "dtype": "float32", **(model_args or {}),
                        **self.options.model_args}
        self.args = {**self.hf_args, "device": device, "batch_size": self.options.batch_size()}
        # lm_eval merges model_args into task metadata (its CLI: model_args | --metadata); an LM
        # object passed to simple_evaluate gets none, so compose them here the same way.
        self.meta = {**self.hf_args, **self.options.metadata, **(task_metadata or {})}
        self.run_kwargs = self.options.evaluate_kwargs()
        self.seconds: dict[str, float] = {}
        """Time spent loading the model, building tasks, and in lm-eval (cumulative)."""
        self._lm: HFRegionsLM | None = None
        self._manager = None
        self._full = None
        self._built: dict[str, list[Any]] = {}
        self._env: dict[str, Any] | None = None

    @property
    def loaded(self) -> bool:
        return self._lm is not None

    @property
    def lm(self) -> HFRegionsLM:
        if self._lm is None:
            from lmeval_regions.eval.model import HFRegionsLM

            t0 = time.perf_counter()
            self._lm = HFRegionsLM(**self.args)
            self.seconds["load"] = time.perf_counter() - t0
        return self._lm

    def key(self, c: Condition, tasks: list[str]) -> str:
        """What a condition's result depends on, as one string (for ``resume``)."""
        return _condition_key(c, self.path, tasks, self.options.limit,
                              {**self.args, **self.meta, **self.run_kwargs,
                               "batch_size": self.options.batch_size(column_kind(c))})

    def _tasks(self, tasks: list[str]) -> list[Any]:
        """The built task objects of ``tasks`` (each built once per session)."""
        t0 = time.perf_counter()
        for name in tasks:
            if name not in self._built:
                got = self._load(name)
                one = got["groups"].get(name) or got["tasks"].get(name)
                self._built[name] = [one] if one is not None else list(got["tasks"].values())
        self.seconds["tasks"] = self.seconds.get("tasks", 0.0) + time.perf_counter() - t0
        return [obj for name in tasks for obj in self._built[name]]

    def _load(self, name: str) -> dict[str, Any]:
        """Build task ``name`` with a TaskManager indexing only our (and the user's) task
        folders when it is there -- lm-eval's index of its thousands of YAMLs takes ~10 s to
        build -- else (or if it refers to lm-eval's own tasks) with the full one. Both build
        the same task: later paths override lm-eval's tasks of the same name in the full one."""
        from lm_eval.tasks import TaskManager

        paths = include_ours(self.options.include_path)
        if self._manager is None:
            self._manager = TaskManager(include_path=paths, include_defaults=False,
                                        metadata=self.meta)
        if name in self._manager.task_index:
            try:
                return self._manager.load([name])
            except KeyError:  # e.g. a group of ours listing lm-eval's tasks
                pass
        if self._full is None:
            self._full = TaskManager(include_path=paths, metadata=self.meta)
        return self._full.load([name])

    def evaluate(self, c: Condition, tasks: list[str]) -> dict[str, Any]:
        """lm-eval's results of ``tasks`` with condition ``c`` applied (then restored)."""
        import lm_eval
        import lm_eval.evaluator as evaluator

        lm, objs = self.lm, self._tasks(tasks)
        t0 = time.perf_counter()
        if c.region is not None:
            lm.apply_edits(f"{c.region}@{c.intervention}")
        add_env_info = evaluator.add_env_info
        evaluator.add_env_info = self._env_info  # the same report, one subprocess run
        # lm-eval reads an LM object's batch size from it (simple_evaluate's batch_size is only
        # recorded in the results): set for this condition, put back after
        batch_size, default = self.options.batch_size(column_kind(c)), lm.batch_size_per_gpu
        lm.batch_size_per_gpu = batch_size
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=objs, task_manager=self._manager,
                                          limit=self.options.limit, batch_size=batch_size,
                                          device=self.device, **self.run_kwargs)
        finally:
            lm.batch_size_per_gpu = default
            evaluator.add_env_info = add_env_info
            lm.restore_edits()
        self.seconds["lm_eval"] = self.seconds.get("lm_eval", 0.0) + time.perf_counter() - t0
        return res

    def _env_info(self, storage: dict[str, Any]) -> None:
        if self._env is None:
            from lm_eval.loggers.utils import add_env_info

            self._env = {}
            add_env_info(self._env)
        storage.update(self._env)


def run_grid(pretrained: str, conditions: list[Condition], tasks: list[str], out: Path,
             importance: str | None = None, selection: SelectionConfig | None = None,
             lm_eval_config: LmEvalConfig | None = None, model_args: dict[str, Any] | None = None,
             metric: str = "auto", device: str = "cpu", log=print, resume: bool = False,
             task_metadata: dict[str, Any] | None = None, session: GridSession | None = None,
             reuse: Sequence[str | os.PathLike] = ()) -> Table:
    """Evaluate every condition on ``tasks`` and write ``out/table.md``, ``out/table.json``
    and each condition's lm-eval results under ``out/results/``.

    ``model_args``: how the model is loaded (``dtype``, ``revision``, ... as
    :meth:`ModelConfig.hf_model_args` gives them); ``lm_eval_config``: limit, batch size, extra
    model args, task metadata and options, the same for every condition; ``selection``: how
    regions made from ``importance`` are selected (scope, seed, fused projections).
    With ``resume``, a condition whose results file exists and was made with the same model,
    tasks, options and region (by content digest) is read back instead of re-run; the model is
    loaded only if some condition is not. Task metadata is, as in ``lm_eval``, the model args
    with ``--metadata`` and then ``task_metadata`` (a dict, e.g. ``udhr_path``) over them; it
    reaches the tasks' dataset loaders.

    ``session``: a :class:`GridSession` to evaluate with (its model, options and metadata are
    used instead of ``pretrained``/``lm_eval_config``/``model_args``/``device``/
    ``task_metadata``), so several grids of one run share one loaded model. ``reuse``: results
    folders of other grids (``OUT/results``); with ``resume``, a condition evaluated there the
    same way on a superset of ``tasks`` (e.g. Base of a larger table) is taken from there,
    restricted to ``tasks``, instead of being evaluated again.
    """
    if not tasks:
        raise RegionsError("no tasks given (e.g. --tasks udhr_ppl)")
    if session is None:
        session = GridSession(pretrained, lm_eval_config, model_args, device, task_metadata)
    options = session.options
    selection = selection or SelectionConfig()
    scope, seed, fused = selection.scope, selection.seed, selection.fused
    needs = [c.label for c in conditions if c.method is not None and c.region is None]
    if needs and importance is None:
        raise RegionsError(f"conditions {needs} select regions from importance: pass --importance "
                           "CORE.safetensors, or give region files (--regions)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if needs:  # from the file, tensor by tensor: no weights needed, reused when made before
        make_regions(conditions, importance, _skeleton(session), out / "regions", scope, seed,
                     fused, log=log)
    per_condition: dict[str, dict[str, Any]] = {}
    timings = {}
    for c in conditions:
        t0 = time.perf_counter()
        result_file = out / "results" / f"{_slug(c.label)}.json"
        key = session.key(c, tasks)
        res = _read_back(result_file, key, tasks) if resume else None
        if res is None and resume:
            for folder in reuse:
                res = _read_back(Path(folder) / f"{_slug(c.label)}.json", key, tasks)
                if res is not None:
                    res["lmeval_regions_key"] = key
                    res["lmeval_regions_taken_from"] = str(Path(folder) / f"{_slug(c.label)}.json")
                    write_text_atomic(result_file, json.dumps(res, indent=1, default=str))
                    break
        if res is not None:
            per_condition[c.label] = res
            timings[c.label] = res.get("lmeval_regions_seconds", 0.0)
            log(f"[table] {c.label}: reused {res.get('lmeval_regions_taken_from', result_file)}")
            continue
        res = session.evaluate(c, tasks)
        timings[c.label] = round(time.perf_counter() - t0, 1)
        res.pop("samples", None)
        res["lmeval_regions_key"] = key
        res["lmeval_regions_seconds"] = timings[c.label]
        write_text_atomic(result_file, json.dumps(res, indent=1, default=str))
        per_condition[c.label] = res
        log(f"[table] {c.label}: {timings[c.label]} s")
    table = build_table(per_condition, metric)
    table.meta.update({"model": pretrained, "tasks": tasks, "limit": options.limit,
                       "scope": scope, "seed": seed, "fused": fused, "importance": importance,
                       "task_metadata": session.meta, "options": asdict(options),
                       "seconds": timings, "conditions": [asdict(c) for c in conditions]})
    write_text_atomic(out / "table.md", table.markdown())
    write_text_atomic(out / "table.json", json.dumps(table.to_json(), indent=1, default=str))
    return table


def _skeleton(session: GridSession):
    """The model's structure on the meta device (no weights), to check an importance file
    against before any condition runs; None when its config cannot be read that way."""
    from lmeval_regions.models import ModelConfig, meta_model

    args = session.hf_args
    if args.get("gguf_file") or args.get("peft") or args.get("delta"):
        return None  # parameter names come from more than the config
    try:
        return meta_model(ModelConfig(model=session.path, device="cpu",
                                      revision=args.get("revision") or None,
                                      trust_remote_code=bool(args.get("trust_remote_code"))))
    except Exception:  # noqa: BLE001 - e.g. an offline hub id: checked when applied instead
        return None


def _read_back(path: Path, key: str, tasks: list[str]) -> dict[str, Any] | None:
    """The results saved at ``path`` if they were made as ``key`` says, on ``tasks`` or on a
    superset of them (then restricted to ``tasks``); else None."""
    if not path.exists():
        return None
    old = json.loads(path.read_text(encoding="utf-8"))
    old_key = old.get("lmeval_regions_key")
    if old_key == key:
        return old
    if not isinstance(old_key, str):
        return None
    a, b = json.loads(old_key), json.loads(key)
    if {k: v for k, v in a.items() if k != "tasks"} != {k: v for k, v in b.items()
                                                          if k != "tasks"}:
        return None
    if not set(tasks) <= set(a["tasks"]) or old.get("groups"):
        return None  # (a group's aggregate would change with its members: not restricted)
    sub = dict(old)
    for k in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples"):
        if isinstance(old.get(k), dict):
            sub[k] = {t: v for t, v in old[k].items() if t in tasks}
    sub["group_subtasks"] = {t: v for t, v in old.get("group_subtasks", {}).items()
                             if t in tasks}
    return sub


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
