"""Subcommands of the studies beyond the demo: ``robustness`` (how stable the regions are
across criteria, corpus halves and sample counts) and ``further-pretrain`` (paper 1 §3.5 and
Table 2: training with the core region free, frozen, soft or removed)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmeval_regions.cli.main import Command, Files
from lmeval_regions.cli.options import config_inside
from lmeval_regions.corpora import CorpusConfig, HeldOutConfig
from lmeval_regions.models import ModelConfig
from lmeval_regions.studies.further_pretrain import FurtherPretrainConfig, run_further_pretrain
from lmeval_regions.studies.robustness import RobustnessConfig, run_robustness

MODEL = ("model", ModelConfig)
CORPUS = ("corpus", CorpusConfig)
HELDOUT = ("heldout", HeldOutConfig)


def run_robustness_command(s: dict[str, Any]) -> int:
    from lmeval_regions.models import load_model

    corpus: CorpusConfig = s["corpus"]
    held: HeldOutConfig = s["heldout"]
    cfg: RobustnessConfig = replace(s["robustness"], eval_max_length=corpus.max_length,
                                    eval_batch_size=corpus.batch_size)
    texts = {lang: [u["text"] for u in units] for lang, units in corpus.load().items()}
    heldout = held.texts(corpus) if cfg.evaluate else None
    model, tok = load_model(s["model"])
    report = run_robustness(model, tok, texts, heldout, cfg, corpus.batch_size,
                            corpus.max_length)
    print(f"report: {cfg.out}/report.md ({len(report.get('variants', []))} variants)")
    return 0


def run_further_pretrain_command(s: dict[str, Any]) -> int:
    import json

    result = run_further_pretrain(s["recipe"], s["corpus"], s["heldout"], s["model"])
    print(json.dumps({r["mode"]: r["curve"][-1]["ppl"] for r in result["runs"]}, indent=1))
    return 0


COMMANDS = [
    Command("robustness", "how stable regions are across criteria, corpus halves, samples",
            "Compute importance variants (criteria x full corpus / disjoint halves x snapshots;\n"
            "every gradient criterion of a corpus half in one pass), the Jaccard of their Top\n"
            "regions per ratio, layer and module, and each variant's Table-1 effect (Top /\n"
            "Random / Bottom removal, held-out perplexity), as report.md + report.json + PNGs.\n\n"
            "example: lmeval-regions robustness --criteria sum_abs,abs_sum,fisher,magnitude,"
            "wanda \\\n             --ratios 0.01 --eval-units 4 --out reports/robustness",
            [MODEL, CORPUS, HELDOUT, ("robustness", RobustnessConfig)], run_robustness_command,
            lambda s: config_inside(s["robustness"].out),
            lambda s: Files(folders=[s["robustness"].out])),
    Command("further-pretrain", "further pre-training with the core region free, frozen, "
            "soft or removed",
            "Paper 1 §3.5 (Fig. 5/6) and Table 2 on one language: each mode trains from the same\n"
            "weights on the same batches (AdamW, weight decay, clipping) with the core region\n"
            "(Top --ratio per matrix of the corpus languages' summed importance) free, frozen\n"
            "(bit-identical), soft (scaled/clamped updates), or zeroed first and then frozen or\n"
            "free; target and non-target held-out perplexity at checkpoints: result.json and\n"
            "curves.png.\n\n"
            "example: lmeval-regions further-pretrain --model smollm2-135m --lang ar \\\n"
            "             --modes full,freeze,soft --steps 12 --max-length 128 \\\n"
            "             --eval-langs ar,en,zh,es,ru --out runs/fpt_ar",
            [MODEL, CORPUS, HELDOUT, ("recipe", FurtherPretrainConfig)],
            run_further_pretrain_command, lambda s: config_inside(s["recipe"].out),
            lambda s: Files(inputs=[p for p in (s["recipe"].region, s["recipe"].bottom_region)
                                    if p],
                            folders=[s["recipe"].out], model=s["model"])),
]
