"""Paper 1's generation case studies: fixed prompts, greedy continuation, outputs kept in the
logged samples (``--log_samples``)."""

from __future__ import annotations

from typing import Any

import datasets

PROMPTS = [
    {"id": "days_in_year", "prompt": "There are 365 days in a year and 12"},
    {"id": "fudan", "prompt": "Fudan University is located in"},
]


def load_prompts(**_: Any) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(PROMPTS)})


def process_results(doc: dict, results: list) -> dict[str, Any]:
    """Output-only: lm-eval's ``bypass`` metric; the text is in the logged samples."""
    return {"bypass": results[0]}

