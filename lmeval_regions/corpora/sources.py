"""Corpus sources: where documents come from, read lazily one row at a time.

A source is named by one string (``--texts``):

===========================  ====================================================================
``/d/x.jsonl`` (``.json``)   JSON lines; the text in ``text_field``, language in ``lang_field``
``/d/x.csv``, ``/d/x.tsv``   a table with a header row; the same columns
``/d/x.parquet``             a Parquet table; the same columns (read in row groups)
``/d/x.txt`` (any other)     plain text: one document per non-empty line (``text_unit=line``)
                             or the whole file (``text_unit=file``)
``/d/folder``                every ``*.txt`` below it (sorted), each read as above; a folder
                             written by ``datasets``' ``save_to_disk`` is read with
                             ``load_from_disk`` instead (``/d/folder@SPLIT`` picks a split)
``hf:NAME[:CONFIG][@SPLIT]`` ``datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)``
                             (default split ``train``): a hub dataset, needs internet
===========================  ====================================================================

Rows are ``(id, lang, text)``: ``id`` is the row's ``id`` column where it has one, else
``NAME:N`` (file name and 1-based line or row number); ``lang`` is None without a language
column. Nothing is read whole: files are iterated line by line or row group by row group,
``datasets`` folders are memory-mapped and read in slices, hub datasets are streamed.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lmeval_regions.artefacts import file_digest
from lmeval_regions.errors import RegionsError, did_you_mean

Row = tuple[str, "str | None", str]
"""``(id, lang, text)`` of one document."""

SourceKind = str  # jsonl | csv | tsv | parquet | txt | txt-dir | disk | hub
TABLE_KINDS = ("jsonl", "csv", "tsv", "parquet", "disk", "hub")
"""Kinds with named columns (``text_field``/``lang_field`` apply)."""
DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
"""Files ``datasets``' ``save_to_disk`` writes (one of them marks a ``load_from_disk`` folder)."""
SLICE = 256
"""Rows per slice read from Parquet and ``datasets`` tables."""


@dataclass(frozen=True)
class Source:
    """One parsed source string (see the module docstring)."""

    spec: str
    """The string as given."""
    kind: SourceKind
    """``jsonl``, ``csv``, ``tsv``, ``parquet``, ``txt``, ``txt-dir``, ``disk`` or ``hub``."""
    path: Path | None = None
    """File or folder (None for hub datasets)."""
    name: str | None = None
    """Hub dataset name (``hf:`` sources)."""
    config: str | None = None
    """Hub dataset configuration."""
    split: str | None = None
    """Split of a hub dataset or of a saved ``DatasetDict``."""

    @property
    def is_table(self) -> bool:
        return self.kind in TABLE_KINDS


def parse_source(spec: str, what: str = "--texts") -> Source:
    """A :class:`Source` from its string; local paths are checked to exist. ``what`` names the
    option in errors."""
    spec = str(spec).strip()
    if spec.startswith("hf:"):
        rest = spec[3:]
        rest, _, split = rest.rpartition("@") if "@" in rest else (rest, "", "train")
        name, _, config = rest.partition(":")
        if not name or not split:
            raise RegionsError(f"{what} '{spec}' is not hf:NAME[:CONFIG][@SPLIT] "
                               "(e.g. hf:wikimedia/wikipedia:20231101.ar@train)")
        return Source(spec, "hub", name=name, config=config or None, split=split)
    path = Path(os.path.expanduser(spec))
    split = None
    if not path.exists() and "@" in spec:
        base, _, split = spec.rpartition("@")
        path = Path(os.path.expanduser(base))
        if not (path.is_dir() and _is_disk_dataset(path)):
            raise RegionsError(f"{what} '{spec}': '{base}' is not a folder saved by datasets' "
                               "save_to_disk (PATH@SPLIT picks a split of one)")
    if path.is_dir():
        if _is_disk_dataset(path):
            return Source(spec, "disk", path=path, split=split)
        return Source(spec, "txt-dir", path=path)
    if not path.is_file():
        raise RegionsError(
            f"{what} '{spec}' is not a file or folder; expected a JSONL/CSV/TSV/Parquet/TXT "
            "file, a folder of .txt files or a datasets save_to_disk folder, hf:NAME[:CONFIG]"
            "[@SPLIT], or LANG=SOURCE pairs (ar=/data/ar.txt,es=/data/es.txt)")
    suffix = path.suffix.lower()
    kind = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet"}.get(suffix, "txt")
    return Source(spec, kind, path=path)


