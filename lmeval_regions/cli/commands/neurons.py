"""Subcommands of paper 2's neuron analysis: ``activations``, ``neurons`` (similarity,
LRDS/SADS, key neurons, LAPE, deactivation table, report) and ``neuron-sweep`` (the same
metrics over several models or revisions)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from lmeval_regions.activations import ActivationConfig
from lmeval_regions.cli.main import Command, Files
from lmeval_regions.cli.options import config_beside, config_inside
from lmeval_regions.corpora import CorpusConfig, HeldOutConfig
from lmeval_regions.errors import RegionsError
from lmeval_regions.models import ModelConfig
from lmeval_regions.neurons import NeuronAnalysisConfig
from lmeval_regions.paper import LAPE_RELEASE_LANGS

MODEL = ("model", ModelConfig)
CORPUS = ("corpus", CorpusConfig)
HELDOUT = ("heldout", HeldOutConfig)
CAPTURE = ("capture", ActivationConfig)
ANALYSIS = ("analysis", NeuronAnalysisConfig)


def _progress(label: str):
    t0 = time.time()

    def show(done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total} samples ({time.time() - t0:.0f}s)", end="",
              file=sys.stderr, flush=True)
        if done == total:
            print(file=sys.stderr)
    return show


def _capture_config(s: dict[str, Any]) -> ActivationConfig:
    """The capture settings, batched and truncated as the corpus says."""
    corpus: CorpusConfig = s["corpus"]
    return replace(s["capture"], batch_size=corpus.batch_size, max_length=corpus.max_length)


@dataclass
class ActivationsArgs:
    out: str
    """Activation artefact (.safetensors): per sample, the mean MLP neuron activation of every
    layer (and the fraction of tokens where each neuron is active, for LAPE)."""


def run_activations(s: dict[str, Any]) -> int:
    from lmeval_regions.activations import capture
    from lmeval_regions.models import launched, load_model

    corpus: CorpusConfig = s["corpus"]
    data = corpus.load()
    # Under accelerate launch / torchrun: batches round-robin over the ranks, rank 0 writes.
    with launched(s["model"].resolved_device(), s["model"].device_map) as dp:
        model, tok = load_model(s["model"])
        main = dp is None or dp.main
        if dp is not None:
            print(f"[activations] rank {dp.rank} of {dp.world_size}: batches i with "
                  f"i % {dp.world_size} == {dp.rank} (round-robin)", flush=True)
        meta = capture(model, tok, data, s["args"].out, _capture_config(s),
                       _progress("activations") if main else None)
    if main:
        print(f"wrote {s['args'].out}: {len(meta['languages'])} languages x {corpus.units} "
              f"units, {len(meta['layers'])} layers x {meta['neurons']} neurons")
    return 0


@dataclass
class NeuronsArgs:
    out: str
    """Report folder: README.md, neurons.json, PNGs, neurons.safetensors (the key-neuron, random
    and LAPE sets, usable by hf-regions neurons=...), activations.safetensors."""
    activations: str | None = None
    """Reuse this activation artefact instead of capturing the corpus."""
    table: bool = True
    """Build the deactivation table over --eval-langs (paper 2 Table 1)."""
    mode: str = "zero"
    """How deactivated neurons are changed: zero, scale:X, mean or noise:STD[/SEED]."""
    random_rows: bool = False
    """Also deactivate the equal-size random sets (doubles the table time)."""
    ppl: Literal["direct", "lm-eval"] = "direct"
    """Perplexity by direct forward passes, or through lm-eval (hf-regions + udhr_ppl_<lang>)."""


def run_neurons(s: dict[str, Any]) -> int:
    from lmeval_regions import neurons as N
    from lmeval_regions.activations import Activations, capture
    from lmeval_regions.models import load_model
    from lmeval_regions.studies.neuron_report import analyse, write_report

    args: NeuronsArgs = s["args"]
    corpus: CorpusConfig = s["corpus"]
    held: HeldOutConfig = s["heldout"]
    out = Path(args.out)
    data = None if args.activations else corpus.load()
    table_langs = list(held.langs(corpus)) if args.table else []
    texts = held.texts(corpus, table_langs) if table_langs else {}
    model, tok = load_model(s["model"])
    acts_path = Path(args.activations) if args.activations else out / "activations.safetensors"
    if data is not None:
        capture(model, tok, data, acts_path, _capture_config(s), _progress("activations"))
    acts = Activations.load(acts_path, model=model)
    result, ns = analyse(acts, model, s["analysis"])
    ns_path = out / "neurons.safetensors"
    ns.save(ns_path)
    print(f"LRDS={result['lrds']:.4f} SADS={result['sads']:.4f} SKLR={result['sklr']}")
    table = None
    if table_langs:
        missing = [l for l in table_langs if l not in acts.languages]
        if missing:
            raise RegionsError(f"--eval-langs {missing} were not captured (--langs "
                               f"{','.join(acts.languages)})")
        if args.ppl == "lm-eval":
            from lmeval_regions.eval.runs import lm_eval_ppl

            ppl = lm_eval_ppl(s["model"].path(), str(ns_path), args.mode,
                              limit=held.eval_units)
        else:
            ppl = N.direct_ppl(model, tok, ns, texts, args.mode, corpus.max_length)
        rows = table_langs + ([f"random-{l}" for l in table_langs] if args.random_rows else [])
        t0 = time.time()
        table = N.deactivation_table(ppl, rows, table_langs)
        summary = table["summary"]
        print(f"deactivation table: {len(rows)} rows x {len(table_langs)} languages in "
              f"{time.time() - t0:.0f}s; diagonal > mean off-diagonal for "
              f"{summary['diagonal_exceeds_count']} of {summary['rows_compared']} languages")
    write_report(out, result, acts, table, model=s["model"].model)
    print(f"report: {out / 'README.md'}")
    return 0


@dataclass
class SweepArgs:
    out: str
    """Output folder: sweep.json, sweep.md and each model's activations."""
    models: tuple[str, ...] = ()
    """Models to compare (names, folders or hub ids); default: --model at each --revisions."""
    revisions: tuple[str, ...] = ()
    """Revisions (checkpoints) of --model to compare, e.g. step1000,step2000."""
    def __post_init__(self) -> None:
        if not self.models and not self.revisions:
            raise RegionsError("neuron-sweep needs --models A,B,... or --revisions R1,R2,...")
        if self.models and self.revisions:
            raise RegionsError("give --models or --revisions, not both")


