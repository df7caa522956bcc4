"""XStoryCloze cross-lingual (paper 2, Appendix B): the four story sentences in language X,
then "The ending in English:", and the two English endings of the same story (rows matched by
story id). Local file (``xstorycloze_eval100_11lang.jsonl``) or the hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

from lmeval_regions.corpora import find_data_file
from lmeval_regions.errors import RegionsError

HUB = "juletxara/xstory_cloze"
# hub field -> local (original) field
_HUB_FIELDS = {"story_id": "InputStoryid", "input_sentence_1": "InputSentence1",
               "input_sentence_2": "InputSentence2", "input_sentence_3": "InputSentence3",
               "input_sentence_4": "InputSentence4", "sentence_quiz1": "RandomFifthSentenceQuiz1",
               "sentence_quiz2": "RandomFifthSentenceQuiz2",
               "answer_right_ending": "AnswerRightEnding"}


def cross_lingual(story_rows: list[dict], en_rows: list[dict], lang: str) -> list[dict]:
    """Docs ``{story, endings, label}`` for the stories present in both languages."""
    en = {r["InputStoryid"]: r for r in en_rows}
    docs = []
    for r in story_rows:
        e = en.get(r["InputStoryid"])
        if e is None:
            continue
        docs.append({
            "id": r["InputStoryid"], "lang": lang,
            "story": " ".join(str(r[f"InputSentence{i}"]).strip() for i in range(1, 5)),
            "endings": [e["RandomFifthSentenceQuiz1"], e["RandomFifthSentenceQuiz2"]],
            "label": int(e["AnswerRightEnding"]) - 1,
        })
    if not docs:
        raise RegionsError(f"no '{lang}' story matches an English story by InputStoryid")
    return docs


def load_local(lang: str, xstorycloze_path: str | None = None, **_: Any) -> datasets.DatasetDict:
    """Cross-lingual docs from a JSONL with the original fields plus ``lang``."""
    path = (Path(xstorycloze_path).expanduser() if xstorycloze_path
            else find_data_file("xstorycloze_eval100_11lang.jsonl"))
    by_lang: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                by_lang.setdefault(r["lang"], []).append(r)
    for need in (lang, "en"):
        if need not in by_lang:
            raise RegionsError(f"language '{need}' is not in {path} (have {sorted(by_lang)})")
    docs = cross_lingual(by_lang[lang], by_lang["en"], lang)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def load_hub(lang: str, **_: Any) -> datasets.DatasetDict:
    """The same from the hub (needs internet): eval split of ``juletxara/xstory_cloze``."""
    def rows(name):
        ds = datasets.load_dataset(HUB, name, split="eval")
        return [{_HUB_FIELDS[k]: v for k, v in r.items() if k in _HUB_FIELDS} for r in ds]

    docs = cross_lingual(rows(lang), rows("en"), lang)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
