"""Corpora: every source (text lines/files/folders, JSONL, CSV/TSV, Parquet, datasets folders,
streamed datasets) gives the batches of the same texts as JSONL; packing loses no token; token
budgets and sample counts are met exactly; files are read lazily; provenance is recorded; our
lm-eval text_ppl task scores what a corpus stream scores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_conditioning import TEXTS, assert_same_batches, old_batches

from lmeval_regions.corpora import (
    Conditioning,
    CorpusConfig,
    batches,
    find_data_file,
    load_parallel,
)
from lmeval_regions.errors import RegionsError
from lmeval_regions.paper import UDHR_FILE
from lmeval_regions.parsing import count
from lmeval_regions.perplexity import batch_perplexity


def test_text_ppl_task_equals_corpus_stream(tiny_lm_dir, smollm_tokenizer, tmp_path):
    """Our text_ppl task run by lm-eval through hf-regions (add_bos_token=False) and the
    corpus stream of the same JSONL: same token count, same summed NLL."""
    from lm_eval import simple_evaluate
    from transformers import AutoModelForCausalLM

    from lmeval_regions.eval.tasks import task_manager

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    args = {"pretrained": str(tiny_lm_dir), "dtype": "float32", "add_bos_token": False}
    r = simple_evaluate(model="hf-regions", model_args=args, tasks=["text_ppl"], device="cpu",
                        batch_size=1, task_manager=task_manager(
                            include_defaults=False,
                            metadata={"text_path": str(data), **args}))["results"]["text_ppl"]
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    cfg = CorpusConfig(texts=str(data), langs=("xx",), units=len(TEXTS), batch_size=2)
    stream = cfg.streams(smollm_tokenizer)["xx"]
    got = batch_perplexity(model, stream)
    assert got["tokens"] == r["token_count,none"] == stream.provenance["tokens"]
    assert got["nll"] == pytest.approx(r["nll_sum,none"], rel=1e-5)



@pytest.mark.slow
def test_gemma_batches_unchanged():
    """Gemma's batches on the demo's corpus (six languages x 25 UDHR units, 256 tokens, four
    per batch) are what the tokenizer's own call gave before the rule: the demo's numbers
    cannot move."""
    from transformers import AutoTokenizer

    from lmeval_regions.models import resolve_pretrained

    tok = AutoTokenizer.from_pretrained(resolve_pretrained("gemma-3-270m"))
    cfg = CorpusConfig()
    for lang, stream in cfg.streams(tok).items():
        texts = [u["text"] for u in cfg.load()[lang]]
        want = list(old_batches(tok, texts, 4, 256))
        assert_same_batches(batches(tok, texts, 4, 256), want)
        assert_same_batches(stream, want)


# ----------------------------------------------------------------------------- sources

LANG_DOCS = {
    "ar": ["الناس أحرار ومتساوون في الكرامة والحقوق.", "لكل إنسان حق التمتع بكافة الحقوق, "
           "\"دون تمييز\".", "لكل فرد الحق في الحياة والحرية.", "لا يجوز استرقاق أحد."],
    "es": TEXTS[1:2] + ["Toda persona tiene todos los derechos, \"sin distinción\".",
                        "Todo individuo tiene derecho a la vida.", "Nadie estará sometido a "
                        "esclavitud ni a servidumbre; la esclavitud está prohibida."],
}


def _reference(tmp_path: Path) -> Path:
    """The hand-made {id, lang, text} JSONL every other source is compared with."""
    p = tmp_path / "ref.jsonl"
    with open(p, "w", encoding="utf-8") as f:
        for i in range(4):
            for lang, docs in LANG_DOCS.items():
                f.write(json.dumps({"id": f"u{i}", "lang": lang, "text": docs[i]},
                                   ensure_ascii=False) + "\n")
    return p


def _rows():
    return [{"content": d, "language": lang} for i in range(4) for lang, d in
            ((l, LANG_DOCS[l][i]) for l in LANG_DOCS)]


def _write_source(kind: str, tmp_path: Path) -> dict:
    """CorpusConfig arguments reading LANG_DOCS from a source of ``kind``."""
    cols = {"text_field": "content", "lang_field": "language"}
    d = tmp_path / kind
    d.mkdir()
    if kind == "jsonl-columns":
        p = d / "x.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows()),
                     encoding="utf-8")
        return {"texts": str(p), **cols}
    if kind in ("csv", "tsv"):
        p = d / f"x.{kind}"
        with open(p, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, ["language", "content"], delimiter="," if kind == "csv" else "\t")
            w.writeheader()
            w.writerows(_rows())
        return {"texts": str(p), **cols}
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = d / "x.parquet"
        pq.write_table(pa.Table.from_pylist(_rows()), p, row_group_size=3)
        return {"texts": str(p), **cols}
    if kind in ("disk", "disk-split"):
        import datasets

        ds = datasets.Dataset.from_list(_rows())
        if kind == "disk":
            ds.save_to_disk(str(d / "ds"))
            return {"texts": str(d / "ds"), **cols}
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(d / "ds"))
        return {"texts": f"{d / 'ds'}@train", **cols}
    if kind == "hf-local-folder":  # the streaming (IterableDataset) path, on a local folder
        (d / "train.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows()), encoding="utf-8")
        return {"texts": f"hf:{d}", **cols}
    if kind == "txt-lines":
        for lang, docs in LANG_DOCS.items():
            (d / f"{lang}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        return {"texts": f"ar={d / 'ar.txt'},es={d / 'es.txt'}"}
    if kind in ("txt-files", "txt-dir-lines"):
        for lang, docs in LANG_DOCS.items():
            (d / lang / "sub").mkdir(parents=True)
            if kind == "txt-files":  # one document per file, read in name order
                for i, doc in enumerate(docs):
                    where = d / lang / ("sub" if i == 3 else "") / f"{i:02d}.txt"
                    where.write_text(doc, encoding="utf-8")
            else:  # one document per line, over two files
                (d / lang / "a.txt").write_text("\n".join(docs[:3]), encoding="utf-8")
                (d / lang / "sub" / "b.txt").write_text(docs[3] + "\r\n", encoding="utf-8")
        extra = {"text_unit": "file"} if kind == "txt-files" else {}
        return {"texts": f"ar={d / 'ar'},es={d / 'es'}", **extra}
    raise ValueError(kind)


SOURCE_KINDS = ["jsonl-columns", "csv", "tsv", "parquet", "disk", "disk-split",
                "hf-local-folder", "txt-lines", "txt-files", "txt-dir-lines"]


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_source_gives_the_jsonl_batches(kind, pack, tmp_path, smollm_tokenizer):
    ref = CorpusConfig(texts=str(_reference(tmp_path)), langs=("ar", "es"), units=4,
                       max_length=12, batch_size=3, pack=pack)
    cfg = CorpusConfig(langs=("ar", "es"), units=4, max_length=12, batch_size=3, pack=pack,
                       **_write_source(kind, tmp_path))
    want, got = ref.streams(smollm_tokenizer), cfg.streams(smollm_tokenizer)
    assert list(got) == ["ar", "es"]
    for lang in ("ar", "es"):
        assert_same_batches(got[lang], want[lang])
        assert got[lang].provenance["complete"]
        for key in ("documents", "sequences", "tokens", "tokens_truncated"):
            assert got[lang].provenance[key] == want[lang].provenance[key], key
    if not pack:
        assert [u["text"] for u in cfg.load()["es"]] == LANG_DOCS["es"]


def test_one_language_source_without_language_column(tmp_path, smollm_tokenizer):
    p = tmp_path / "ar.txt"
    p.write_text("\n".join(LANG_DOCS["ar"]), encoding="utf-8")
    ref = CorpusConfig(texts=str(_reference(tmp_path)), langs=("ar",), units=4)
    cfg = CorpusConfig(texts=str(p), langs=("ar",), units=4)
    assert_same_batches(cfg.streams(smollm_tokenizer)["ar"], ref.streams(smollm_tokenizer)["ar"])
    assert [u["id"] for u in cfg.load()["ar"]] == ["ar.txt:1", "ar.txt:2", "ar.txt:3", "ar.txt:4"]
    with pytest.raises(RegionsError, match="no language column"):
        CorpusConfig(texts=str(p), langs=("ar", "es")).load()


def test_udhr_mode_is_unchanged(smollm_tokenizer):
    """The default corpus: units skip..skip+units of each language, one sequence each, the
    batches of :func:`batches` over those texts."""
    path = find_data_file(UDHR_FILE)
    cfg = CorpusConfig(skip=3, units=5, max_length=64, batch_size=2)
    data = load_parallel(path, cfg.langs)
    loaded = cfg.load()
    assert loaded == {l: data[l][3:8] for l in cfg.langs}
    streams = cfg.streams(smollm_tokenizer)
    for lang in cfg.langs:
        texts = [u["text"] for u in loaded[lang]]
        assert_same_batches(streams[lang], batches(smollm_tokenizer, texts, 2, 64))
        prov = streams[lang].provenance
        assert prov["ids"] == [data[lang][3]["id"], data[lang][7]["id"]]
        assert prov["documents"] == 5 and prov["amount"] == {"units": 5}
    with pytest.raises(RegionsError, match="only 47 units"):
        CorpusConfig(skip=3, units=48).load()


# ----------------------------------------------------------------------------- packing, budgets

def _docs_file(tmp_path, n=12) -> tuple[Path, list[str]]:
    docs = [TEXTS[i % len(TEXTS)][: 10 + 7 * i] for i in range(n)]
    p = tmp_path / "docs.txt"
    p.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return p, docs


def test_packing_loses_no_token(tmp_path, smollm_tokenizer):
    """Every document's tokens (the tokenizer's own count) are scored exactly once, in order;
    the sequences hold exactly the stream [prefix] d1 [prefix] d2 ..., each sequence after the
    first repeating the previous one's last token, the last one filled on the left."""
    tok = smollm_tokenizer
    p, docs = _docs_file(tmp_path)
    M = 16
    cfg = CorpusConfig(texts=str(p), langs=("xx",), units=len(docs), max_length=M,
                       batch_size=4, pack=True)
    stream = cfg.streams(tok)["xx"]
    seqs = []
    for b in stream:
        for ids, mask, lab in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            n = int(mask.sum())
            seqs.append((ids[:n].tolist(), lab[:n].tolist()))
    doc_ids = [tok.encode(d, add_special_tokens=False) for d in docs]
    prefix = tok.bos_token_id
    want_stream = [t for d in doc_ids for t in [prefix] + d]
    want_scored = [t for d in doc_ids for t in d]
    scored = [t for _, lab in seqs for t in lab[1:] if t != -100]
    assert scored == want_scored
    assert stream.provenance["tokens"] == len(want_scored) == sum(len(d) for d in doc_ids)
    assert stream.provenance["documents"] == len(docs)
    assert all(len(ids) == M for ids, _ in seqs)  # the last one is filled too
    rebuilt = list(seqs[0][0])
    for ids, _ in seqs[1:-1]:
        assert ids[0] == rebuilt[-1]  # conditioned on the previous sequence's last token
        rebuilt += ids[1:]
    ids, lab = seqs[-1]
    new = len(want_stream) - len(rebuilt)  # what the last sequence adds
    assert 0 < new < M - 1
    assert ids[:M - new] == rebuilt[-(M - new):]  # its left fill is already-read history
    assert all(t == -100 for t in lab[1:M - new])  # ... and not scored again
    rebuilt += ids[M - new:]
    assert rebuilt == want_stream


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("budget", ["150", "0.2k"])
def test_token_budget_is_met_exactly(budget, pack, tmp_path, smollm_tokenizer):
    p, docs = _docs_file(tmp_path)
    cfg = CorpusConfig(texts=str(p), langs=("xx",), tokens=budget, max_length=24, pack=pack)
    stream = cfg.streams(smollm_tokenizer)["xx"]
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in stream)
    assert n == count(budget) == stream.provenance["tokens"]
    assert stream.provenance["amount"] == {"tokens": count(budget)}
    # the documents used are the first ones, the last possibly cut
    lens = [len(smollm_tokenizer.encode(d, add_special_tokens=False)) for d in docs]
    scored = [l if pack else min(l, 23) for l in lens]
    k = stream.provenance["documents"]
    assert sum(scored[:k - 1]) < n <= sum(scored[:k])
    with pytest.raises(RegionsError, match="has only .* tokens"):
        list(CorpusConfig(texts=str(p), langs=("xx",), tokens="1M", pack=pack)
             .streams(smollm_tokenizer)["xx"])


