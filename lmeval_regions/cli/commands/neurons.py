"""CLI: ``activations``, ``neurons`` (paper 2 analysis + deactivation table + report) and
``neuron-sweep`` (the same metrics over several models or revisions)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmeval_regions.errors import RegionsError

# Paper 2's nine evaluation languages (all in the UDHR file).
PAPER2_LANGS = ["en", "zh", "fr", "es", "pt", "ar", "vi", "hi", "id"]


def _langs(text: str) -> list[str] | None:
    from lmeval_regions.paper import UDHR_LANGS

    if text == "all":
        return list(UDHR_LANGS)
    out = [l.strip() for l in text.split(",") if l.strip()]
    if not out:
        raise RegionsError(f"--langs '{text}' names no language; e.g. 'ar,zh,en' or 'all'")
    return out


def _corpus(args, start: int, n: int) -> dict[str, list[dict]]:
    from lmeval_regions.corpora import load_parallel

    rows = load_parallel(args.data, _langs(args.langs))
    for lang, units in rows.items():
        if len(units) < start + n:
            raise RegionsError(f"language '{lang}' has {len(units)} units; {start + n} needed "
                               f"(--units plus --eval-units)")
    return {l: u[start:start + n] for l, u in rows.items()}


def _progress(label: str):
    t0 = time.time()

    def show(done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total} samples ({time.time() - t0:.0f}s)", end="",
              file=sys.stderr, flush=True)
        if done == total:
            print(file=sys.stderr)
    return show


def _config(args):
    from lmeval_regions.activations import ActivationConfig

    return ActivationConfig(batch_size=args.batch_size, max_length=args.max_length)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gemma-3-270m", help="embedded model name or HF folder")
    p.add_argument("--langs", default="all", help="comma-separated UDHR languages, or 'all'")
    p.add_argument("--units", type=int, default=25, help="parallel units per language")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", default=None, help="parallel JSONL (default: the UDHR file)")


def cmd_activations(args) -> int:
    from lmeval_regions.activations import capture
    from lmeval_regions.models import load_model

    model, tok = load_model(args.model)
    meta = capture(model, tok, _corpus(args, 0, args.units), args.out, _config(args),
                   _progress("activations"))
    print(f"wrote {args.out}: {len(meta['languages'])} languages x {args.units} units, "
          f"{len(meta['layers'])} layers x {meta['neurons']} neurons")
    return 0


def cmd_neurons(args) -> int:
    from lmeval_regions import neurons as N
    from lmeval_regions.activations import Activations, capture
    from lmeval_regions.models import load_model, resolve_pretrained
    from lmeval_regions.studies.neuron_report import analyse, write_report

    out = Path(args.out)
    model, tok = load_model(args.model)
    acts_path = Path(args.activations) if args.activations else out / "activations.safetensors"
    if not args.activations:
        capture(model, tok, _corpus(args, 0, args.units), acts_path, _config(args),
                _progress("activations"))
    acts = Activations.load(acts_path, model=model)
    result, ns = analyse(acts, model, args.threshold, args.seed)
    ns_path = out / "neurons.safetensors"
    ns.save(ns_path)
    print(f"LRDS={result['lrds']:.4f} SADS={result['sads']:.4f} SKLR={result['sklr']}")
    table = None
    table_langs = _langs(args.table_langs) if args.table_langs else []
    if table_langs:
        missing = [l for l in table_langs if l not in acts.languages]
        if missing:
            raise RegionsError(f"--table-langs {missing} were not captured (--langs)")
        evals = _corpus(argparse.Namespace(**{**vars(args), "langs": ",".join(table_langs)}),
                        args.units, args.eval_units)
        texts = {l: [u["text"] for u in us] for l, us in evals.items()}
        if args.ppl == "lm-eval":
            from lmeval_regions.eval.runs import lm_eval_ppl

            ppl = lm_eval_ppl(resolve_pretrained(args.model), str(ns_path), args.mode,
                                limit=args.eval_units)
        else:
            ppl = N.direct_ppl(model, tok, ns, texts, args.mode, args.max_length)
        rows = list(table_langs) + ([f"random-{l}" for l in table_langs] if args.random_rows else [])
        t0 = time.time()
        table = N.deactivation_table(ppl, rows, table_langs)
        s = table["summary"]
        print(f"deactivation table: {len(rows)} rows x {len(table_langs)} languages in "
              f"{time.time() - t0:.0f}s; diagonal > mean off-diagonal for "
              f"{s['diagonal_exceeds_count']} of {s['rows_compared']} languages")
    write_report(out, result, acts, table)
    print(f"report: {out / 'README.md'}")
    return 0


def cmd_sweep(args) -> int:
    from lmeval_regions.studies.neuron_report import sweep

    rows = sweep(args.models, _corpus(args, 0, args.units), args.out, threshold=args.threshold,
                 config=_config(args))
    print(json.dumps(rows, indent=1))
    return 0


def register(sub) -> None:
    p = sub.add_parser("activations", help="capture pooled MLP neuron activations (paper 2)")
    _common(p)
    p.add_argument("--out", required=True, help="activation artefact (.safetensors)")
    p.set_defaults(func=cmd_activations)

    p = sub.add_parser("neurons", help="paper 2 analysis: similarity, LRDS/SADS, key neurons, "
                                       "LAPE, deactivation table, report")
    _common(p)
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--activations", default=None, help="reuse this activation artefact")
    p.add_argument("--threshold", type=float, default=2.0, help="z-score threshold")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline sets")
    p.add_argument("--table-langs", default=",".join(PAPER2_LANGS),
                   help="languages of the deactivation table ('' to skip)")
    p.add_argument("--eval-units", type=int, default=10,
                   help="held-out units per language for perplexity (after --units)")
    p.add_argument("--mode", default="zero", help="zero | scale:X | mean")
    p.add_argument("--random-rows", action="store_true",
                   help="also deactivate the equal-size random sets (doubles the table time)")
    p.add_argument("--ppl", choices=["direct", "lm-eval"], default="direct",
                   help="perplexity: direct forward passes, or lm-eval hf-regions + udhr_ppl_*")
    p.set_defaults(func=cmd_neurons)

    p = sub.add_parser("neuron-sweep", help="LRDS/SADS/SKLR over several models or revisions")
    _common(p)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--threshold", type=float, default=2.0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sweep)
