"""CLI subcommands over the region core: ``model-path``, ``importance``, ``combine``,
``extract``, ``setop``, ``stats``, ``monolingual``, ``apply``.

Typical flow (paper 1's core region on the embedded Gemma-3-270M)::

    lmeval-regions importance --langs ar,es,ru,zh,ko,vi --units 25 --out imp.safetensors --combine
    lmeval-regions extract --importance imp.safetensors --method top --ratio 0.01 --out top1.safetensors
    lmeval-regions stats top1.safetensors
    lmeval-regions apply --edit top1.safetensors@zero --eval-langs en,fr

Each command is a thin layer over the library; errors are :class:`RegionsError` (exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from lmeval_regions.errors import RegionsError

_FMT = argparse.RawDescriptionHelpFormatter


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _print_json(obj: Any, out: str | None) -> None:
    from lmeval_regions.artefacts import write_text_atomic

    text = json.dumps(obj, indent=1, sort_keys=True, default=str)
    if out:
        write_text_atomic(out, text + "\n")
        print(f"wrote {out}")


# ---- model-path ----------------------------------------------------------------------------

def cmd_model_path(args: argparse.Namespace) -> int:
    from lmeval_regions.errors import did_you_mean
    from lmeval_regions.models import EMBEDDED, resolve_pretrained

    path = resolve_pretrained(args.model, progress=True)
    if not Path(path).is_dir():
        raise RegionsError(f"'{args.model}' is neither an embedded model nor a local folder."
                           + did_you_mean(args.model, EMBEDDED) + f" Embedded: {sorted(EMBEDDED)}")
    print(path)
    return 0


# ---- importance ----------------------------------------------------------------------------

def _per_language_path(out: Path, lang: str, several: bool) -> Path:
    """``{lang}`` in the name is replaced; with several languages and no placeholder the
    language goes before the suffix (``imp.safetensors`` -> ``imp.ar.safetensors``)."""
    if "{lang}" in str(out):
        return Path(str(out).replace("{lang}", lang))
    return out.with_name(f"{out.stem}.{lang}{out.suffix}") if several else out


def cmd_importance(args: argparse.Namespace) -> int:
    from lmeval_regions.artefacts import file_digest
    from lmeval_regions.corpora import batches, find_data_file, load_parallel
    from lmeval_regions.paper import UDHR_FILE
    from lmeval_regions.importance import ImportanceConfig, combine, compute_importance
    from lmeval_regions.models import load_model

    langs = _csv(args.langs)
    if not langs:
        raise RegionsError("--langs is empty; give languages like 'ar,es' (UDHR codes)")
    if args.units < 1:
        raise RegionsError(f"--units {args.units} must be >= 1")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise RegionsError(f"--out '{out}' must end in .safetensors")
    if args.combine and "{lang}" in str(out):
        raise RegionsError("--combine writes the sum to --out: give a name without '{lang}'")
    path = Path(args.texts) if args.texts else find_data_file(UDHR_FILE)
    data = load_parallel(path, langs)
    config = ImportanceConfig(mode=args.mode, include=tuple(_csv(args.include)) or None,
                              include_norms=args.include_norms, dtype=args.accumulator_dtype)
    for lang in langs:  # check the corpus before the (slow) model load
        if len(data[lang]) < args.skip + args.units:
            raise RegionsError(f"language '{lang}' has only {len(data[lang]) - args.skip} units "
                               f"after --skip {args.skip} in {path}; asked for --units {args.units}")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    digest = file_digest(path)
    parts = []
    for lang in langs:
        texts = [u["text"] for u in data[lang][args.skip:args.skip + args.units]]
        source = {"file": path.name, "sha256": digest, "lang": lang,
                  "units": [args.skip, args.skip + args.units], "max_length": args.max_length,
                  "batch_size": args.batch_size, "model": args.model}
        print(f"[importance] {lang}: {len(texts)} units", flush=True)
        imp = compute_importance(model, list(batches(tok, texts, args.batch_size, args.max_length)),
                                 config, languages=[lang], sources=[source],
                                 progress=not args.quiet)
        target = _per_language_path(out, lang, len(langs) > 1)
        if len(langs) > 1 or not args.combine:
            imp.save(target)
            print(f"wrote {target} ({imp.n_sequences} sequences, {imp.n_tokens} tokens, "
                  f"{imp.n_skipped} skipped)")
        parts.append(imp)
    if args.combine:
        total = combine(parts)
        total.save(out)
        print(f"wrote {out} (sum over {','.join(langs)}: {total.n_sequences} sequences, "
              f"{total.n_tokens} tokens)")
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    from lmeval_regions.importance import Importance, combine

    total = combine([Importance.load(p) for p in args.files])
    total.save(args.out)
    print(f"wrote {args.out} (sum of {len(args.files)} importances: languages {total.languages})")
    return 0


# ---- extract / setop / stats / monolingual ---------------------------------------------------

def _load_importance(spec: str):
    """One importance file, or several comma-separated ones summed (paper 1's core score)."""
    from lmeval_regions.importance import Importance, combine

    files = _csv(spec)
    if not files:
        raise RegionsError("--importance is empty; give a .safetensors file from "
                           "`lmeval-regions importance`")
    parts = [Importance.load(f) for f in files]
    return parts[0] if len(parts) == 1 else combine(parts)


def cmd_extract(args: argparse.Namespace) -> int:
    from lmeval_regions.regions import select_from_importance

    imp = _load_importance(args.importance)
    region = select_from_importance(imp, args.method, args.ratio, args.scope, args.seed)
    region.spec["importance_files"] = _csv(args.importance)
    region.save(args.out)
    total = sum(t.numel() for t in imp.scores.values())
    print(f"wrote {args.out}: {args.method} {args.ratio:g} per {args.scope}, "
          f"{region.numel()} of {total} entries ({100 * region.numel() / total:.3f}%) "
          f"in {len(region.indices)} parameters")
    return 0


def cmd_setop(args: argparse.Namespace) -> int:
    from lmeval_regions.regions import Region

    regions = [Region.load(p) for p in args.regions]
    out = regions[0]
    for r in regions[1:]:
        out = getattr(out, args.op)(r)
    out.spec = {"op": args.op, "operands": [str(p) for p in args.regions]}
    out.save(args.out)
    sizes = ", ".join(f"{Path(p).name}={r.numel()}" for p, r in zip(args.regions, regions))
    print(f"wrote {args.out}: {args.op} of {sizes} -> {out.numel()} entries")
    return 0


def region_stats(region, against=None) -> dict[str, Any]:
    """Counts per layer and module (and their share of the covered parameters), plus the
    Jaccard overlap with ``against`` when given."""
    from lmeval_regions.regions import distribution, overlap

    dist = distribution(region)
    covered = sum(math.prod(s) for s in region.shapes.values())
    out = {"entries": region.numel(), "parameters": len(region.indices),
           "covered_entries": covered,
           "fraction_of_covered": region.numel() / covered if covered else float("nan"),
           "spec": region.spec, **dist}
    if against is not None:
        ov = overlap(region, against)
        out["overlap"] = {k: ov[k] for k in ("jaccard", "intersection", "union", "size_a",
                                             "size_b", "per_layer", "per_matrix")}
    return out


def _table(title: str, counts: dict[str, int], jacc: dict[str, float] | None = None) -> None:
    def key(k):
        return (0, int(k)) if k.isdigit() else (1, k)

    print(f"{title:<28} {'entries':>10}" + (f" {'jaccard':>8}" if jacc is not None else ""))
    for k in sorted(counts, key=key):
        line = f"{k:<28} {counts[k]:>10}"
        if jacc is not None:
            line += f" {jacc.get(k, float('nan')):>8.3f}"
        print(line)


def cmd_stats(args: argparse.Namespace) -> int:
    from lmeval_regions.regions import Region

    region = Region.load(args.region)
    against = Region.load(args.against) if args.against else None
    st = region_stats(region, against)
    print(f"{args.region}: {st['entries']} entries in {st['parameters']} parameters "
          f"({100 * st['fraction_of_covered']:.3f}% of their entries)")
    jl = st["overlap"]["per_layer"] if against is not None else None
    _table("layer", st["per_layer"], jl)
    _table("module", st["per_module"])
    if against is not None:
        ov = st["overlap"]
        print(f"overlap with {args.against}: Jaccard {ov['jaccard']:.4f} "
              f"(|A∩B|={ov['intersection']}, |A∪B|={ov['union']}, |A|={ov['size_a']}, "
              f"|B|={ov['size_b']})")
    _print_json(st, args.json)
    return 0


def _lang_files(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in _csv(text):
        lang, sep, path = item.partition("=")
        if not sep or not lang.strip() or not path.strip():
            raise RegionsError(f"--importance item '{item}' is not LANG=FILE (e.g. "
                               "ar=imp.ar.safetensors)")
        out.setdefault(lang.strip(), []).append(path.strip())
    if len(out) < 2:
        raise RegionsError(f"monolingual regions need at least two languages, got {sorted(out)}")
    return out


def cmd_monolingual(args: argparse.Namespace) -> int:
    from lmeval_regions.importance import Importance, combine
    from lmeval_regions.regions import monolingual, select_from_importance

    files = _lang_files(args.importance)
    tops, bottoms = {}, {}
    for lang, paths in files.items():
        parts = [Importance.load(p) for p in paths]
        imp = parts[0] if len(parts) == 1 else combine(parts)
        tops[lang] = select_from_importance(imp, "top", args.ratio, args.scope, args.seed)
        bottoms[lang] = select_from_importance(imp, "bottom", args.ratio, args.scope, args.seed)
    mono = monolingual(tops, bottoms)
    out_dir = Path(args.out_dir)
    print(f"{'lang':<6} {'top':>10} {'mono top':>10} {'bottom':>10} {'mono bottom':>12}")
    for lang, bands in mono.items():
        for band, region in bands.items():
            region.save(out_dir / f"{lang}.{band}.safetensors")
        print(f"{lang:<6} {tops[lang].numel():>10} {bands['top'].numel():>10} "
              f"{bottoms[lang].numel():>10} {bands['bottom'].numel():>12}")
    print(f"wrote {2 * len(mono)} regions to {out_dir}/LANG.{{top,bottom}}.safetensors")
    return 0


# ---- apply ---------------------------------------------------------------------------------

def _save_model_atomic(model, tok, target: Path) -> None:
    """save_pretrained into a temporary folder beside ``target``, then rename: a crash leaves
    no half-written model folder."""
    import os
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
        os.mkdir(tmp)  # TemporaryDirectory removes its (now empty) folder on exit


def cmd_apply(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from lmeval_regions.corpora import find_data_file, load_parallel
    from lmeval_regions.paper import UDHR_FILE
    from lmeval_regions.perplexity import perplexity
    from lmeval_regions.interventions import Editor, parse_edits, resolve_target
    from lmeval_regions.models import load_model

    edits = parse_edits(args.edit)
    if not args.eval_langs and not args.save:
        raise RegionsError("nothing to do: give --eval-langs (perplexity before/after) and/or "
                           "--save DIR (write the edited model)")
    if args.save and Path(args.save).exists() and any(Path(args.save).iterdir()):
        raise RegionsError(f"--save folder '{args.save}' exists and is not empty; give a new one")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    regions = [(resolve_target(model, t), iv) for t, iv in edits]
    langs = _csv(args.eval_langs)
    data = load_parallel(Path(args.texts) if args.texts else find_data_file(UDHR_FILE),
                         langs) if langs else {}

    def ppl() -> dict[str, float]:
        return {l: perplexity(model, tok, [u["text"] for u in data[l][args.skip:]],
                              args.max_length)["ppl"]
                for l in tqdm(langs, desc="perplexity", unit="lang", disable=args.quiet)}

    base = ppl() if langs else {}
    with Editor(model) as ed:
        for (target, iv), (region, _) in zip(edits, regions):
            n = ed.apply(region, iv)
            print(f"applied {iv} to {n} entries of {target}")
        edited = ppl() if langs else {}
        if args.save:
            _save_model_atomic(model, tok, Path(args.save))
            print(f"wrote the edited model to {args.save}")
    if langs:
        print(f"{'lang':<6} {'ppl base':>12} {'ppl edited':>12} {'ratio':>10}")
        for l in langs:
            print(f"{l:<6} {base[l]:>12.3f} {edited[l]:>12.4g} {edited[l] / base[l]:>10.4g}")
        _print_json({"edits": args.edit, "base": base, "edited": edited}, args.json)
    return 0


# ---- registration --------------------------------------------------------------------------

def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gemma-3-270m",
                   help="embedded model name (gemma-3-270m, smollm2-135m) or a local HF folder "
                        "(default: gemma-3-270m)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load the weights in (default float32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratio", type=float, default=0.01, help="fraction in (0, 1] (default 0.01)")
    p.add_argument("--scope", default="matrix", choices=["matrix", "row", "global"],
                   help="unit the ratio applies to: each matrix (paper 1), each row, or all "
                        "scored entries together (default matrix)")
    p.add_argument("--seed", type=int, default=0, help="seed of random selection (default 0)")


def register(sub) -> None:
    p = sub.add_parser("model-path", formatter_class=_FMT,
                       help="print the local folder of an embedded model (converting it once)",
                       description="Print the local HF folder of an embedded model, converting "
                                   "its PyPI GGUF once to a cached safetensors copy.\n\n"
                                   "example: lmeval-regions model-path gemma-3-270m")
    p.add_argument("model", nargs="?", default="gemma-3-270m",
                   help="embedded name (gemma-3-270m, smollm2-135m); default gemma-3-270m")
    p.set_defaults(func=cmd_model_path)

    p = sub.add_parser(
        "importance", formatter_class=_FMT,
        help="per-parameter importance |θ·∇L| over a multilingual corpus",
        description=(
            "Accumulate importance |θ·∇L| of every weight matrix inside the transformer blocks\n"
            "over the first --units units of each language, without changing the model.\n"
            "One file per language; with --combine also their sum (paper 1's core score).\n\n"
            "examples:\n"
            "  lmeval-regions importance --langs ar --units 25 --out imp_ar.safetensors\n"
            "  lmeval-regions importance --langs ar,es,ru,zh,ko,vi --units 25 \\\n"
            "      --out imp.safetensors --combine      # imp.ar.safetensors ... + imp.safetensors\n"
            "  lmeval-regions importance --langs ar,es --out 'imp_{lang}.safetensors'"))
    _model_args(p)
    p.add_argument("--langs", required=True, help="comma-separated language codes, e.g. ar,es")
    p.add_argument("--units", type=int, default=25, help="units per language (default 25)")
    p.add_argument("--skip", type=int, default=0, help="skip this many units first (default 0)")
    p.add_argument("--texts", help="JSONL of {id, lang, text} rows (default: the 31-language "
                                   "UDHR, udhr_parallel_31.jsonl, found in ../shared/data or "
                                   "$LMEVAL_REGIONS_DATA)")
    p.add_argument("--out", required=True,
                   help="output .safetensors; '{lang}' is replaced per language, otherwise "
                        "several languages go to OUT_STEM.LANG.safetensors")
    p.add_argument("--combine", action="store_true",
                   help="also write the sum over languages to --out")
    p.add_argument("--mode", default="abs_sum", choices=["abs_sum", "sum_abs"],
                   help="abs_sum: Σ_b|θ·g_b| (paper Eq. 4, default); sum_abs: |θ·Σ_b g_b| "
                        "(paper 1's released code)")
    p.add_argument("--include", help="comma-separated globs of parameter names to score "
                                     "(default: 2-D weights inside the blocks)")
    p.add_argument("--include-norms", action="store_true", help="also score norm weights")
    p.add_argument("--accumulator-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="accumulator dtype (default float32)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    p.add_argument("--max-length", type=int, default=256,
                   help="truncate units to this many tokens (default 256)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_importance)

    p = sub.add_parser("combine", formatter_class=_FMT,
                       help="sum importance files (e.g. per-language into the core score)",
                       description="Sum importance files of the same model and mode.\n\n"
                                   "example: lmeval-regions combine imp.ar.safetensors "
                                   "imp.es.safetensors --out imp.safetensors")
    p.add_argument("files", nargs="+", help="importance .safetensors files")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.set_defaults(func=cmd_combine)

    p = sub.add_parser(
        "extract", formatter_class=_FMT, help="select a region (Top/Bottom/Middle/Random) from importance",
        description=(
            "Select a region from importance scores and save its flat indices.\n"
            "  top/bottom: the largest/smallest scores; middle: the band around the median;\n"
            "  random: uniform (seeded), ignoring scores.\n"
            "  scope matrix: ratio of each parameter matrix (paper 1); row: of each row;\n"
            "  global: of all scored entries together.\n\n"
            "example: lmeval-regions extract --importance imp.safetensors --method top \\\n"
            "             --ratio 0.01 --scope matrix --out top1.safetensors"))
    p.add_argument("--importance", required=True,
                   help="importance file; several comma-separated files are summed")
    p.add_argument("--method", default="top", choices=["top", "bottom", "middle", "random"])
    _selection_args(p)
    p.add_argument("--out", required=True, help="output region .safetensors")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("setop", formatter_class=_FMT, help="union / intersection / difference of regions",
                       description="Set algebra over region files, applied left to right.\n\n"
                                   "example: lmeval-regions setop difference top1.safetensors "
                                   "ar.top.safetensors --out core_wo_ar.safetensors")
    p.add_argument("op", choices=["union", "intersection", "difference"])
    p.add_argument("regions", nargs="+", metavar="REGION", help="two or more region files")
    p.add_argument("--out", required=True, help="output region .safetensors")
    p.set_defaults(func=lambda a: _need_two(a) or cmd_setop(a))

    p = sub.add_parser("stats", formatter_class=_FMT, help="counts per layer/module, Jaccard overlap",
                       description="Print a region's size per layer and per module kind;\n"
                                   "with --against, the Jaccard overlap in total and per layer.\n\n"
                                   "example: lmeval-regions stats top1.safetensors --against "
                                   "ar.top.safetensors --json stats.json")
    p.add_argument("region", help="region .safetensors")
    p.add_argument("--against", help="a second region to compare with")
    p.add_argument("--json", help="also write the statistics as JSON here")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "monolingual", formatter_class=_FMT, help="monolingual regions (paper 1, Eq. 5)",
        description=(
            "Per language: its Top (and Bottom) region minus every other language's Top and\n"
            "Bottom regions (paper 1, Eq. 5). Writes DIR/LANG.top.safetensors and\n"
            "DIR/LANG.bottom.safetensors.\n\n"
            "example: lmeval-regions monolingual --importance ar=imp.ar.safetensors,"
            "es=imp.es.safetensors \\\n             --ratio 0.01 --out-dir mono/"))
    p.add_argument("--importance", required=True,
                   help="comma-separated LANG=FILE items (a language may repeat: summed)")
    _selection_args(p)
    p.add_argument("--out-dir", required=True, help="folder for the region files")
    p.set_defaults(func=cmd_monolingual)

    p = sub.add_parser(
        "apply", formatter_class=_FMT,
        help="apply interventions; report perplexity before/after or save the edited model",
        description=(
            "Apply interventions to a model: TARGET@INTERVENTION items separated by ';'.\n"
            "TARGET: a region file or an entry spec (NAME[i], NAME[:, j], globs allowed);\n"
            "INTERVENTION: zero (default), constant:V, scale:V, noise:STD[/SEED], reinit[:STD].\n\n"
            "examples:\n"
            "  lmeval-regions apply --edit top1.safetensors@zero --eval-langs en,ar --skip 25\n"
            "  lmeval-regions apply --edit 'model.layers.*.input_layernorm.weight[5]@scale:10' \\\n"
            "      --save edited_model/"))
    _model_args(p)
    p.add_argument("--edit", required=True, help="TARGET[@INTERVENTION];... (see above)")
    p.add_argument("--eval-langs", help="languages to measure UDHR perplexity on, before/after")
    p.add_argument("--texts", help="JSONL of {id, lang, text} rows (default: the UDHR)")
    p.add_argument("--skip", type=int, default=25,
                   help="evaluate on units after the first SKIP (default 25: held out)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per unit (default 256)")
    p.add_argument("--save", help="write the edited model (and tokenizer) to this folder")
    p.add_argument("--json", help="write the perplexities as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_apply)


def _need_two(args: argparse.Namespace) -> None:
    if len(args.regions) < 2:
        raise RegionsError(f"setop {args.op} needs at least two regions, got {len(args.regions)}")
