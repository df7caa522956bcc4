"""Regenerates the per-language YAMLs of the suite (run from anywhere:
``python tasks/_generate_yamls.py``). Hand-written files (bases, groups, helpers) are not
touched; per-language files are plain ``include:`` stubs."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
UDHR_LANGS = ["ar", "zh", "cs", "da", "nl", "en", "fi", "fr", "de", "el", "hu", "id", "it",
              "ja", "ko", "ms", "ml", "no", "fa", "pl", "pt", "ro", "ru", "es", "sw", "sv",
              "ta", "tr", "uk", "vi", "hi"]
# Paper 1 evaluates 30 languages; Hindi is our addition.
PAPER1_LANGS = [l for l in UDHR_LANGS if l != "hi"]
# FLORES+ (hub: openlanguagedata/flores_plus) config names for the UDHR languages.
FLORES = {"ar": "arb_Arab", "zh": "cmn_Hans", "cs": "ces_Latn", "da": "dan_Latn",
          "nl": "nld_Latn", "en": "eng_Latn", "fi": "fin_Latn", "fr": "fra_Latn",
          "de": "deu_Latn", "el": "ell_Grek", "hu": "hun_Latn", "id": "ind_Latn",
          "it": "ita_Latn", "ja": "jpn_Jpan", "ko": "kor_Hang", "ms": "zsm_Latn",
          "ml": "mal_Mlym", "no": "nob_Latn", "fa": "pes_Arab", "pl": "pol_Latn",
          "pt": "por_Latn", "ro": "ron_Latn", "ru": "rus_Cyrl", "es": "spa_Latn",
          "sw": "swh_Latn", "sv": "swe_Latn", "ta": "tam_Taml", "tr": "tur_Latn",
          "uk": "ukr_Cyrl", "vi": "vie_Latn", "hi": "hin_Deva"}
# XL-Sum (hub: csebuetnlp/xlsum) config names, for the UDHR languages it covers.
XLSUM = {"ar": "arabic", "zh": "chinese_simplified", "en": "english", "fr": "french",
         "id": "indonesian", "ja": "japanese", "ko": "korean", "fa": "persian",
         "pt": "portuguese", "ru": "russian", "es": "spanish", "sw": "swahili",
         "ta": "tamil", "tr": "turkish", "uk": "ukrainian", "vi": "vietnamese", "hi": "hindi"}
XSC_LANGS = ["ru", "zh", "es", "ar", "hi", "id", "te", "sw", "eu", "my"]


def write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def group(name: str, tasks: list[str], metrics: list[str], note: str) -> str:
    lines = [f"# {note}", f"group: {name}", "task:"] + [f"  - {t}" for t in tasks]
    lines += ["aggregate_metric_list:"]
    for m in metrics:
        lines += [f"  - metric: {m}", "    aggregation: mean", "    weight_by_size: true"]
    lines += ["metadata:", "  version: 1.0"]
    return "\n".join(lines) + "\n"


PPL_NOTE = ("lm-eval's group value is the unit-weighted MEAN of per-language perplexities; "
            "the pooled figure is lmeval_regions.tasks.perplexity.ppl.pooled_perplexity")
PPL_METRICS = ["token_perplexity", "byte_perplexity", "bits_per_byte", "word_perplexity"]


def main() -> None:
    ppl = HERE / "perplexity"
    for l in UDHR_LANGS:
        write(ppl / f"udhr_ppl_{l}.yaml",
              f"include: _udhr_ppl_base\ntask: udhr_ppl_{l}\ndataset_kwargs:\n  lang: \"{l}\"\n")
        write(ppl / f"flores_ppl_{l}.yaml",
              f"include: _flores_ppl_base\ntask: flores_ppl_{l}\ndataset_name: {FLORES[l]}\n")
    for l, cfg in XLSUM.items():
        write(ppl / f"xlsum_ppl_{l}.yaml",
              f"include: _xlsum_ppl_base\ntask: xlsum_ppl_{l}\ndataset_name: {cfg}\n")
    write(ppl / "udhr_ppl.yaml", group("udhr_ppl", [f"udhr_ppl_{l}" for l in UDHR_LANGS],
                                       PPL_METRICS, PPL_NOTE))
    write(ppl / "udhr_ppl_paper1.yaml",
          group("udhr_ppl_paper1", [f"udhr_ppl_{l}" for l in PAPER1_LANGS], PPL_METRICS,
                "paper 1's 30 languages. " + PPL_NOTE))
    write(ppl / "flores_ppl.yaml", group("flores_ppl", [f"flores_ppl_{l}" for l in UDHR_LANGS],
                                         PPL_METRICS, "hub: FLORES+ devtest. " + PPL_NOTE))
    write(ppl / "xlsum_ppl.yaml", group("xlsum_ppl", [f"xlsum_ppl_{l}" for l in XLSUM],
                                        PPL_METRICS, "hub: XL-Sum test. " + PPL_NOTE))
    xsc = HERE / "xstorycloze_xl"
    for l in XSC_LANGS:
        write(xsc / f"xstorycloze_xl_{l}.yaml",
              f"include: _xstorycloze_xl_base\ntask: xstorycloze_xl_{l}\ndataset_kwargs:\n"
              f"  lang: {l}\n")
        write(xsc / f"xstorycloze_xl_hub_{l}.yaml",
              f"include: _xstorycloze_xl_hub_base\ntask: xstorycloze_xl_hub_{l}\n"
              f"dataset_kwargs:\n  lang: \"{l}\"\n")
    write(xsc / "xstorycloze_xl.yaml",
          group("xstorycloze_xl", [f"xstorycloze_xl_{l}" for l in XSC_LANGS], ["acc"],
                "paper 2, Appendix B: story in language X, English endings (local data)"))
    write(xsc / "xstorycloze_xl_hub.yaml",
          group("xstorycloze_xl_hub", [f"xstorycloze_xl_hub_{l}" for l in XSC_LANGS], ["acc"],
                "paper 2, Appendix B, from the hub (juletxara/xstory_cloze)"))


if __name__ == "__main__":
    main()
