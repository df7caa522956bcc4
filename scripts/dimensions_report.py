"""Dimensional-dependence report (paper 1 §3.3): same as `lmeval-regions dims-report`.

    OMP_NUM_THREADS=1 nice -n 10 python scripts/dimensions_report.py --out reports/dims-gemma
"""

import argparse
import sys

from lmeval_regions import commands_dims
from lmeval_regions.errors import RegionsError

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="dimensions_report")
    sub = parser.add_subparsers(dest="command")
    commands_dims.register(sub)
    args = parser.parse_args(["dims-report", *sys.argv[1:]])
    try:
        sys.exit(args.func(args))
    except RegionsError as e:
        print(f"dimensions_report: error: {e}", file=sys.stderr)
        sys.exit(2)
