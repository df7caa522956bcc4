"""ArabicMMLU helpers: local loader (official columns), paper 1's filter (answer not A) and
metrics (acc, mean probability of option A). The prompt is lm-eval's own arabicmmlu one."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import datasets
from lm_eval.tasks.arabicmmlu import utils as _lm_utils

from lmeval_regions.corpora import find_data_file
from lmeval_regions.errors import RegionsError
from lmeval_regions.tasks.mmlu.mcq import mc_results

COLUMNS = ["Question", "Context", "Answer Key", "Option 1", "Option 2", "Option 3",
           "Option 4", "Option 5", "Subject", "Level", "Country"]

doc_to_text = _lm_utils.doc_to_text
doc_to_choice = _lm_utils.doc_to_choice


def load_arabicmmlu(arabicmmlu_path: str | None = None, **_: Any) -> datasets.DatasetDict:
    """ArabicMMLU rows with the official columns, from a JSONL (default
    ``arabicmmlu_200.jsonl`` from the data folders) or an official CSV."""
    path = (Path(arabicmmlu_path).expanduser() if arabicmmlu_path
            else find_data_file("arabicmmlu_200.jsonl"))
    if not path.is_file():
        raise RegionsError(f"arabicmmlu_path '{arabicmmlu_path}' is not a file")
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix == ".csv":
            rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(l) for l in f if l.strip()]
    for n, r in enumerate(rows, 1):
        missing = [c for c in COLUMNS if c not in r]
        if missing:
            raise RegionsError(f"{path} row {n} lacks ArabicMMLU column(s) {missing}")
        for c in COLUMNS:
            r[c] = r[c] or ""  # hub/CSV use None or "" for empty options
    rows = [{c: r[c] for c in COLUMNS} for r in rows]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def answer_not_a(dataset: datasets.Dataset) -> datasets.Dataset:
    """Paper 1's variant: only questions whose answer is not A."""
    return dataset.filter(lambda d: d["Answer Key"].strip() != "A")


def process_results(doc: dict, results: list) -> dict[str, float]:
    gold = doc_to_choice(doc).index(doc["Answer Key"].strip())
    return mc_results([ll for ll, _ in results], gold)