def run_sweep(s: dict[str, Any]) -> int:
    import json

    from lmeval_regions.models import load_model
    from lmeval_regions.studies.neuron_report import sweep

    args: SweepArgs = s["args"]
    model: ModelConfig = s["model"]
    corpus: CorpusConfig = s["corpus"]
    specs = ([replace(model, model=m) for m in args.models] if args.models
             else [replace(model, revision=r) for r in args.revisions])
    names = list(args.models or args.revisions)
    by_name = dict(zip(names, specs))
    rows = sweep(names, corpus.load(), args.out, load=lambda n: load_model(by_name[n]),
                 analysis=s["analysis"], config=_capture_config(s))
    print(json.dumps(rows, indent=1))
    return 0


@dataclass
class ImportNeuronsArgs:
    file: str
    """A LAPE release neuron file (``*.neuron.pth``: language -> layer -> neuron indices), read
    without unpickling arbitrary objects."""
    out: str
    """Output neuron-set artefact (.safetensors), for hf-regions neurons=OUT,neuron_set=LANG."""
    languages: tuple[str, ...] = LAPE_RELEASE_LANGS
    """Set names, one per language in the file's order (the release's order by default)."""


def run_import_neurons(s: dict[str, Any]) -> int:
    from lmeval_regions.models import meta_model
    from lmeval_regions.neurons.importer import import_lape

    args: ImportNeuronsArgs = s["args"]
    ns = import_lape(args.file, meta_model(s["model"]), list(args.languages))
    ns.save(args.out)
    sizes = ", ".join(f"{name}={ns.numel(name)}" for name in ns.sets)
    print(f"wrote {args.out}: {sizes}")
    return 0


COMMANDS = [
    Command("activations", "capture pooled MLP neuron activations (paper 2)",
            "Run the corpus through the model and store, per sample, the mean activation of\n"
            "every MLP neuron of every layer (input of the down projection), streamed to disk.\n\n"
            "examples:\n"
            "  lmeval-regions activations --langs all --units 12 --out acts.safetensors\n"
            "  accelerate launch --multi_gpu --num_processes 8 -m lmeval_regions.cli \\\n"
            "      activations --device cuda --dtype bfloat16 ...   # data parallel",
            [MODEL, CORPUS, CAPTURE, ("args", ActivationsArgs)], run_activations,
            lambda s: config_beside(s["args"].out), lambda s: Files(outputs=[s["args"].out]),
            parallel=True),
    Command("neurons", "paper 2 analysis: similarity, LRDS/SADS, key neurons, LAPE, "
            "deactivation table, report",
            "Capture activations (or reuse --activations), then: similarity map, LRDS/SADS\n"
            "(whole model and per layer), z-score key neurons per language, LAPE neurons, the\n"
            "random baseline, and the deactivation table over --eval-langs (perplexity on the\n"
            "held-out units), written as a report folder.\n\n"
            "example: lmeval-regions neurons --langs all --units 12 --max-length 128 \\\n"
            "             --eval-langs paper2 --eval-units 4 --out reports/neurons",
            [MODEL, CORPUS, HELDOUT, CAPTURE, ANALYSIS, ("args", NeuronsArgs)], run_neurons,
            lambda s: config_inside(s["args"].out),
            lambda s: Files(inputs=[s["args"].activations] if s["args"].activations else [],
                            folders=[s["args"].out])),
    Command("neuron-sweep", "LRDS/SADS/SKLR over several models or revisions",
            "The same metrics (LRDS, SADS, SKLR, key-neuron share) for each model or revision,\n"
            "captured on the same corpus: sweep.json and sweep.md.\n\n"
            "examples:\n"
            "  lmeval-regions neuron-sweep --models gemma-3-270m,smollm2-135m --out sweep/\n"
            "  lmeval-regions neuron-sweep --model ORG/MODEL --revisions step1000,step2000 "
            "--out sweep/",
            [MODEL, CORPUS, CAPTURE, ANALYSIS, ("args", SweepArgs)], run_sweep,
            lambda s: config_inside(s["args"].out), lambda s: Files(folders=[s["args"].out])),
    Command("import-neurons", "import a published LAPE neuron file as a neuron set",
            "Read a LAPE release neuron file (language -> layer -> neuron indices; no arbitrary\n"
            "unpickling) and write it as a neuron-set artefact over --model, checked against the\n"
            "model's layers and MLP width (read from its config: no weights are loaded).\n\n"
            "example: lmeval-regions import-neurons --model meta-llama/Llama-2-7b-hf \\\n"
            "             --file llama-2-7b.neuron.pth --out lape.safetensors\n"
            "         lm_eval --model hf-regions --model_args pretrained=meta-llama/Llama-2-7b-hf,"
            "neurons=lape.safetensors,neuron_set=zh ...",
            [MODEL, ("args", ImportNeuronsArgs)], run_import_neurons,
            lambda s: config_beside(s["args"].out),
            lambda s: Files(inputs=[s["args"].file], outputs=[s["args"].out])),
]
