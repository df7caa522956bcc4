"""MMLU helpers: local data loaders (our JSONL, hendrycks CSV layout) and the metrics of paper 1
(accuracy and the mean probability of option A, normalised over the options)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import datasets

from lmeval_regions.corpora import find_data_file
from lmeval_regions.errors import RegionsError

LETTERS = ["A", "B", "C", "D", "E"]


def option_probs(logliks: list[float]) -> list[float]:
    """Softmax of the options' log-likelihoods (probabilities normalised over the options)."""
    m = max(logliks)
    e = [math.exp(x - m) for x in logliks]
    s = sum(e)
    return [x / s for x in e]


def mc_results(logliks: list[float], gold: int) -> dict[str, float]:
    """``acc`` (argmax = gold) and ``prob_a`` (normalised probability of the first option)."""
    return {"acc": float(max(range(len(logliks)), key=logliks.__getitem__) == gold),
            "prob_a": option_probs(logliks)[0]}


def _read_hendrycks_csv(path: Path) -> list[dict]:
    subject = path.stem.removesuffix("_test").removesuffix("_dev").removesuffix("_val")
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for n, rec in enumerate(csv.reader(f), 1):
            if len(rec) != 6 or rec[5].strip() not in LETTERS[:4]:
                raise RegionsError(f"{path}:{n}: expected hendrycks columns question,A,B,C,D,"
                                   f"answer-letter, got {len(rec)} fields")
            rows.append({"question": rec[0], "subject": subject, "choices": rec[1:5],
                         "answer": LETTERS.index(rec[5].strip())})
    return rows


def load_mmlu(mmlu_path: str | None = None, **_: Any) -> datasets.DatasetDict:
    """MMLU test questions as cais/mmlu rows ``{question, subject, choices, answer(int)}``.

    ``mmlu_path``: a JSONL with ``question, A..D, answer`` (letter), ``subject`` (default
    ``mmlu_test200.jsonl`` from the data folders), a hendrycks ``*_test.csv``, or a folder of
    them (``data/test/`` of the original release, or its parent)."""
    path = Path(mmlu_path).expanduser() if mmlu_path else find_data_file("mmlu_test200.jsonl")
    if path.is_dir():
        files = sorted((path / "test").glob("*_test.csv")) or sorted(path.glob("*_test.csv"))
        if not files:
            raise RegionsError(f"mmlu_path '{path}' holds no *_test.csv (hendrycks layout)")
        rows = [r for f in files for r in _read_hendrycks_csv(f)]
    elif path.suffix == ".csv":
        rows = _read_hendrycks_csv(path)
    elif path.is_file():
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    rows.append({"question": r["question"], "subject": r["subject"],
                                 "choices": [r[k] for k in LETTERS[:4]],
                                 "answer": LETTERS.index(r["answer"])})
                except (json.JSONDecodeError, KeyError, ValueError) as e:
                    raise RegionsError(f"{path}:{n}: expected question, A..D, answer letter, "
                                       f"subject ({e!r})") from None
    else:
        raise RegionsError(f"mmlu_path '{mmlu_path}' does not exist")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def doc_to_text(doc: dict) -> str:
    """lm-eval's MMLU prompt (its description line, then question, options, "Answer:")."""
    subject = doc["subject"].replace("_", " ")
    opts = "\n".join(f"{l}. {c}" for l, c in zip(LETTERS, doc["choices"]))
    return (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            f"{doc['question'].strip()}\n{opts}\nAnswer:")


def process_results(doc: dict, results: list) -> dict[str, float]:
    return mc_results([ll for ll, _ in results], int(doc["answer"]))
