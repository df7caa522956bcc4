"""Subcommand ``demo``: paper 1 end to end on the embedded default (see
:mod:`lmeval_regions.studies.demo`)."""

from __future__ import annotations

from typing import Any

from lmeval_regions.cli.main import Command, Files
from lmeval_regions.cli.options import config_inside
from lmeval_regions.corpora import CorpusConfig
from lmeval_regions.importance import ImportanceConfig
from lmeval_regions.models import ModelConfig
from lmeval_regions.studies.demo import DemoConfig, quick_corpus, run_demo


def run(s: dict[str, Any]) -> int:
    if s["demo"].quick:  # the saved config then holds the sizes that ran
        s["corpus"] = quick_corpus(s["corpus"])
    run_demo(s["model"], s["corpus"], s["demo"], s["importance"])
    return 0


COMMANDS = [
    Command("demo", "paper 1 end to end on the embedded default, with a report",
            "Reproduce paper 1 on a real model, offline: importance over ar/es/ru/zh/ko/vi,\n"
            "Top/Bottom/Random regions zeroed and evaluated by lm-eval on 31 languages,\n"
            "monolingual regions (Eq. 5), and a report folder (report.md, PNG plots,\n"
            "report.json, commands.sh, config.yaml). Cached: a second run reuses what is done.\n"
            "About 10 minutes on 2 CPU cores; --quick 3-5 (docs/speed.md).\n\n"
            "examples:\n"
            "  lmeval-regions demo\n"
            "  lmeval-regions demo --quick --out reports/demo-quick\n"
            "  lmeval-regions demo --model smollm2-135m --langs ar,es,ru --eval-langs paper2",
            [("model", ModelConfig), ("corpus", CorpusConfig), ("importance", ImportanceConfig),
             ("demo", DemoConfig)], run,
            lambda s: config_inside(s["demo"].out), lambda s: Files(folders=[s["demo"].out])),
]
