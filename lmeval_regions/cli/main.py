"""``lmeval-regions``: a thin command line over the library.

Each subcommand lives beside the code it drives: a module listed in :data:`COMMANDS` exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking the
parsed ``argparse.Namespace``. Library errors (:class:`RegionsError`) print as one line and
exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmeval_regions import __version__
from lmeval_regions.errors import RegionsError

# module (relative to lmeval_regions) -> its subcommands are registered by module.register()
COMMANDS = [
    "core",     # model-path, importance, extract, setop, stats, monolingual, apply
    "eval",     # table
    "dims",     # dims-report, dims, outliers, plot-region
    "data",     # fetch-udhr, tasks-path
    "neurons",  # activations, neurons, neuron-sweep (paper 2)
    "demo",     # demo (paper 1 end to end)
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmeval-regions",
        description="Find, inspect, ablate and protect the linguistic regions of LLMs. "
                    "Flow: importance -> extract (regions) -> lm_eval with --model hf-regions.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in COMMANDS:
        importlib.import_module(f"lmeval_regions.cli.commands.{mod}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out = args.func(args)
    except RegionsError as e:
        print(f"lmeval-regions {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(out or 0)


if __name__ == "__main__":
    sys.exit(main())