@pytest.mark.parametrize("pack", [False, True])
def test_sample_count(pack, tmp_path, smollm_tokenizer):
    p, docs = _docs_file(tmp_path)
    cfg = CorpusConfig(texts=str(p), langs=("xx",), samples=5, max_length=16, batch_size=2,
                       pack=pack)
    stream = cfg.streams(smollm_tokenizer)["xx"]
    assert sum(b["input_ids"].shape[0] for b in stream) == 5 == stream.provenance["sequences"]
    with pytest.raises(RegionsError, match="gives only"):
        list(CorpusConfig(texts=str(p), langs=("xx",), samples=10_000, pack=pack)
             .streams(smollm_tokenizer)["xx"])


def test_counts_with_suffixes():
    assert count("500k") == 500_000 and count("2M") == 2_000_000 and count("1.5B") == 1.5e9
    assert count("10_000") == 10_000 and count(" 3K ") == 3000
    for bad in ("2X", "0", "-5", "1.0005k", "", "1e3"):
        with pytest.raises(RegionsError, match="whole count"):
            count(bad, "--tokens")


# ----------------------------------------------------------------------------- streaming

def _broken_tail(tmp_path, kind: str, n_good: int) -> Path:
    """A file of ``n_good`` good rows followed by a row that fails when read."""
    good = [TEXTS[i % len(TEXTS)] for i in range(n_good)]
    if kind == "jsonl":
        p = tmp_path / "big.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in good) + "{not json\n",
                     encoding="utf-8")
    elif kind == "csv":
        p = tmp_path / "big.csv"
        p.write_text("text\n" + "".join(f'"{t}"\n' for t in good) + '""\n', encoding="utf-8")
    else:  # undecodable bytes after far more than one read buffer of good lines
        p = tmp_path / "big.txt"
        p.write_bytes(("\n".join(good) + "\n").encode() + b"\xff\xfe broken\n")
    return p


