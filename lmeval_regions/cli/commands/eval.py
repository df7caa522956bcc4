"""Subcommand that drives lm-eval: ``table`` (paper 1's Table 1 grid, or any grid)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmeval_regions.cli.main import Command, Files
from lmeval_regions.cli.options import config_inside
from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.eval.grid import LmEvalConfig
from lmeval_regions.models import ModelConfig
from lmeval_regions.regions import METHODS, SelectionConfig, check_ratio


@dataclass
class TableArgs:
    tasks: tuple[str, ...]
    """lm-eval tasks or groups, comma-separated (ours: udhr_ppl, udhr_ppl_<lang>, text_ppl,
    mmlu_local, arabicmmlu_filtered, xstorycloze_xl, ...)."""
    out: str
    """Output folder: table.md, table.json, results/*.json, regions/."""
    importance: str | None = None
    """Importance artefact to select the method x ratio regions from."""
    methods: tuple[str, ...] = ("top", "bottom", "random")
    """Selection methods of the columns made from --importance (top, bottom, middle, random)."""
    ratios: tuple[float, ...] = (0.01, 0.03)
    """Region sizes of the columns (per --scope unit)."""
    intervention: str = "zero"
    """Intervention applied to every region (zero = removal, scale:X, noise:STD, ...)."""
    regions: tuple[str, ...] = ()
    """Extra columns LABEL=REGION_FILE_OR_SPEC."""
    base: bool = True
    """Include the Base (unedited) column."""
    metric: str = "auto"
    """Metric to tabulate (auto: token_perplexity, word_perplexity, ..., acc)."""

    def __post_init__(self) -> None:
        from lmeval_regions.parsing import pairs

        if not self.tasks:
            raise RegionsError("--tasks names no task (e.g. --tasks udhr_ppl)")
        for m in self.methods:
            if m not in METHODS:
                raise RegionsError(f"--methods: '{m}' is not one of {METHODS}."
                                   + did_you_mean(m, METHODS))
        for r in self.ratios:
            check_ratio(r)
        if not self.importance and not self.regions and not self.base:
            raise RegionsError("nothing to evaluate: give --importance (method x ratio columns), "
                               "--regions LABEL=REGION, or keep the Base column")
        pairs(self.regions, what="--regions", form="LABEL=REGION",
              example="mine=region.safetensors")


def run_table(s: dict[str, Any]) -> int:
    from lmeval_regions.eval.grid import Condition, grid_conditions, run_grid
    from lmeval_regions.parsing import pairs

    args: TableArgs = s["args"]
    lm: LmEvalConfig = s["lm_eval"]
    model: ModelConfig = s["model"]
    sel: SelectionConfig = s["selection"]
    # method x ratio columns are selected from --importance; without it only --regions run
    methods = list(args.methods) if args.importance else []
    conditions = grid_conditions(methods, list(args.ratios), base=args.base,
                                 intervention=args.intervention)
    for label, target in pairs(args.regions, what="--regions", form="LABEL=REGION"):
        conditions.append(Condition(label, region=target, intervention=args.intervention))
    hf = model.hf_model_args()
    pretrained = hf.pop("pretrained")
    device = hf.pop("device", None)
    table = run_grid(pretrained, conditions, list(args.tasks), Path(args.out),
                     importance=args.importance, selection=sel, lm_eval_config=lm,
                     model_args=hf, metric=args.metric, device=device)
    print(table.markdown())
    print(f"written: {Path(args.out) / 'table.md'}, {Path(args.out) / 'table.json'}")
    return 0


def _table_files(s: dict[str, Any]) -> Files:
    from lmeval_regions.parsing import pairs

    args: TableArgs = s["args"]
    regions = [t for _, t in pairs(args.regions, what="--regions", form="LABEL=REGION")
               if t.endswith(".safetensors")]
    return Files(inputs=[*([args.importance] if args.importance else []), *regions],
                 folders=[args.out], model=s["model"])


COMMANDS = [
    Command("table", "run a model x regions x tasks grid through lm-eval; Table-1 layout",
            "Evaluate Base and Top/Bottom/Random regions at each ratio (zeroed) on lm-eval\n"
            "tasks; write OUT/table.md, OUT/table.json, OUT/results/*.json. The model is\n"
            "loaded once; each condition is applied and restored bit-exactly.\n\n"
            "examples:\n"
            "  lmeval-regions table --model gemma-3-270m --importance core.safetensors \\\n"
            "      --methods top,bottom,random --ratios 0.01,0.03 --tasks udhr_ppl \\\n"
            "      --model-args add_bos_token=False --out table1/\n"
            "  lmeval-regions table --model PATH --regions mine=region.safetensors --tasks "
            "text_ppl \\\n      --metadata '{\"text_path\": \"/data/x.jsonl\"}' --out t/",
            [("model", ModelConfig), ("lm_eval", LmEvalConfig), ("selection", SelectionConfig),
             ("args", TableArgs)], run_table, lambda s: config_inside(s["args"].out),
            _table_files),
]
