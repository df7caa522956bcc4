"""Perplexity tasks: data loaders, the token-perplexity task class and pooled group figures.

The task YAMLs in ``tasks/perplexity/`` reach these through ``ppl.py`` beside them
(``!function ppl.PerplexityTask``), a re-export of this module.

Per document lm-eval's ``loglikelihood_rolling`` returns the summed log-likelihood ``LL`` of
the tokens ``tok_encode(text)`` scored in non-overlapping windows of ``max_length`` predicted
tokens, the first window conditioned on the prefix token (BOS, else EOS). Each document
contributes, beside lm-eval's own ``word_perplexity``, ``byte_perplexity`` and
``bits_per_byte``:

- ``token_perplexity``: ``exp(-Σ LL / Σ T)`` over the task's documents, ``T`` = number of
  tokens lm-eval scored, i.e. ``len(tok_encode(text))`` with the model's tokenizer and its
  ``add_bos_token`` setting (see docs/tasks.md, "BOS handling");
- ``nll_sum``, ``token_count``, ``byte_count``, ``word_count``: sums, so that figures can be
  pooled over languages by :func:`pooled_perplexity` (lm-eval's group value is a mean of the
  per-task perplexities, not a pooled one).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import datasets
from lm_eval.api.task import ConfigurableTask

from lmeval_regions.corpora import find_data_file, iter_rows, load_parallel, parse_source
from lmeval_regions.errors import RegionsError
from lmeval_regions.models import is_embedded, resolve_pretrained
from lmeval_regions.paper import HELDOUT_START, UDHR_FILE
from lmeval_regions.perplexity import ppl_from_sums

SUM_METRICS = ("nll_sum", "token_count", "byte_count", "word_count")


# ----------------------------------------------------------------------------- data loaders

def _test_split(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_udhr(lang: str, udhr_heldout_start: int = HELDOUT_START, udhr_path: str | None = None,
              **_: Any) -> datasets.DatasetDict:
    """Held-out UDHR units of ``lang``: units ``udhr_heldout_start..49`` (the first 25 are used
    for importance). ``udhr_path`` overrides the file search of ``find_data_file``."""
    units = load_parallel(udhr_path or find_data_file(UDHR_FILE), langs=[lang])[lang]
    start = int(udhr_heldout_start)
    if not 0 <= start < len(units):
        raise RegionsError(f"udhr_heldout_start={udhr_heldout_start} must be in "
                           f"[0, {len(units) - 1}] ({len(units)} units per language)")
    return _test_split([{"id": u["id"], "text": u["text"]} for u in units[start:]])


def load_text(text_path: str | None = None, text_field: str = "text", text_unit: str = "line",
              **_: Any) -> datasets.DatasetDict:
    """Documents of any corpus source of :mod:`lmeval_regions.corpora.sources` (a JSONL, CSV,
    TSV or Parquet file with a ``text_field`` column, a TXT file or folder with one document
    per non-empty line (``text_unit=line``) or per file (``text_unit=file``), a ``datasets``
    folder, ``hf:NAME[:CONFIG][@SPLIT]``), read as importance and activations read it."""
    if not text_path:
        raise RegionsError("task text_ppl needs a corpus in the task metadata 'text_path' "
                           "(JSONL, CSV, Parquet, TXT, a folder of .txt files): --metadata "
                           "'{\"text_path\": \"/path/to/file.jsonl\"}' (the same flag on "
                           "lm_eval and on lmeval-regions table), or "
                           "run_grid(task_metadata={\"text_path\": ...}) / "
                           "TaskManager(metadata={\"text_path\": ...}) from Python")
    if text_unit not in ("line", "file"):
        raise RegionsError(f"text_unit='{text_unit}' must be 'line' or 'file'")
    src = parse_source(text_path, what="text_path")
    rows = [{"id": rid, "text": text}
            for rid, _, text in iter_rows(src, text_field, None, text_unit)]
    if not rows:
        raise RegionsError(f"text_path '{text_path}' holds no documents")
    return _test_split(rows)


def weighted_perplexity(items: list[tuple[float, int]]) -> float:
    """``exp(-Σ loglik / Σ weight)`` (lm-eval's, without the overflow)."""
    lls, weights = zip(*items)
    return ppl_from_sums(-sum(lls), sum(weights))


# ----------------------------------------------------------------------------- token counts

def tokenizer_source(meta: dict) -> tuple[str, dict]:
    """Where to load the model's tokenizer from, given task metadata (= model_args merged)."""
    src = meta.get("tokenizer") or meta.get("pretrained")
    if not isinstance(src, str) or not src:
        raise RegionsError(
            "token_perplexity needs the model's tokenizer, but the task metadata names none: "
            "run through the lm_eval CLI or simple_evaluate without task_manager (model_args "
            "are merged into task metadata), or pass metadata={'tokenizer': PATH} to the "
            "TaskManager (lmeval_regions.eval.tasks.task_manager(metadata=...))")
    if is_embedded(src):
        src = resolve_pretrained(src)
    kw = {k: meta[k] for k in ("revision", "trust_remote_code") if k in meta}
    if meta.get("gguf_file") and not meta.get("tokenizer"):
        kw["gguf_file"] = meta["gguf_file"]
    return src, kw


@functools.lru_cache(maxsize=4)
def _load_tokenizer(src: str, kw: tuple):
    # one load per run, not one per language task (Gemma's tokenizer takes seconds)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src, **dict(kw))


class PerplexityTask(ConfigurableTask):
    """``loglikelihood_rolling`` task adding token-level perplexity and pooling sums.

    Token counts replicate ``HFLM.tok_encode`` (the tokens lm-eval scores): the tokenizer's
    default special tokens, or ``add_special_tokens=add_bos_token`` when model_args set it, and
    none when the text already starts with the BOS string.
    """

    def __init__(self, config: dict | None = None) -> None:
        # `class` selects this class in the YAML; TaskConfig has no such field.
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        super().__init__(config=config)
        self._tokenizer = None

    def _count_tokens(self, text: str) -> int:
        if self._tokenizer is None:
            src, kw = tokenizer_source(dict(self.config.metadata or {}))
            self._tokenizer = _load_tokenizer(src, tuple(sorted(kw.items())))
        tok = self._tokenizer
        meta = self.config.metadata or {}
        kwargs = {}
        if meta.get("add_bos_token") is not None:
            kwargs["add_special_tokens"] = bool(meta["add_bos_token"])
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if prefix is not None and text.startswith(tok.decode(prefix)):
            kwargs["add_special_tokens"] = False
        return len(tok.encode(text, **kwargs))

    def process_results(self, doc: dict, results: list) -> dict[str, Any]:
        (loglik,) = results
        text = self.doc_to_target(doc)
        n_words, n_bytes = self.count_words(text), self.count_bytes(text)
        n_tokens = self._count_tokens(text)
        return {
            "token_perplexity": (loglik, n_tokens),
            "word_perplexity": (loglik, n_words),
            "byte_perplexity": (loglik, n_bytes),
            "bits_per_byte": (loglik, n_bytes),
            "nll_sum": -loglik,
            "token_count": n_tokens,
            "byte_count": n_bytes,
            "word_count": n_words,
        }

    def aggregation(self) -> dict:
        from lm_eval.api.metrics import bits_per_byte

        return {"token_perplexity": weighted_perplexity, "word_perplexity": weighted_perplexity,
                "byte_perplexity": weighted_perplexity, "bits_per_byte": bits_per_byte,
                **{m: sum for m in SUM_METRICS}}

    def higher_is_better(self) -> dict:
        return {"token_perplexity": False, "word_perplexity": False, "byte_perplexity": False,
                "bits_per_byte": False, **{m: None for m in SUM_METRICS}}


# ----------------------------------------------------------------------------- pooling

def _leaf_tasks(results: dict, name: str) -> list[str]:
    subtasks = results.get("group_subtasks", {})
    if name not in subtasks:
        return [name]
    out = []
    for child in subtasks[name]:
        out += _leaf_tasks(results, child)
    return out


def pooled_perplexity(results: dict, group: str | None = None,
                      tasks: list[str] | None = None, filter_name: str = "none"
                      ) -> dict[str, float]:
    """Perplexities pooled over the documents of several perplexity tasks.

    ``results`` is what ``simple_evaluate`` returns (or the saved results JSON); the tasks are
    the leaf tasks of ``group`` or the given ``tasks``. Returns ``token_perplexity =
    exp(Σ NLL / Σ tokens)``, ``byte_perplexity = exp(Σ NLL / Σ bytes)``, ``bits_per_byte =
    Σ NLL / (Σ bytes · ln 2)``, ``word_perplexity = exp(Σ NLL / Σ words)``, and the sums.
    """
    if (group is None) == (tasks is None):
        raise RegionsError("pooled_perplexity needs exactly one of group= or tasks=")
    names = _leaf_tasks(results, group) if group is not None else list(tasks)
    res = results["results"]
    tot = dict.fromkeys(SUM_METRICS, 0.0)
    for t in names:
        if t not in res:
            raise RegionsError(f"task '{t}' is not in the results (have {sorted(res)})")
        for m in SUM_METRICS:
            key = f"{m},{filter_name}"
            if key not in res[t]:
                raise RegionsError(f"task '{t}' has no '{key}': not one of our perplexity tasks")
            tot[m] += float(res[t][key])
    nll = tot["nll_sum"]
    return {
        "token_perplexity": ppl_from_sums(nll, tot["token_count"]),
        "byte_perplexity": ppl_from_sums(nll, tot["byte_count"]),
        "bits_per_byte": nll / tot["byte_count"] / math.log(2),
        "word_perplexity": ppl_from_sums(nll, tot["word_count"]),
        "tasks": len(names),
        **tot,
    }