@pytest.mark.parametrize("kind", ["jsonl", "csv", "txt"])
def test_streams_read_lazily(kind, tmp_path, smollm_tokenizer):
    """A budget met early never reads the rest of the file (whose tail would fail), and the
    first batch comes before the file was read to the end."""
    p = _broken_tail(tmp_path, kind, 3000)
    cfg = CorpusConfig(texts=str(p), langs=("xx",), tokens="2k", pack=True, max_length=64)
    stream = cfg.streams(smollm_tokenizer)["xx"]
    it = iter(stream)
    next(it)
    assert stream.provenance["documents"] < 3000 and not stream.provenance["complete"]
    list(it)
    assert stream.provenance["tokens"] == 2000 and stream.provenance["documents"] < 200
    # the tail is really broken: reading everything fails
    with pytest.raises(RegionsError):
        list(CorpusConfig(texts=str(p), langs=("xx",), units=3001).streams(smollm_tokenizer)["xx"])


# ----------------------------------------------------------------------------- errors

def test_bad_corpora_are_named(tmp_path, smollm_tokenizer):
    ref = _reference(tmp_path)
    with pytest.raises(RegionsError, match="no column 'txt'.*Did you mean: text"):
        CorpusConfig(texts=str(ref), langs=("ar",), text_field="txt").check()
    with pytest.raises(RegionsError, match="no column 'language'.*Did you mean: lang"):
        CorpusConfig(texts=str(ref), langs=("ar",), lang_field="language").check()
    with pytest.raises(RegionsError, match="is not a file or folder"):
        CorpusConfig(texts=str(tmp_path / "missing.jsonl"))
    with pytest.raises(RegionsError, match="language 'ark' is not in.*Did you mean: ar"):
        CorpusConfig(texts=str(ref), langs=("ark",)).load()
    with pytest.raises(RegionsError, match="give one"):
        CorpusConfig(texts=str(ref), tokens="1k", samples=3)
    with pytest.raises(RegionsError, match="--tokens '2X'"):
        CorpusConfig(texts=str(ref), tokens="2X")
    with pytest.raises(RegionsError, match="--langs ru has no source"):
        CorpusConfig(texts=f"ar={ref},es={ref}", langs=("ar", "ru"))
    assert CorpusConfig(texts=f"ar={ref},es={ref}").langs == ("ar", "es")
    with pytest.raises(RegionsError, match="text-unit"):
        CorpusConfig(texts=str(ref), text_unit="paragraph")
    empty = tmp_path / "empty_row.jsonl"
    empty.write_text('{"text": "fine"}\n{"text": "  "}\n', encoding="utf-8")
    with pytest.raises(RegionsError, match=r"empty_row.jsonl:2: column 'text' is '  '"):
        CorpusConfig(texts=str(empty), langs=("xx",), units=2).load()
    with pytest.raises(RegionsError, match="splits \\['test', 'train'\\]"):
        import datasets

        d = datasets.Dataset.from_list([{"text": "a"}])
        datasets.DatasetDict({"test": d, "train": d}).save_to_disk(str(tmp_path / "dd"))
        CorpusConfig(texts=str(tmp_path / "dd"), langs=("xx",), units=1).load()
    with pytest.raises(RegionsError, match="activations"):
        CorpusConfig(texts=str(ref), pack=True).load()