def _is_disk_dataset(path: Path) -> bool:
    return any((path / m).is_file() for m in DISK_MARKERS)


# ----------------------------------------------------------------------------- fingerprints

def _local_root(src: Source) -> Path | None:
    """The file or folder holding a source's data (``hf:`` may name a local folder too)."""
    if src.path is not None:
        return src.path
    return Path(src.name) if src.name and Path(src.name).exists() else None


def _files(src: Source, root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if src.kind == "txt-dir":
        return _txt_files(root)
    return sorted((p for p in root.rglob("*") if p.is_file()),
                  key=lambda p: p.relative_to(root).as_posix())


def fingerprint(src: Source) -> dict[str, Any]:
    """What identifies the source's content: ``{"sha256"}`` of a file, ``{"sha256", "files"}``
    of a folder (the sha256 of its sorted ``relative name, file sha256`` lines); a hub
    dataset adds ``hub``, ``config``, ``split`` and, when the hub answers, its commit
    (``revision``). Files are read in chunks, once per file state (size, modification time)."""
    root = _local_root(src)
    if root is None:
        return dict(_fingerprint(src, None))
    state = tuple((p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in _files(src, root))
    return dict(_fingerprint(src, state))


@functools.lru_cache(maxsize=32)
def _fingerprint(src: Source, _state: tuple | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if src.kind == "hub":
        out.update(hub=src.name, config=src.config, split=src.split)
    root = _local_root(src)
    if root is None:
        try:  # the dataset's commit on the hub, the closest thing to a digest of its data
            from huggingface_hub import HfApi

            out["revision"] = HfApi().dataset_info(src.name).sha
        except Exception:  # offline, a script, a hub error: recorded as unknown, not fatal
            out["revision"] = None
        return out
    if root.is_file():
        return {**out, "sha256": file_digest(root)}
    files = _files(src, root)
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{file_digest(p)}\n".encode())
    return {**out, "sha256": h.hexdigest(), "files": len(files)}


# ----------------------------------------------------------------------------- rows

def _txt_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.rglob("*.txt") if p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise RegionsError(f"folder '{folder}' holds no .txt files (and is not a datasets "
                           "save_to_disk folder)")
    return files


def _txt_rows(path: Path, name: str, text_unit: str) -> Iterator[Row]:
    with open(path, encoding="utf-8") as f:
        if text_unit == "file":
            text = f.read()
            if not text.strip():
                raise RegionsError(f"{path} is empty: a document needs text (text_unit=file "
                                   "reads each file as one document)")
            yield name, None, text
            return
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():  # blank lines separate documents; they are not documents
                yield f"{name}:{n}", None, line


class _Columns:
    """Which columns of a table are read, resolved on its column names."""

    def __init__(self, src: Source, names: list[str], text_field: str, lang_field: str | None):
        if text_field not in names:
            raise RegionsError(f"{src.spec} has no column '{text_field}' (--text-field)."
                               + did_you_mean(text_field, names) + f" Columns: {names}")
        if lang_field is not None and lang_field not in names:
            raise RegionsError(f"{src.spec} has no column '{lang_field}' (--lang-field)."
                               + did_you_mean(lang_field, names) + f" Columns: {names}")
        self.text = text_field
        # without --lang-field, a column named "lang" (the UDHR's) is the language column
        self.lang = lang_field if lang_field is not None else ("lang" if "lang" in names else None)
        self.id = "id" if "id" in names else None
        self.names = [c for c in (self.text, self.lang, self.id) if c is not None]

    def row(self, where: str, default_id: str, r: dict) -> Row:
        """``(id, lang, text)`` of row ``r``; ``where`` names it in errors."""
        text = r.get(self.text)
        if not isinstance(text, str) or not text.strip():
            raise RegionsError(f"{where}: column '{self.text}' is {text!r}; every row needs a "
                               "non-empty text")
        lang = r.get(self.lang) if self.lang else None
        if self.lang and not isinstance(lang, str):
            raise RegionsError(f"{where}: language column '{self.lang}' is {lang!r}, expected a "
                               "language code")
        rid = str(r[self.id]) if self.id and r.get(self.id) is not None else default_id
        return rid, lang, text


def _jsonl_rows(src: Source, text_field: str, lang_field: str | None) -> Iterator[Row]:
    cols = None
    with open(src.path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise RegionsError(f"{src.path}:{n} is not a JSON row: {e}") from None
            if not isinstance(r, dict):
                raise RegionsError(f"{src.path}:{n} is a JSON {type(r).__name__}, expected an "
                                   "object with a text field")
            if cols is None:  # the first row names the columns
                cols = _Columns(src, list(r), text_field, lang_field)
            yield cols.row(f"{src.path}:{n}", f"{src.path.name}:{n}", r)


def _csv_rows(src: Source, text_field: str, lang_field: str | None) -> Iterator[Row]:
    # a long document is a long field: lift csv's 128 KiB default (process-wide, harmless)
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2 ** 31 - 1)))
    with open(src.path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if src.kind == "tsv" else ",")
        if not reader.fieldnames:
            raise RegionsError(f"{src.path} has no header row (expected column names, one of "
                               f"them '{text_field}')")
        cols = _Columns(src, list(reader.fieldnames), text_field, lang_field)
        for n, r in enumerate(reader, 2):  # line 1 is the header
            yield cols.row(f"{src.path}:{n}", f"{src.path.name}:{n}", r)


def _parquet_rows(src: Source, text_field: str, lang_field: str | None) -> Iterator[Row]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src.path)
    cols = _Columns(src, list(pf.schema_arrow.names), text_field, lang_field)
    n = 0
    for batch in pf.iter_batches(batch_size=SLICE, columns=cols.names):
        for r in batch.to_pylist():
            n += 1
            yield cols.row(f"{src.path} row {n}", f"{src.path.name}:{n}", r)


