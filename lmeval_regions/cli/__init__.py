"""The ``lmeval-regions`` command line (top layer)."""

from lmeval_regions.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