# ----------------------------------------------------------------------------- provenance

def test_importance_over_streams_records_provenance(tiny_lm_dir, smollm_tokenizer, tmp_path):
    """docs/corpora.md's example: importance per language straight from the streams; the
    provenance names the file by its sha256, the rule, and the tokens importance used."""
    import hashlib

    from transformers import AutoModelForCausalLM

    from lmeval_regions.importance import Importance, compute_importance

    _write_source("txt-lines", tmp_path)
    d = tmp_path / "txt-lines"
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    cfg = CorpusConfig(texts=f"ar={d / 'ar.txt'},es={d / 'es.txt'}", tokens="40", pack=True,
                       max_length=16)
    for lang, stream in cfg.streams(smollm_tokenizer).items():
        # the record is filled while importance consumes the stream
        imp = compute_importance(model, stream, languages=[lang], sources=[stream.provenance],
                                 progress=False)
        imp.save(tmp_path / f"imp.{lang}.safetensors")
        prov = Importance.load(tmp_path / f"imp.{lang}.safetensors").sources[0]
        assert prov["complete"] and prov["tokens"] == imp.n_tokens == 40
        assert prov["sha256"] == hashlib.sha256((d / f"{lang}.txt").read_bytes()).hexdigest()
        assert prov["conditioning"] == Conditioning.of(smollm_tokenizer).metadata()
        assert prov["lang"] == lang and prov["kind"] == "txt" and prov["amount"] == {"tokens": 40}