def _disk_rows(src: Source, text_field: str, lang_field: str | None) -> Iterator[Row]:
    import datasets

    ds = datasets.load_from_disk(str(src.path))  # memory-mapped Arrow: nothing read yet
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        split = src.split or (splits[0] if len(splits) == 1 else None)
        if split not in ds:
            raise RegionsError(f"{src.path} holds the splits {splits}; pick one with "
                               f"--texts {src.path}@SPLIT." + (did_you_mean(src.split, splits)
                                                                 if src.split else ""))
        ds = ds[split]
    elif src.split is not None:
        raise RegionsError(f"{src.path} is one dataset, not a DatasetDict: drop '@{src.split}'")
    cols = _Columns(src, list(ds.column_names), text_field, lang_field)
    n = 0
    for block in ds.select_columns(cols.names).iter(batch_size=SLICE):
        for i in range(len(block[cols.text])):
            n += 1
            yield cols.row(f"{src.spec} row {n}", f"{src.path.name}:{n}",
                           {c: block[c][i] for c in cols.names})


def _hub_rows(src: Source, text_field: str, lang_field: str | None) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.split, streaming=True)
    except Exception as e:  # no network, no such dataset/config/split: name what was asked
        raise RegionsError(f"--texts {src.spec}: datasets.load_dataset({src.name!r}, "
                           f"{src.config!r}, split={src.split!r}, streaming=True) failed: "
                           f"{type(e).__name__}: {e}") from None
    cols = None
    for n, r in enumerate(ds, 1):
        if cols is None:
            cols = _Columns(src, list(r), text_field, lang_field)
        yield cols.row(f"{src.spec} row {n}", f"{src.name}:{n}", r)


def iter_rows(src: Source, text_field: str = "text", lang_field: str | None = None,
              text_unit: str = "line") -> Iterator[Row]:
    """The source's rows ``(id, lang, text)`` in order, read lazily. ``lang`` is None when the
    source has no language column (plain text; a table without ``lang_field`` nor ``lang``)."""
    try:
        yield from _rows(src, text_field, lang_field, text_unit)
    except UnicodeDecodeError as e:
        raise RegionsError(f"{src.spec} is not UTF-8 text: {e}") from None


def _rows(src: Source, text_field: str, lang_field: str | None, text_unit: str
          ) -> Iterator[Row]:
    if src.kind == "txt":
        yield from _txt_rows(src.path, src.path.name, text_unit)
    elif src.kind == "txt-dir":
        for p in _txt_files(src.path):
            yield from _txt_rows(p, p.relative_to(src.path).as_posix(), text_unit)
    else:
        reader = {"jsonl": _jsonl_rows, "csv": _csv_rows, "tsv": _csv_rows,
                  "parquet": _parquet_rows, "disk": _disk_rows, "hub": _hub_rows}[src.kind]
        yield from reader(src, text_field, lang_field)


def has_lang_column(src: Source, text_field: str = "text", lang_field: str | None = None) -> bool:
    """Whether the source's rows carry a language (reads its first row only)."""
    if not src.is_table:
        return False
    for _, lang, _ in iter_rows(src, text_field, lang_field):
        return lang is not None
    raise RegionsError(f"{src.spec} holds no rows")
