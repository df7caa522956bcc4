"""Helpers shared by the lm-eval tests: a minimal local perplexity task in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

TASK = "tiny_ppl"


def write_ppl_task(folder: Path, texts: list[str], name: str = TASK) -> Path:
    """A ``loglikelihood_rolling`` task ``name`` over ``texts`` (local JSONL, absolute path)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\n"
        "doc_to_target: '{{text}}'\n"
        "should_decontaminate: false\n"
        "metric_list:\n"
        "  - metric: word_perplexity\n"
        "  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
    )
    return folder


def udhr_texts(shared_data: Path, langs=("en", "fr"), n: int = 2) -> list[str]:
    from lmeval_regions.corpora import load_parallel

    data = load_parallel(shared_data / "udhr_parallel_31.jsonl", list(langs))
    return [u["text"][:400] for lang in langs for u in data[lang][:n]]


def sample_loglikelihoods(results: dict, task: str = TASK) -> list[float]:
    """Per-document rolling log-likelihoods from ``log_samples`` output, in document order."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [float(s["filtered_resps"][0] if not isinstance(s["filtered_resps"][0], (list, tuple))
                  else s["filtered_resps"][0][0]) for s in samples]