def test_folder_digest_follows_its_files(tmp_path, smollm_tokenizer):
    from lmeval_regions.corpora import fingerprint, parse_source

    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("one\n", encoding="utf-8")
    (d / "sub" / "b.txt").write_text("two\n", encoding="utf-8")
    src = parse_source(str(d))
    first = fingerprint(src)
    assert first["files"] == 2
    (d / "sub" / "b.txt").write_text("two!\n", encoding="utf-8")
    assert fingerprint(src)["sha256"] != first["sha256"]
    (d / "sub" / "b.txt").write_text("two\n", encoding="utf-8")
    assert fingerprint(src)["sha256"] == first["sha256"]


def test_longest_first_batches_are_the_same_sequences_with_less_padding(tiny_lm_dir,
                                                                       smollm_tokenizer):
    """``longest_first`` reorders whole sequences (none changed, none lost), pads fewer tokens
    on texts of mixed lengths, and gives the same perplexity up to float rounding."""
    from transformers import AutoModelForCausalLM

    from lmeval_regions.corpora import batches
    from lmeval_regions.perplexity import perplexity

    texts = [t * (1 + i % 3) for i, t in enumerate(TEXTS * 2)]  # mixed lengths

    def rows(bs):
        return [tuple(r[m.bool()].tolist()) for b in bs
                for r, m in zip(b["input_ids"], b["attention_mask"])]

    def padded(bs):
        return sum(b["input_ids"].numel() for b in bs)

    given = list(batches(smollm_tokenizer, texts, 3, 64))
    sorted_ = list(batches(smollm_tokenizer, texts, 3, 64, longest_first=True))
    assert sorted(rows(given)) == sorted(rows(sorted_))
    lengths = [len(r) for r in rows(sorted_)]
    assert lengths == sorted(lengths, reverse=True)
    assert padded(sorted_) < padded(given)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    a = perplexity(model, smollm_tokenizer, texts, 64, 3)
    b = perplexity(model, smollm_tokenizer, texts, 64, 3, longest_first=True)
    assert a["tokens"] == b["tokens"]
    assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-6)
