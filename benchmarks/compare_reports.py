"""Compare the numbers of two ``lmeval-regions demo`` reports (``report.json``), e.g. the default
run against ``--eval-batch-size 1`` (the plain per-condition batch size), and write JSON:

* per table and column, the largest relative difference of its perplexity cells (0: the same
  bits) and the number of cells;
* the report's ``pattern`` section: whether every count (verdict) is equal, and the largest
  relative and absolute differences of its derived values (``increase`` fractions).

    python benchmarks/compare_reports.py reports/demo/report.json /tmp/demo_b1/report.json \
        --out benchmarks/results/compare_reports.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _rel(a: float, b: float) -> float:
    return 0.0 if a == b else abs(a - b) / max(abs(a), abs(b))


def _numbers(x, path: str = ""):
    """(path, value) of every number under ``x`` (dicts and lists walked in order)."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


def compare(a: dict, b: dict) -> dict:
    out: dict = {"tables": {}}
    for table in ("table1", "monolingual"):
        ca, cb = a[table]["cells"], b[table]["cells"]
        if ca.keys() != cb.keys():
            raise SystemExit(f"{table}: the reports have different rows")
        cols: dict = {}
        for row, cells in ca.items():
            if cells.keys() != cb[row].keys():
                raise SystemExit(f"{table}: row {row} has different columns")
            for col, v in cells.items():
                c = cols.setdefault(col, {"cells": 0, "max_rel_diff": 0.0})
                c["cells"] += 1
                c["max_rel_diff"] = max(c["max_rel_diff"], _rel(v, cb[row][col]))
        out["tables"][table] = cols
    pa, pb = dict(_numbers(a["pattern"])), dict(_numbers(b["pattern"]))
    if pa.keys() != pb.keys():
        raise SystemExit("the reports' pattern sections differ in shape")
    counts = [p for p, v in pa.items() if isinstance(v, int)]
    derived = [p for p, v in pa.items() if isinstance(v, float)]
    worst_rel = max(derived, key=lambda p: _rel(pa[p], pb[p]), default=None)
    worst_abs = max(derived, key=lambda p: abs(pa[p] - pb[p]), default=None)
    out["pattern"] = {
        "counts": len(counts), "counts_equal": all(pa[p] == pb[p] for p in counts),
        "derived": len(derived),
        "worst_rel": None if worst_rel is None else
        {"path": worst_rel, "a": pa[worst_rel], "b": pb[worst_rel],
         "rel_diff": _rel(pa[worst_rel], pb[worst_rel])},
        "worst_abs": None if worst_abs is None else
        {"path": worst_abs, "a": pa[worst_abs], "b": pb[worst_abs],
         "abs_diff": abs(pa[worst_abs] - pb[worst_abs])}}
    cells = [c for t in out["tables"].values() for c in t.values()]
    out["cells"] = sum(c["cells"] for c in cells)
    out["max_rel_diff"] = max((c["max_rel_diff"] for c in cells), default=0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="a demo report.json")
    ap.add_argument("b", type=Path, help="another demo report.json (same languages, columns)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    for p in (args.a, args.b):
        if not p.is_file():
            raise SystemExit(f"{p}: no such report (expected a demo's report.json)")
    got = {"a": str(args.a), "b": str(args.b),
           **compare(json.loads(args.a.read_text()), json.loads(args.b.read_text()))}
    text = json.dumps(got, indent=2)
    print(text)
    if args.out is not None:
        from lmeval_regions.artefacts.atomic import write_text_atomic

        write_text_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
