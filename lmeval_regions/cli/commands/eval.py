"""CLI subcommand that drives lm-eval: ``table`` (paper 1's Table 1 grid)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmeval_regions.errors import RegionsError


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RegionsError(f"--ratios '{text}' is not a comma-separated list of numbers "
                           "(e.g. 0.01,0.03)") from None


def _model_args(text: str | None) -> dict:
    if not text:
        return {}
    from lm_eval.utils import simple_parse_args_string

    return simple_parse_args_string(text)


def cmd_table(args: argparse.Namespace) -> int:
    from lmeval_regions.eval.grid import Condition, grid_conditions, run_grid

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    conditions = grid_conditions(methods, _floats(args.ratios), base=not args.no_base,
                                 intervention=args.intervention)
    for spec in args.regions or []:  # LABEL=PATH_OR_SPEC: extra, pre-made columns
        label, sep, target = spec.partition("=")
        if not sep or not target:
            raise RegionsError(f"--regions '{spec}' is not LABEL=REGION_FILE_OR_SPEC")
        conditions.append(Condition(label.strip(), region=target.strip(),
                                    intervention=args.intervention))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    table = run_grid(args.model, conditions, tasks, Path(args.out), importance=args.importance,
                     scope=args.scope, seed=args.seed, metric=args.metric,
                     model_args=_model_args(args.model_args), include_path=args.include_path,
                     limit=args.limit, batch_size=args.batch_size, device=args.device)
    print(table.markdown())
    print(f"written: {Path(args.out) / 'table.md'}, {Path(args.out) / 'table.json'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "table", help="run a model x regions x tasks grid through lm-eval; Table-1 layout",
        description="Evaluate Base and Top/Bottom/Random regions at each ratio (zeroed) on "
                    "lm-eval tasks; write OUT/table.md, OUT/table.json, OUT/results/*.json. "
                    "Example: lmeval-regions table --model gemma-3-270m --importance "
                    "core.safetensors --methods top,bottom,random --ratios 0.01,0.03 "
                    "--tasks udhr_ppl --out table1/")
    p.add_argument("--model", required=True, help="embedded name, folder or hub id")
    p.add_argument("--importance", help="importance artefact to select regions from")
    p.add_argument("--methods", default="top,bottom,random")
    p.add_argument("--ratios", default="0.01,0.03")
    p.add_argument("--scope", default="matrix", choices=["matrix", "row", "global"])
    p.add_argument("--seed", type=int, default=0, help="seed of the random regions")
    p.add_argument("--intervention", default="zero", help="zero (removal), scale:X, ...")
    p.add_argument("--regions", action="append", metavar="LABEL=REGION",
                   help="an extra column from a region file or entry spec (repeatable)")
    p.add_argument("--no-base", action="store_true", help="omit the Base column")
    p.add_argument("--tasks", required=True, help="comma-separated tasks or groups")
    p.add_argument("--metric", default="auto",
                   help="metric to tabulate (auto: token_perplexity, word_perplexity, ... acc)")
    p.add_argument("--include_path", help="an extra task folder (ours are always included)")
    p.add_argument("--model_args", help="extra hf model_args, e.g. dtype=bfloat16")
    p.add_argument("--limit", type=float, help="documents per task (lm-eval --limit)")
    p.add_argument("--batch_size", default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_table)

